"""Long convolutions along time, computed with real FFTs (the S4/SGConv convolution mode).

Shapes (see :mod:`effseq.typing`): inputs u (b, t, h); kernels k (h, l), one per channel.
A kernel longer than the sequence is cut to t; a shorter one acts as if zero-padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from effseq.ops import _checks, segments, sequence
from effseq.ops._impl import resolve_impl
from effseq.typing import Array


@functools.cache
def next_fast_len(n: int) -> int:
    """Smallest m >= n whose only prime factors are 2, 3, 5 and 7 (fast sizes for FFT libraries)."""
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()  # the next power of two is always a candidate
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                m = p3
                while m < n:
                    m *= 2
                best = min(best, m)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def _validate(op: str, u: Array, kernels: dict[str, Array]) -> None:
    _checks.check_rank(op, "u", u, 3, "(b, t, h)")
    _checks.check_real(op, "u", u)
    dims = [("u", u, 2, "h")]
    for name, k in kernels.items():
        _checks.check_rank(op, name, k, 2, "(h, l)")
        _checks.check_real(op, name, k)
        dims.append((name, k, 0, "h"))
    _checks.check_dims(op, dims)


def _fit(k: Array, length: int) -> Array:
    """Cuts or zero-pads the kernel's last axis to ``length``."""
    l = k.shape[-1]
    if l >= length:
        return k[:, :length]
    return jnp.pad(k, ((0, 0), (0, length - l)))


def _conv_fft(u: Array, k_full: Array, n: int, t: int) -> Array:
    """Circular convolution of u (b, t, h) with k_full (h, n) at FFT size n; first t outputs.

    The FFTs run over the last axis of a (b, h, t) copy: transforms of contiguous rows were
    faster than transforms along the strided time axis on CPU, fwd+bwd at (2, t, 256), by 2x
    at t = 2048 and 12% at t = 8192, the transposes included.

    The copy is flattened to (b * h, t) rows so that every FFT, forward and backward, has a
    rank-2 operand. XLA's SPMD partitioner does not partition FFTs (openxla/xla#24): it
    all-gathers a sharded operand and runs the whole transform on every device. XLA:CPU lays an
    all-gather out with the gathered axis most major, so a (b, h, t) operand gathered along h
    reached the FFT in layout {2,0,1}, which the CPU FFT thunk rejects at run time
    (RET_CHECK IsMonotonicWithDim0Major). In rank 2 a batch or channel sharding can only be
    gathered along the leading axis, which is row-major. Unsharded, the reshape is a bitcast.
    """
    b, _, h = u.shape
    f = n // 2 + 1  # rfft bins
    rows = jnp.swapaxes(u, 1, 2).reshape(b * h, t)
    u_f = jnp.fft.rfft(rows, n=n, axis=-1).reshape(b, h, f)
    k_f = jnp.fft.rfft(k_full, n=n, axis=-1)
    y = jnp.fft.irfft((u_f * k_f[None]).reshape(b * h, f), n=n, axis=-1)[:, :t]
    return jnp.swapaxes(y.reshape(b, h, t), 1, 2)


# Kernels up to this many taps are summed as shifted copies of the input instead of an XLA
# convolution. XLA:CPU runs a depthwise (feature-grouped) convolution through a slow generic path
# once it sits inside a lax.scan, as every layer of a depth-scanned stack does: Mamba's width-4
# conv took 917 ms fwd+bwd over 4 scanned layers at (1, 1024, 256) against 51 ms for the shifted
# sum (2-core CPU, jax 0.10.2). The sum is plain float32 arithmetic on every backend.
_SHIFT_MAX_TAPS = 16


def _conv_direct(u: Array, k: Array) -> Array:
    """Depthwise causal convolution in O(t l): best for short kernels."""
    l = k.shape[-1]
    t = u.shape[1]
    if l <= _SHIFT_MAX_TAPS:
        # y[:, i] = sum_s k[:, s] * u[:, i - s]: tap s reads the input delayed by s steps.
        padded = jnp.pad(u, [(0, 0), (l - 1, 0), (0, 0)])
        y = padded[:, l - 1 : l - 1 + t] * k[:, 0]
        for s in range(1, l):
            y = y + padded[:, l - 1 - s : l - 1 - s + t] * k[:, s]
        return y
    h = u.shape[-1]
    # conv_general_dilated correlates, so flip the kernel; (l, 1, h) is WIO, one input per group.
    rhs = jnp.flip(k, -1).T[:, None, :]
    return jax.lax.conv_general_dilated(
        u,
        rhs,
        window_strides=(1,),
        padding=[(l - 1, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=h,
        precision=jax.lax.Precision.HIGHEST,
    )


def _conv_taps_masked(u: Array, k: Array, seg: Array, lag_offset: int, reverse: bool) -> Array:
    """A short kernel's taps on packed rows: tap s reads u[t - s - lag_offset] (``reverse``:
    u[t + s + lag_offset]) only where that position is in t's document (segments.tap_mask).
    O(t l) like the unpacked shifted sum, plus one (b, t) mask per tap."""
    l = k.shape[-1]
    t = u.shape[1]
    y = jnp.zeros_like(u)
    for s in range(l):
        lag = s + lag_offset
        if lag >= t:
            break
        if reverse:
            shifted = jnp.pad(u[:, lag:], [(0, 0), (0, lag), (0, 0)])
        else:
            shifted = jnp.pad(u[:, : t - lag], [(0, 0), (lag, 0), (0, 0)])
        if lag:
            shifted = jnp.where(segments.tap_mask(seg, lag, reverse)[..., None], shifted, 0.0)
        y = y + shifted * k[:, s]
    return y


# Positions per block of the masked Toeplitz form (packed rows with long kernels).
_CONV_BLOCK = 64


def _conv_toeplitz_masked(u: Array, k: Array, doc: Array, lag_offset: int) -> Array:
    """y[i] = sum_j k[i - j - lag_offset] u[j] over the j in i's document (0 <= lag < l).

    u (b, t, h) float32, k (h, l), doc (b, t) document index (any labels that are equal
    exactly within a document and contiguous). Time is cut into blocks of c = 64: query block
    q meets key block q - d (offset d). A diagonal block (d = 0) is a (b, h, c, c) masked
    Toeplitz product. Off the diagonal only the query block's first document can reach back
    into an earlier block, so the mask there is rank one (keys of that document x queries of
    it) and the product is a plain batched matmul of the offset's (h, c, c) Toeplitz block
    with every query block's masked keys at once. An offset where no row's key block holds
    its query block's first document is skipped (``lax.cond``), so with documents of length L
    about L / c + 2 offsets run, each O(b t h c) work; no offset needs more than O(b t h + h c c)
    memory.
    """
    b, t, h = u.shape
    l = k.shape[-1]
    c = min(_CONV_BLOCK, t)
    n = -(-t // c)
    # Offsets whose smallest lag, d c - (c - 1) - lag_offset, is still below l.
    n_off = min(n, (l + c - 2 + lag_offset) // c + 1)
    pad = n * c - t
    ub = jnp.moveaxis(jnp.pad(u, [(0, 0), (0, pad), (0, 0)]).reshape(b, n, c, h), 1, 0)
    db = jnp.moveaxis(jnp.pad(doc, [(0, 0), (0, pad)], constant_values=-1).reshape(b, n, c), 1, 0)
    # Lags below 0 or from l on read the zero padding.
    kp = jnp.pad(k, [(0, 0), (c + lag_offset, n_off * c + c)])
    rel = jnp.arange(c)[:, None] - jnp.arange(c)[None, :]
    hi = jax.lax.Precision.HIGHEST

    def toeplitz(d):  # (h, c, c): [h, r, s] = k[h, d c + r - s - lag_offset]
        return kp[:, d * c + rel + c]

    t0 = toeplitz(0)

    @jax.checkpoint
    def diagonal(_, xs):
        uq, dq = xs
        w = t0[None] * (dq[:, :, None] == dq[:, None, :])[:, None]  # (b, h, c, c)
        return None, jnp.einsum("bhrs,bsh->brh", w, uq, precision=hi)

    _, y = jax.lax.scan(diagonal, None, (ub, db))  # (n, b, c, h)
    if n_off > 1:
        first = db[:, :, :1]  # (n, b, 1): each query block's first document
        q_mask = (db == first)[..., None]
        block = jnp.arange(n)[:, None, None]

        @jax.checkpoint
        def off_diagonal(y, d):
            k_mask = (jnp.roll(db, d, axis=0) == first) & (block >= d)  # (n, b, c)

            def add(y):
                keys = jnp.roll(ub, d, axis=0) * k_mask[..., None]
                return y + q_mask * jnp.einsum("hrs,nbsh->nbrh", toeplitz(d), keys, precision=hi)

            return jax.lax.cond(jnp.any(k_mask), add, lambda y: y, y), None

        y, _ = jax.lax.scan(off_diagonal, y, jnp.arange(1, n_off))
    return jnp.moveaxis(y, 0, 1).reshape(b, n * c, h)[:, :t]


def _check_segments(op: str, u: Array, segment_ids) -> None:
    if segment_ids is not None:
        segments.check_segment_ids(op, segment_ids, u.shape[0], u.shape[1])


def causal_conv(
    u: Array, k: Array, *, impl: str | None = None, segment_ids: Array | None = None
) -> Array:
    """Causal depthwise convolution y[b, t, h] = sum_{s <= t} k[h, s] * u[b, t - s, h].

    The convolution form of a linear time-invariant SSM (Gu et al. 2022, "Efficiently Modeling
    Long Sequences with Structured State Spaces", eq. 4-5).

    Args:
      u: (b, t, h) real input.
      k: (h, l) real kernel; cut to t or zero-padded.
      impl: ``"fft"`` (O(t log t); the default) or ``"direct"`` (O(t l): a sum of shifted
        inputs up to 16 taps, an XLA convolution beyond; better for short kernels such as
        Mamba's width-4 convolution).
      segment_ids: (b, t) integer document ids of packed rows (:mod:`effseq.ops.segments`), or
        None. No tap crosses a document start: y_t = sum_{s <= pos_t} k_s u_{t-s}, pos_t the
        offset of t in its document. An FFT cannot mask per document, so on packed rows:
        ``"direct"`` with a kernel of at most 16 taps is the shifted sum with one
        :func:`~effseq.ops.segments.tap_mask` per tap (same O(t l) cost; the short convs of
        Mamba, GDN, RG-LRU); any other kernel, whatever ``impl`` says, goes through a blockwise
        masked Toeplitz product (blocks of 64 positions): with documents of length L it does
        O(b t h (L + 128)) multiply-adds, memory O(b t h + h 64²) (measured in the commit
        that added it: see its message), against the FFT's O(b t h log t).

    Returns:
      y (b, t, h) in u's dtype, accumulated in float32.

    Causality: ``"direct"`` is exactly causal (the gradient of y_t w.r.t. later inputs is 0).
    ``"fft"`` is causal up to float32 roundoff: an FFT spreads rounding errors over every
    position, so that gradient is a few ulps of the kernel's scale, not exactly 0.

    Sequence parallel (a mesh whose ``sequence`` axis n > 1, :mod:`effseq.ops.sequence`): t must
    divide by n. A kernel reaching l - 1 <= t / n steps back takes a halo of the left
    neighbour's last l - 1 inputs (and ids), one neighbour exchange, and runs the local op on
    t / n + l - 1 steps. A longer kernel switches the whole rows to channel sharding with an
    all-to-all (h must divide by n), convolves each shard's h / n channels over all t steps and
    switches back: two all-to-alls of the activations (plus an all-gather of ``segment_ids``).
    """
    op = "causal_conv"
    _validate(op, u, {"k": k})
    impl = resolve_impl(op, impl)
    _check_segments(op, u, segment_ids)
    n = sequence.shards()
    if n > 1:
        sequence.check_length(op, u.shape[1], n)
        return _causal_sharded(u, k, impl, segment_ids, n)
    t = u.shape[1]
    uf = u.astype(jnp.float32)
    kf = k.astype(jnp.float32)
    if segment_ids is not None:
        kf = kf[:, :t]
        if impl == "direct" and kf.shape[-1] <= _SHIFT_MAX_TAPS:
            y = _conv_taps_masked(uf, kf, segment_ids, 0, False)
        else:
            y = _conv_toeplitz_masked(uf, kf, segments.document_index(segment_ids), 0)
    elif impl == "direct":
        y = _conv_direct(uf, kf[:, :t])
    else:
        l = min(k.shape[-1], t)
        # Linear (not circular) convolution needs n >= t + l - 1.
        n = next_fast_len(t + l - 1)
        y = _conv_fft(uf, _fit(kf, l), n, t)
    return y.astype(u.dtype)


# Sequence parallelism: which exchange a sharded conv uses, decided here only. ``reach`` is
# how many steps beyond its own slice a shard's outputs read (in one direction). While it is
# at most the t / n steps one neighbour holds, a halo is the cheaper exchange on every count:
# one hop of at most one slice's worth of inputs, no constraint on h, and the local op stays
# the unsharded one on t / n + reach steps. Past that, the halo would have to come from
# several shards (all of them for S4D or SGConv kernels as long as the sequence); the
# all-to-all moves each slice once each way whatever the kernel length, so it takes over.
def _halo_fits(reach: int, t_local: int) -> bool:
    return reach <= t_local


def _check_channels(op: str, h: int, n: int) -> None:
    if h % n:
        raise ValueError(
            f"{op}: a kernel longer than each shard's slice runs channel-sharded, and its "
            f"h = {h} channels do not divide into mesh.sequence = {n} shards; use a channel "
            f"count divisible by it, fewer shards, or a kernel of at most t / {n} + 1 taps"
        )


def _halo_ids(seg: Array, width: int, *, reverse: bool = False) -> Array:
    """The ids of :func:`sequence.halo`'s inputs. At the row's ends, where the halo is the
    op's zero padding, they repeat the shard's own edge id so no document start appears."""
    got = sequence.halo(seg, width, reverse=reverse)
    if reverse:
        outer, own = sequence.index() == sequence.count() - 1, seg[:, -1:]
    else:
        outer, own = sequence.index() == 0, seg[:, :1]
    return jnp.where(outer, jnp.broadcast_to(own, got.shape), got)


def _extend(u: Array, seg: Array | None, left: int, right: int):
    """u (and ids) with ``left`` steps of halo before and ``right`` after."""
    parts, seg_parts = [u], [seg]
    if left:
        parts.insert(0, sequence.halo(u, left))
        seg_parts.insert(0, None if seg is None else _halo_ids(seg, left))
    if right:
        parts.append(sequence.halo(u, right, reverse=True))
        seg_parts.append(None if seg is None else _halo_ids(seg, right, reverse=True))
    ext = jnp.concatenate(parts, 1) if len(parts) > 1 else u
    if seg is None or len(seg_parts) == 1:
        return ext, seg
    return ext, jnp.concatenate(seg_parts, 1)


def _causal_sharded(u, k, impl, segment_ids, n):
    """:func:`causal_conv` with time split over the sequence axis."""
    t = u.shape[1]
    t_local = t // n
    reach = min(k.shape[-1], t) - 1
    time, whole = sequence.TIME, sequence.WHOLE
    if _halo_fits(reach, t_local):

        def local(u, k, seg):
            ext, ext_seg = _extend(u, seg, reach, 0)
            return causal_conv(ext, k, impl=impl, segment_ids=ext_seg)[:, reach:]

    else:
        _check_channels("causal_conv", u.shape[-1], n)

        def local(u, k, seg):
            # Ids have no channel axis to trade for time: every shard takes the whole rows' ids
            # (b x t integers, small next to the b x t x h / n activations it receives).
            seg = None if seg is None else sequence.gather_time(seg)
            y = causal_conv(
                sequence.to_channels(u), sequence.channel_block(k), impl=impl, segment_ids=seg
            )
            return sequence.to_time(y)

    return sequence.run(local, (time, whole, time), time)(u, k, segment_ids)


def _bidirectional_sharded(u, k_fwd, k_bwd, impl, segment_ids, n):
    """:func:`bidirectional_conv` with time split over the sequence axis."""
    t = u.shape[1]
    t_local = t // n
    # The unsharded op cuts k_fwd to t taps and k_bwd (lags 1..l) to t - 1.
    left, right = min(k_fwd.shape[-1], t) - 1, min(k_bwd.shape[-1], t - 1)
    time, whole = sequence.TIME, sequence.WHOLE
    if _halo_fits(max(left, right), t_local):

        def local(u, kf, kb, seg):
            ext, ext_seg = _extend(u, seg, left, right)
            y = bidirectional_conv(ext, kf, kb, impl=impl, segment_ids=ext_seg)
            return y[:, left : left + t_local]

    else:
        _check_channels("bidirectional_conv", u.shape[-1], n)

        def local(u, kf, kb, seg):
            seg = None if seg is None else sequence.gather_time(seg)
            block = sequence.channel_block
            y = bidirectional_conv(
                sequence.to_channels(u), block(kf), block(kb), impl=impl, segment_ids=seg
            )
            return sequence.to_time(y)

    return sequence.run(local, (time, whole, whole, time), time)(u, k_fwd, k_bwd, segment_ids)


def causal_conv_step(window: Array, u_t: Array, k: Array) -> tuple[Array, Array]:
    """One token of :func:`causal_conv`: the recurrent form of a short causal convolution.

    Args:
      window: (b, l - 1, h) the previous l - 1 inputs, oldest first (zeros before the start).
      u_t: (b, h) the new input.
      k: (h, l) the kernel; tap s multiplies the input s steps back.

    Returns:
      (y_t (b, h) in u_t's dtype, accumulated in float32 like ``causal_conv``; the next window
      (b, l - 1, h), float32).
    """
    op = "causal_conv_step"
    _checks.check_rank(op, "window", window, 3, "(b, l - 1, h)")
    _checks.check_rank(op, "u_t", u_t, 2, "(b, h)")
    _checks.check_rank(op, "k", k, 2, "(h, l)")
    _checks.check_dims(op, [("window", window, 0, "b"), ("u_t", u_t, 0, "b")])
    _checks.check_dims(op, [("window", window, 2, "h"), ("u_t", u_t, 1, "h"), ("k", k, 0, "h")])
    if window.shape[1] != k.shape[1] - 1:
        raise ValueError(
            f"{op}: `window` holds {window.shape[1]} inputs; a kernel of {k.shape[1]} taps "
            f"needs {k.shape[1] - 1}"
        )
    full = jnp.concatenate([window.astype(jnp.float32), u_t[:, None].astype(jnp.float32)], 1)
    # full[:, j] is the input l - 1 - j steps back, so it pairs with the flipped kernel.
    y = jnp.einsum(
        "blh,hl->bh",
        full,
        jnp.flip(k.astype(jnp.float32), -1),
        precision=jax.lax.Precision.HIGHEST,
    )
    return y.astype(u_t.dtype), full[:, 1:]


def bidirectional_conv(
    u: Array,
    k_fwd: Array,
    k_bwd: Array,
    *,
    impl: str | None = None,
    segment_ids: Array | None = None,
) -> Array:
    """Non-causal convolution: a causal kernel plus an anti-causal one.

    y[b, t, h] = sum_{s >= 0} k_fwd[h, s] * u[b, t - s, h]
               + sum_{s >= 0} k_bwd[h, s] * u[b, t + 1 + s, h]

    The backward kernel starts at lag 1 so the current token is counted once (the convention of
    bidirectional S4). One FFT of size >= 2t - 1 evaluates both halves.

    Args:
      u: (b, t, h) real input.
      k_fwd: (h, l) kernel over the past and present.
      k_bwd: (h, l) kernel over the future.
      impl: ``"fft"`` or ``"direct"``, as for :func:`causal_conv`.
      segment_ids: (b, t) document ids of packed rows, or None: neither half crosses a
        document boundary (the future taps stop at the document's end). As for
        :func:`causal_conv`: ``"direct"`` with both kernels of at most 16 taps masks each tap,
        anything else runs the blockwise masked Toeplitz form twice (the future half on the
        time-reversed row), with the cost given there.

    Returns:
      y (b, t, h) in u's dtype.

    Sequence parallel: as :func:`causal_conv`, with halos from both neighbours when both
    kernels fit (``k_fwd``'s l - 1 steps from the left, ``k_bwd``'s l steps from the right, as
    it starts at lag 1), else the all-to-all to channel sharding and back.
    """
    op = "bidirectional_conv"
    _validate(op, u, {"k_fwd": k_fwd, "k_bwd": k_bwd})
    impl = resolve_impl(op, impl)
    _check_segments(op, u, segment_ids)
    n = sequence.shards()
    if n > 1:
        sequence.check_length(op, u.shape[1], n)
        return _bidirectional_sharded(u, k_fwd, k_bwd, impl, segment_ids, n)
    t = u.shape[1]
    uf = u.astype(jnp.float32)
    if segment_ids is not None:
        return _bidirectional_packed(uf, k_fwd, k_bwd, segment_ids, impl).astype(u.dtype)
    kf = _fit(k_fwd.astype(jnp.float32), t)
    kb = _fit(k_bwd.astype(jnp.float32), t - 1) if t > 1 else None
    if impl == "direct":
        y = _conv_direct(uf, kf)
        if kb is not None:
            # Reversing time turns the future into the past; the lag-1 start is a leading zero.
            kb_shifted = jnp.pad(kb, ((0, 0), (1, 0)))
            y = y + jnp.flip(_conv_direct(jnp.flip(uf, 1), kb_shifted), 1)
    else:
        n = next_fast_len(2 * t - 1)
        k_full = jnp.zeros((k_fwd.shape[0], n), jnp.float32).at[:, :t].set(kf)
        if kb is not None:
            # Lag -(s + 1) lives at circular index n - 1 - s.
            k_full = k_full.at[:, n - (t - 1) :].set(jnp.flip(kb, -1))
        y = _conv_fft(uf, k_full, n, t)
    return y.astype(u.dtype)


def _bidirectional_packed(uf, k_fwd, k_bwd, segment_ids, impl):
    """The packed form of :func:`bidirectional_conv` (float32 in and out)."""
    t = uf.shape[1]
    kf = k_fwd.astype(jnp.float32)[:, :t]
    kb = k_bwd.astype(jnp.float32)[:, : max(t - 1, 1)]
    if impl == "direct" and max(kf.shape[-1], kb.shape[-1]) <= _SHIFT_MAX_TAPS:
        y = _conv_taps_masked(uf, kf, segment_ids, 0, False)
        return y + _conv_taps_masked(uf, kb, segment_ids, 1, True)
    doc = segments.document_index(segment_ids)
    y = _conv_toeplitz_masked(uf, kf, doc, 0)
    # The future half is the past half of the reversed row, lags from 1; the reversed labels
    # are still equal exactly within each document.
    back = _conv_toeplitz_masked(jnp.flip(uf, 1), kb, jnp.flip(doc, 1), 1)
    return y + jnp.flip(back, 1)


def _toeplitz(k: Array, t: int, lag_offset: int) -> Array:
    """(h, t, t) matrix T[h, i, j] = k[h, i - j - lag_offset] where in range, else 0."""
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :] - lag_offset
    valid = (lag >= 0) & (lag < k.shape[-1])
    return jnp.where(valid, k.astype(jnp.float32)[:, jnp.clip(lag, 0, k.shape[-1] - 1)], 0.0)


def _same_document(op: str, u: Array, segment_ids) -> Array | None:
    """(b, t, t) float32 same-document mask, or None without ``segment_ids``."""
    if segment_ids is None:
        return None
    segments.check_segment_ids(op, segment_ids, u.shape[0], u.shape[1])
    return segments.same_document(segment_ids).astype(jnp.float32)


def causal_conv_reference(u: Array, k: Array, *, segment_ids: Array | None = None) -> Array:
    """Slow reference for :func:`causal_conv`: the dense (t, t) Toeplitz matrix product, float32.
    With ``segment_ids`` the matrix is zero between different documents."""
    t = u.shape[1]
    same = _same_document("causal_conv_reference", u, segment_ids)
    if same is None:
        return jnp.einsum("hts,bsh->bth", _toeplitz(k, t, 0), u.astype(jnp.float32))
    return jnp.einsum("hts,bts,bsh->bth", _toeplitz(k, t, 0), same, u.astype(jnp.float32))


def bidirectional_conv_reference(
    u: Array, k_fwd: Array, k_bwd: Array, *, segment_ids: Array | None = None
) -> Array:
    """Slow reference for :func:`bidirectional_conv`: dense Toeplitz products, float32.

    The anti-causal part is the causal one of the time-reversed input, with the kernel
    starting at lag 1. With ``segment_ids`` both matrices are zero between documents.
    """
    t = u.shape[1]
    uf = u.astype(jnp.float32)
    same = _same_document("bidirectional_conv_reference", u, segment_ids)
    if same is None:
        backward = jnp.einsum("hts,bsh->bth", _toeplitz(k_bwd, t, 1), jnp.flip(uf, 1))
        return causal_conv_reference(u, k_fwd) + jnp.flip(backward, 1)
    flip_same = jnp.flip(same, (1, 2))
    backward = jnp.einsum("hts,bts,bsh->bth", _toeplitz(k_bwd, t, 1), flip_same, jnp.flip(uf, 1))
    forward = causal_conv_reference(u, k_fwd, segment_ids=segment_ids)
    return forward + jnp.flip(backward, 1)
