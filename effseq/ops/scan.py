"""First-order linear recurrences h_t = a_t * h_{t-1} + b_t, the engine of every diagonal scan.

One entry point, :func:`linear_scan`, with the implementation picked by ``impl`` (resolved in
:mod:`effseq.ops._impl`): ``"sequential"`` (a ``lax.scan``; least work, best on CPU) or
``"associative"`` (``lax.associative_scan``; log depth, best on GPU/TPU). Accumulation is in
float32 (or complex64 for complex inputs) whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effseq.ops import _checks, segments, sequence
from effseq.ops._impl import resolve_impl
from effseq.typing import Array

# No unrolling: XLA CPU fuses unrolled steps into one kernel that recomputes the chain of
# steps for each output; measured 1.5-4.5x slower than unroll=1 at (4096, 2, 64) to
# (4096, 2, 512, 16) on jax 0.10.
_UNROLL = 1


def _acc_dtype(x):
    return jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32


def linear_scan_time_major(a: Array, b: Array, h0: Array | None, impl: str, reverse: bool = False):
    """Time-major core used by the ops: a, b (t, ...); h0 (...) or None. Returns states (t, ...).

    ``impl`` must already be resolved. With ``reverse`` the recurrence runs from t-1 down to 0.
    """
    if h0 is None:
        h0 = jnp.zeros(b.shape[1:], b.dtype)
    if impl == "sequential":

        def step(h, ab):
            a_t, b_t = ab
            h = a_t * h + b_t
            return h, h

        _, hs = jax.lax.scan(step, h0, (a, b), reverse=reverse, unroll=_UNROLL)
        return hs

    def combine(left, right):
        # Compose two affine maps; ``left`` acts first.
        a_l, b_l = left
        a_r, b_r = right
        return a_r * a_l, a_r * b_l + b_r

    a_cum, b_cum = jax.lax.associative_scan(combine, (a, b), reverse=reverse, axis=0)
    return a_cum * h0 + b_cum


def linear_scan(
    a: Array,
    b: Array,
    h0: Array | None = None,
    *,
    reverse: bool = False,
    impl: str | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Runs h_t = a_t * h_{t-1} + b_t (elementwise) over axis 1.

    Args:
      a: (b, t, ...) decay, real or complex.
      b: (b, t, ...) input, same shape as ``a``.
      h0: (b, ...) initial state, or None for zeros.
      reverse: run from the last step to the first (h_{t+1} feeds h_t).
      impl: ``"sequential"`` or ``"associative"``; None picks the backend default.
      segment_ids: (b, t) integer document ids of packed rows (:mod:`effseq.ops.segments`), or
        None for one document per row. Forward, a_t counts as 0 where a document starts
        (h_t = b_t there); with ``reverse``, the state from t + 1 is dropped where t + 1 starts
        a document (:func:`~effseq.ops.segments.document_ends`). The masked decays get zero
        gradient. ``h0`` feeds the first document scanned (the row's last with ``reverse``).

    Returns:
      ``(h, h_last)``: every state (b, t, ...) and the final one (b, ...), in float32 (complex64
      for complex inputs). With ``reverse`` the final state is the one at t = 0.
    """
    op = "linear_scan"
    impl = resolve_impl(op, impl)
    if a.ndim < 2:
        raise ValueError(f"{op}: `a` must have rank >= 2 (b, t, ...), got {_checks.shape_str(a)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{op}: `a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if h0 is not None and (h0.shape[0] != a.shape[0] or h0.shape[1:] != a.shape[2:]):
        raise ValueError(
            f"{op}: `h0` must have shape {(a.shape[0], *a.shape[2:])}, got {tuple(h0.shape)}"
        )
    dtype = jnp.result_type(_acc_dtype(a), _acc_dtype(b))
    if segment_ids is not None:
        segments.check_segment_ids(op, segment_ids, a.shape[0], a.shape[1])
    n = sequence.shards()
    if n > 1:
        sequence.check_length(op, a.shape[1], n)
        return _sharded(a, b, h0, reverse, impl, segment_ids, dtype)
    if segment_ids is not None:
        a = _reset(a, segment_ids, reverse)
    a_t = jnp.moveaxis(a.astype(dtype), 1, 0)
    b_t = jnp.moveaxis(b.astype(dtype), 1, 0)
    hs = linear_scan_time_major(a_t, b_t, None if h0 is None else h0.astype(dtype), impl, reverse)
    h_last = hs[0] if reverse else hs[-1]
    return jnp.moveaxis(hs, 0, 1), h_last


def _sharded(a, b, h0, reverse, impl, segment_ids, dtype):
    """:func:`linear_scan` with time split over the sequence axis (:mod:`effseq.ops.sequence`):
    each shard's slice from zero, summarised by its decay product, folded, then rerun."""
    if h0 is None:
        h0 = jnp.zeros((a.shape[0], *a.shape[2:]), dtype)

    def local(a, b, h0, seg):
        _, from_zero = linear_scan(a, b, reverse=reverse, impl=impl, segment_ids=seg)
        decay = a if seg is None else _reset(a, seg, reverse)
        edge = sequence.boundary_cut(seg, reverse=reverse)
        transition = sequence.cut(jnp.prod(decay.astype(dtype), axis=1), edge)
        incoming, last = sequence.carry(transition, from_zero, h0.astype(dtype), reverse=reverse)
        hs, _ = linear_scan(
            a, b, sequence.cut(incoming, edge), reverse=reverse, impl=impl, segment_ids=seg
        )
        return hs, last

    time, whole = sequence.TIME, sequence.WHOLE
    return sequence.run(local, (time, time, whole, time), (time, whole))(a, b, h0, segment_ids)


def _reset(a: Array, segment_ids: Array, reverse: bool) -> Array:
    """``a`` with the decays that would cross a document boundary set to 0 (constant mask)."""
    flag_fn = segments.document_ends if reverse else segments.document_starts
    flags = flag_fn(segment_ids)
    flags = flags.reshape(flags.shape + (1,) * (a.ndim - 2))
    return jnp.where(flags, jnp.zeros((), a.dtype), a)


def linear_scan_reference(
    a: Array, b: Array, h0: Array | None = None, *, segment_ids: Array | None = None
) -> tuple[Array, Array]:
    """Slow reference for :func:`linear_scan` (forward direction): a Python loop over time.

    With ``segment_ids`` the state is zeroed before the update of every document start."""
    dtype = jnp.result_type(_acc_dtype(a), _acc_dtype(b))
    h = jnp.zeros((a.shape[0], *a.shape[2:]), dtype) if h0 is None else h0.astype(dtype)
    starts = None
    if segment_ids is not None:
        segments.check_segment_ids("linear_scan_reference", segment_ids, a.shape[0], a.shape[1])
        starts = segments.document_starts(segment_ids)
    out = []
    for t in range(a.shape[1]):
        if starts is not None:
            h = jnp.where(starts[:, t].reshape((-1,) + (1,) * (h.ndim - 1)), 0, h)
        h = a[:, t].astype(dtype) * h + b[:, t].astype(dtype)
        out.append(h)
    return jnp.stack(out, axis=1), h
