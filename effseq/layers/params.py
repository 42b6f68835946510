"""Parameters with logical axes, and the SSM tag the optimizer reads.

Every parameter is created boxed with its logical axis names (:mod:`effseq.sharding`).
Parameters that the S4/S5/Mamba recipes train with their own learning rate and no weight decay
(A, dt, B of S4D, SGConv sub-kernels, Mamba's A_log, dt bias and D) are boxed as
:class:`SSMPartitioned` instead: the box type is the tag, so the optimizer needs no name
matching, and the tag survives ``jax.grad`` and ``jax.tree`` maps like the axis names do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
from flax import struct


@struct.dataclass
class SSMPartitioned(nn.LogicallyPartitioned):
    """A logically partitioned parameter that gets the SSM optimizer treatment."""


def _boxed(init: Callable, axes: Sequence[str], ssm: bool) -> Callable:
    box = SSMPartitioned if ssm else nn.LogicallyPartitioned
    axes = tuple(axes)

    def init_boxed(key, shape, dtype):
        value = init(key, shape, dtype)
        if value.ndim != len(axes):
            raise ValueError(
                f"parameter of shape {tuple(value.shape)} given {len(axes)} axis names {axes}"
            )
        return box(value, axes)

    return init_boxed


def param(
    module: nn.Module,
    name: str,
    init: Callable,
    shape: Sequence[int],
    axes: Sequence[str],
    dtype,
    *,
    ssm: bool = False,
):
    """``module.param`` with logical axis names, SSM-tagged when ``ssm``; returns the value."""
    return module.param(name, _boxed(init, axes, ssm), tuple(shape), dtype)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def ssm_mask(variables) -> dict:
    """A pytree of bools matching the (unboxed) parameters: True where tagged SSM."""
    return jax.tree.map(lambda x: isinstance(x, SSMPartitioned), variables, is_leaf=_is_box)


def logical_axes(variables) -> dict:
    """A pytree of axis-name tuples (None for an unboxed, unnamed leaf)."""
    return jax.tree.map(
        lambda x: tuple(x.names) if _is_box(x) else None, variables, is_leaf=_is_box
    )
