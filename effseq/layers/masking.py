"""Padding masks and packed documents inside mixers.

A mask (b, t) is True at real tokens. Mixers zero their input at padded positions and, where a
recurrence would otherwise carry something through padding (gates, step sizes), make the padded
steps identities, so right-padding a sequence to any length leaves its real outputs unchanged.

Packed rows (``segment_ids`` (b, t), :mod:`effseq.ops.segments`) reach the same code through
:func:`packing`: id 0 is padding, so it becomes (part of) the mask, and the ops get the ids with
padding filled in, so trailing padding continues the last document as identity steps.
"""

from __future__ import annotations

import jax.numpy as jnp

from effseq.ops import segments
from effseq.typing import Array


def zero_padding(x: Array, mask: Array | None) -> Array:
    """x (b, t, ...) with padded positions (mask False) set to zero; x itself when mask is None."""
    if mask is None:
        return x
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), x, 0)


def packing(
    layer: str, x: Array, mask: Array | None, segment_ids: Array | None
) -> tuple[Array | None, Array | None]:
    """The mask and the ops' ids of a mixer called on x (b, t, ...) with ``segment_ids``.

    Returns ``(mask, ids)``: with ``segment_ids`` None, ``(mask, None)`` unchanged. Otherwise
    the ids are validated (a ValueError naming ``layer``), the mask is the given one AND-ed
    with ``segment_ids != 0`` (:func:`~effseq.ops.segments.padding_mask`), and ``ids`` are
    :func:`~effseq.ops.segments.fill_padding`'s, to pass as ``segment_ids=`` to every op.
    """
    if segment_ids is None:
        return mask, None
    segments.check_segment_ids(layer, segment_ids, x.shape[0], x.shape[1])
    real = segments.padding_mask(segment_ids)
    mask = real if mask is None else mask & real
    return mask, segments.fill_padding(segment_ids)
