"""Packed sequences: documents marked by ``segment_ids``, and the masks every op derives from them.

Every op and every mixer takes ``segment_ids`` (b, t), integer, keyword-only; None means one
document per row. The convention, everywhere in effseq:

* A position t > 0 whose id differs from position t - 1's starts a new document. Position 0
  never does: it continues from the op's initial state ``h0`` (None: zeros), so ``h0`` belongs
  to each row's first document, and the returned final state to its last.
* At a document start the carried state is zero before that position's own update (its decay
  is ignored); no convolution tap and no attention weight crosses a start.
* Ids are compared with their neighbour only: ``[1, 1, 2, 1]`` holds three documents. Ops give
  id 0 no meaning; layers and models read 0 as padding (:func:`padding_mask`) and pass
  :func:`fill_padding`'s ids on, so right padding continues the last document as identity
  steps and a prefill's state is that document's.

All helpers here are pure functions of the ids (no gradients flow through them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effseq.typing import Array

__all__ = [
    "check_segment_ids",
    "chunk_masks",
    "document_ends",
    "document_index",
    "document_starts",
    "fill_padding",
    "last_window",
    "padding_mask",
    "positions",
    "same_document",
    "tap_mask",
]


def check_segment_ids(op: str, segment_ids, batch: int, length: int) -> None:
    """Raises ValueError unless ``segment_ids`` is an integer array of shape (batch, length)."""
    shape = getattr(segment_ids, "shape", None)
    dtype = getattr(segment_ids, "dtype", None)
    if shape is None or tuple(shape) != (batch, length):
        raise ValueError(
            f"{op}: `segment_ids` must have shape (b, t) = {(batch, length)}, got "
            f"{None if shape is None else tuple(shape)}"
        )
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{op}: `segment_ids` must be an integer array, got dtype {dtype}")


def document_starts(segment_ids: Array) -> Array:
    """(b, t) bool: True where a new document starts (t > 0 and the id differs from t - 1's)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(change, ((0, 0), (1, 0)))


def document_ends(segment_ids: Array) -> Array:
    """(b, t) bool: True where the next position starts a new document (the reset flags of a
    scan run backwards in time). The last position is never an end."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(change, ((0, 0), (0, 1)))


def document_index(segment_ids: Array) -> Array:
    """(b, t) int32: 0 for each row's first document, then 1, 2, ... (so documents that reuse
    an id stay distinct)."""
    return jnp.cumsum(document_starts(segment_ids).astype(jnp.int32), axis=1)


def same_document(segment_ids: Array) -> Array:
    """(b, t, t) bool: [i, j] is True when positions i and j are in the same document."""
    doc = document_index(segment_ids)
    return doc[:, :, None] == doc[:, None, :]


def positions(segment_ids: Array) -> Array:
    """(b, t) int32: each position's offset from its document's first position (0, 1, ...)."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    start = jnp.where(document_starts(segment_ids), idx, 0)
    return idx - _cummax(start)


def _cummax(x: Array) -> Array:
    """Running maximum over axis 1."""
    return jax.lax.cummax(x, axis=1)


def tap_mask(segment_ids: Array, lag: int, reverse: bool = False) -> Array:
    """(b, t) bool: True where position t - lag (t + lag with ``reverse``) exists and is in
    t's document, i.e. where a convolution tap at that lag may read."""
    doc = document_index(segment_ids)
    t = doc.shape[1]
    if lag == 0:
        return jnp.ones(doc.shape, bool)
    if lag >= t:
        return jnp.zeros(doc.shape, bool)
    if reverse:
        other = jnp.pad(doc[:, lag:], ((0, 0), (0, lag)), constant_values=-1)
    else:
        other = jnp.pad(doc[:, :-lag], ((0, 0), (lag, 0)), constant_values=-1)
    return other == doc


def padding_mask(segment_ids: Array) -> Array:
    """(b, t) bool: True at real tokens (id != 0); id 0 is padding at the layer level."""
    return segment_ids != 0


def fill_padding(segment_ids: Array) -> Array:
    """Ids where every padding position (id 0) takes the id of the last real position before
    it; leading padding keeps 0. Layers pass these to the ops, so trailing padding (made an
    identity step by the mask) continues the last document instead of starting its own."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    last_real = _cummax(jnp.where(segment_ids != 0, idx, -1))
    filled = jnp.take_along_axis(segment_ids, jnp.maximum(last_real, 0), axis=1)
    return jnp.where(last_real >= 0, filled, segment_ids)


def chunk_masks(starts: Array, n: int, c: int) -> tuple[Array, Array, Array, Array]:
    """The masks a chunked scan needs for exact resets inside chunks.

    ``starts`` (b, t) bool (:func:`document_starts`) is zero-padded to n * c and cut into n
    chunks of c. With R the inclusive count of starts inside a chunk up to each position:

    * ``intra`` (n, b, 1, c, c): [i, j] is R_i == R_j (i and j in one document; apply to
      j <= i),
    * ``carry_in`` (n, b, 1, c): R_i == 0 (the state entering the chunk reaches position i),
    * ``to_end`` (n, b, 1, c): R_j == R_last (position j's contribution reaches the chunk's
      final state),
    * ``carry_through`` (n, b, 1): R_last == 0 (the entering state reaches the final state).

    The singleton axis is the head axis of :func:`effseq.ops._chunking.to_chunks`' layout
    (n, b, h, c, ...).
    """
    b, t = starts.shape
    s = jnp.pad(starts.astype(jnp.int32), ((0, 0), (0, n * c - t)))
    r = jnp.cumsum(s.reshape(b, n, c), axis=-1)  # (b, n, c)
    r = jnp.moveaxis(r, 1, 0)[:, :, None]  # (n, b, 1, c)
    last = r[..., -1:]
    intra = r[..., :, None] == r[..., None, :]
    return intra, r == 0, r == last, last[..., 0] == 0


def last_window(x: Array, width: int, segment_ids: Array | None = None) -> Array:
    """The decoding window of a causal convolution after a prompt: x (b, t, ...) -> its last
    ``width`` positions (b, width, ...) in float32, oldest first, zero where they fall before
    the prompt or (with ``segment_ids``, padding = 0) before the last document's start or on
    trailing padding. Trailing padding is skipped: the window ends at the last real token."""
    b, t = x.shape[:2]
    xf = x.astype(jnp.float32)
    if width == 0:
        return jnp.zeros((b, 0, *x.shape[2:]), jnp.float32)
    if segment_ids is None:
        padded = jnp.pad(xf, ((0, 0), (width, 0)) + ((0, 0),) * (x.ndim - 2))
        return padded[:, padded.shape[1] - width :]
    idx = jnp.arange(t, dtype=jnp.int32)
    real = segment_ids != 0
    last = jnp.max(jnp.where(real, idx, -1), axis=1)  # (b,), -1 if no real token
    pos = positions(fill_padding(segment_ids))
    last_pos = jnp.take_along_axis(pos, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
    lags = jnp.arange(width - 1, -1, -1, dtype=jnp.int32)  # oldest first
    src = last[:, None] - lags[None, :]  # (b, width)
    ok = (src >= 0) & (lags[None, :] <= last_pos[:, None]) & (last[:, None] >= 0)
    gathered = jnp.take_along_axis(
        xf, jnp.maximum(src, 0).reshape(b, width, *([1] * (x.ndim - 2))), axis=1
    )
    return jnp.where(ok.reshape(b, width, *([1] * (x.ndim - 2))), gathered, 0.0)
