"""Parameters with logical axes, and the optimizer group their layer's recipe gives them.

Every parameter is created boxed with its logical axis names (:mod:`effseq.sharding`). A layer
whose published recipe treats a parameter specially names its group (:data:`GROUPS`), and the
parameter is boxed as :class:`GroupedPartitioned` carrying it; the rest get the optimizer's
default by shape (matrices decayed, vectors not). The box is the tag, so the optimizer needs
no name matching, and it survives ``jax.grad`` and ``jax.tree`` maps like the axis names do.

The groups (learning rate, weight decay):
  "decay": the main learning rate, weight decay.
  "no_decay": the main learning rate, no weight decay (Mamba's A_log, D and dt bias; S4's dt
    when its recipe gives dt no learning rate of its own).
  "ssm": ``optim.ssm_learning_rate`` and ``optim.ssm_weight_decay`` (S4D's A and B: the S4
    recipes' lr 0.001 without weight decay).
  "ssm_decay": ``optim.ssm_learning_rate`` with the main weight decay (SGConv's sub-kernels,
    whose ``_optim`` sets only a learning rate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
from flax import struct

GROUPS = ("decay", "no_decay", "ssm", "ssm_decay")
# The groups trained at the SSM learning rate.
SSM_GROUPS = ("ssm", "ssm_decay")


@struct.dataclass
class GroupedPartitioned(nn.LogicallyPartitioned):
    """A logically partitioned parameter with the optimizer group its layer chose."""

    group: str = struct.field(pytree_node=False, default="decay")


def _boxed(init: Callable, axes: Sequence[str], group: str | None) -> Callable:
    axes = tuple(axes)
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown parameter group {group!r}; choose one of {GROUPS}")

    def init_boxed(key, shape, dtype):
        value = init(key, shape, dtype)
        if value.ndim != len(axes):
            raise ValueError(
                f"parameter of shape {tuple(value.shape)} given {len(axes)} axis names {axes}"
            )
        if group is None:
            return nn.LogicallyPartitioned(value, axes)
        return GroupedPartitioned(value, axes, group=group)

    return init_boxed


def param(
    module: nn.Module,
    name: str,
    init: Callable,
    shape: Sequence[int],
    axes: Sequence[str],
    dtype,
    *,
    group: str | None = None,
):
    """``module.param`` with logical axis names and, when given, its optimizer ``group``
    (:data:`GROUPS`; None: the default by shape); returns the value."""
    return module.param(name, _boxed(init, axes, group), tuple(shape), dtype)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def group_of(leaf) -> str | None:
    """The group a parameter's layer chose, or None (the optimizer's default by shape)."""
    return leaf.group if isinstance(leaf, GroupedPartitioned) else None


def groups(variables) -> dict:
    """A pytree matching the (unboxed) parameters: each one's named group, or None."""
    return jax.tree.map(group_of, variables, is_leaf=_is_box)


def ssm_mask(variables) -> dict:
    """A pytree of bools matching the (unboxed) parameters: True where trained at the SSM
    learning rate ("ssm" and "ssm_decay" groups)."""
    return jax.tree.map(lambda x: group_of(x) in SSM_GROUPS, variables, is_leaf=_is_box)


def logical_axes(variables) -> dict:
    """A pytree of axis-name tuples (None for an unboxed, unnamed leaf)."""
    return jax.tree.map(
        lambda x: tuple(x.names) if _is_box(x) else None, variables, is_leaf=_is_box
    )
