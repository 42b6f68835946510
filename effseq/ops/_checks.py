"""Input validation shared by the ops: every error names the argument and what it got."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def shape_str(x) -> str:
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def check_rank(op: str, name: str, x, rank: int, layout: str) -> None:
    """Raises unless ``x`` has ``rank`` dimensions; ``layout`` is the legend, e.g. '(b, t, h)'."""
    if not hasattr(x, "shape"):
        raise TypeError(f"{op}: `{name}` must be an array {layout}, got {type(x).__name__}")
    if x.ndim != rank:
        raise ValueError(f"{op}: `{name}` must have rank {rank} {layout}, got {shape_str(x)}")


def check_real(op: str, name: str, x) -> None:
    if jnp.iscomplexobj(x):
        raise ValueError(f"{op}: `{name}` must be real, got complex {shape_str(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{op}: `{name}` must be a floating-point array, got {shape_str(x)}")


def check_complex(op: str, name: str, x) -> None:
    if not jnp.iscomplexobj(x):
        raise ValueError(f"{op}: `{name}` must be complex, got {shape_str(x)}")


def check_dims(op: str, dims: Sequence[tuple[str, object, int, str]]) -> None:
    """Checks that named dimensions agree.

    ``dims`` is a list of ``(argument, array, axis, letter)``; all entries sharing a letter must
    have the same size. The error lists every argument that carries the letter.
    """
    seen: dict[str, list[tuple[str, object, int]]] = {}
    for name, x, axis, letter in dims:
        seen.setdefault(letter, []).append((name, x, axis))
    for letter, entries in seen.items():
        sizes = {x.shape[axis] for _, x, axis in entries}
        if len(sizes) > 1:
            got = ", ".join(f"`{name}` {tuple(x.shape)} (axis {axis})" for name, x, axis in entries)
            raise ValueError(f"{op}: dimension '{letter}' must agree across arguments, got {got}")


def check_positive_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: `{name}` must be a positive Python int, got {value!r}")
    return value


def check_nonpositive(op: str, name: str, x) -> None:
    """Raises if a concrete ``x`` has a positive entry; traced values cannot be inspected."""
    try:
        values = np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if values.size and np.nanmax(values.astype(np.float32)) > 0:
        raise ValueError(
            f"{op}: `{name}` holds log forget gates and must be <= 0, got a maximum of "
            f"{float(np.nanmax(values.astype(np.float32))):.4g} in {shape_str(x)}"
        )
