"""Gated linear attention (GLA): linear attention with a forget gate per key channel.

Yang, Wang, Shen, Panda & Kim (2023), "Gated Linear Attention Transformers with
Hardware-Efficient Training" (arXiv:2312.06635). With gates G_t = exp(log_g_t) in (0, 1]^k the
recurrence (their eq. 3, row-vector convention) is

    S_t = diag(G_t) S_{t-1} + k_t^T v_t        S_t (k, v)
    o_t = (scale * q_t) S_t                    o_t (v)

Forms of the same maths:

* :func:`gated_linear_attention_reference`: a plain ``lax.scan`` over time; the ground truth.
* :func:`gla_step`: one token, for decoding.
* ``impl="recurrent"``: the step scanned token by token, rematerialised per segment.
* ``impl="chunked"`` (default): the chunkwise-parallel form of the paper's section 4 with its
  secondary-level chunking, so that matmuls do most of the work and every ``exp`` has a
  non-positive argument (stable for gates as small as exp(-20) per step). Its backward pass is
  written by hand (``jax.custom_vjp``), so it supports reverse-mode autodiff only; forward mode
  (``jax.jvp``, ``jax.jacfwd``) needs ``impl="recurrent"``.
* ``impl="pallas"``: the chunked form's forward as one Pallas kernel (Triton on NVIDIA GPUs,
  interpret mode on a CPU), :mod:`effseq.ops.pallas.gla`, with a Pallas backward kernel
  (reverse-mode only). Unpacked rows only; never a default (not yet measured on a GPU).

Packed sequences (``segment_ids``, the convention of :mod:`effseq.ops.segments`): at a document
start the state is zeroed before the step's own update. The reference and the recurrent form
reset inside their scans; the chunked form stays chunked, multiplying every decay from s to t by
"no start in (s, t]" (:func:`effseq.ops.segments.chunk_masks`), including in its hand-written
backward pass. Cost, fwd+bwd at b = 2, t = 4096, h = 4, k = v = 64, default chunk, on a 2-core
CPU shared with other jobs (medians of 5, two runs): 300 / 444 ms without ids, 254 / 405 ms
with 8 random documents per row, the same within the noise.

Everything runs in float32 whatever the input dtype; ``o`` is cast back to the dtype of ``q``
and states are returned in float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from effseq.ops import _checks, sequence
from effseq.ops._chunking import (
    default_scale,
    float_chunk_masks,
    from_chunks,
    open_first_gate,
    packed_starts,
    reset_at_start,
    segmented_scan,
    to_chunks,
)
from effseq.ops._impl import resolve_impl
from effseq.ops.scan import linear_scan_time_major
from effseq.typing import Array

# Sub-chunk length c2 of the secondary chunking (the largest divisor of the chunk up to this).
# Per token the chunked form builds about (c / c2) * k elements for the pairs of sub-chunks and
# c2 * k for the diagonal blocks; 8 measured best on CPU with 16- to 64-step chunks.
_SUB_CHUNK = 8
# Steps of sequence per iteration of the chunked form's scan (whole chunks, at least two).
_STEPS_PER_SCAN = 128
# Default chunk lengths. CPU, fwd+bwd (2-core EPYC, jax 0.10.2), chunk 16 / 32 / 64 in ms:
# (b, t, h, k, v) = (32, 32, 4, 8, 16): 1.8 / 9.1 / 8.8; (32, 128, 4, 8, 16): 7.3 / 16.1 /
# 22.5; (32, 128, 4, 16, 32): 30.9 / 29.6 / 39.3; (1, 1024, 4, 32, 64): 17.1 / 15.8 / 15.8;
# (1, 4096, 4, 32, 64): 63.1 / 62.7 / 60.3. Chunk 8 (one sub-chunk) was 1.5-5x slower at
# b = 32. Accelerators keep 64 (untuned there).
_CPU_CHUNK = 16
_ACCELERATOR_CHUNK = 64
# Sums of log gates must not go through reduced-precision matmul passes (TF32, bf16): an error
# of 1e-3 in a log decay of -20 is a 2% error in the decay.
_EXACT = jax.lax.Precision.HIGHEST


def _validate(op: str, q, k, v, log_g, h0) -> None:
    for name, x, layout in (
        ("q", q, "(b, t, h, k)"),
        ("k", k, "(b, t, h, k)"),
        ("v", v, "(b, t, h, v)"),
        ("log_g", log_g, "(b, t, h, k)"),
    ):
        _checks.check_rank(op, name, x, 4, layout)
        _checks.check_real(op, name, x)
    dims = [
        (name, x, axis, letter)
        for name, x in (("q", q), ("k", k), ("v", v), ("log_g", log_g))
        for axis, letter in enumerate("bth")
    ]
    dims += [("q", q, 3, "k"), ("k", k, 3, "k"), ("log_g", log_g, 3, "k"), ("v", v, 3, "v")]
    if h0 is not None:
        _checks.check_rank(op, "h0", h0, 4, "(b, h, k, v)")
        _checks.check_real(op, "h0", h0)
        dims += [("h0", h0, axis, letter) for axis, letter in enumerate("bhkv")]
    _checks.check_dims(op, dims)
    _checks.check_nonpositive(op, "log_g", log_g)


def _step(S, q_t, k_t, v_t, log_g_t):
    """Unchecked float32 step of eq. 3; ``q_t`` already scaled. S (b, h, k, v)."""
    S = jnp.exp(log_g_t)[..., None] * S + k_t[..., :, None] * v_t[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", q_t, S)


def gla_step(
    S: Array, q_t: Array, k_t: Array, v_t: Array, log_g_t: Array, scale=None
) -> tuple[Array, Array]:
    """One token of GLA (Yang et al. 2023, eq. 3): decay the state, add k_t^T v_t, read with q_t.

    Args:
      S: (b, h, k, v) state before the token.
      q_t, k_t: (b, h, k) query and key.
      v_t: (b, h, v) value.
      log_g_t: (b, h, k) log forget gate, <= 0.
      scale: query scale; None means k ** -0.5.

    Returns:
      ``(S, o_t)``: the new state (b, h, k, v) in float32 and the output (b, h, v) in the dtype
      of ``q_t``.
    """
    op = "gla_step"
    _checks.check_rank(op, "S", S, 4, "(b, h, k, v)")
    for name, x, layout in (
        ("q_t", q_t, "(b, h, k)"),
        ("k_t", k_t, "(b, h, k)"),
        ("v_t", v_t, "(b, h, v)"),
        ("log_g_t", log_g_t, "(b, h, k)"),
    ):
        _checks.check_rank(op, name, x, 3, layout)
    for name, x in (("S", S), ("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("log_g_t", log_g_t)):
        _checks.check_real(op, name, x)
    dims = [("S", S, axis, letter) for axis, letter in enumerate("bhkv")]
    dims += [
        (name, x, axis, letter)
        for name, x in (("q_t", q_t), ("k_t", k_t), ("log_g_t", log_g_t))
        for axis, letter in enumerate("bhk")
    ]
    dims += [("v_t", v_t, axis, letter) for axis, letter in enumerate("bhv")]
    _checks.check_dims(op, dims)
    _checks.check_nonpositive(op, "log_g_t", log_g_t)
    f32 = jnp.float32
    S, o_t = _step(
        S.astype(f32),
        q_t.astype(f32) * default_scale(scale, q_t.shape[-1]),
        k_t.astype(f32),
        v_t.astype(f32),
        log_g_t.astype(f32),
    )
    return S, o_t.astype(q_t.dtype)


def gated_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    log_g: Array,
    *,
    scale=None,
    h0: Array | None = None,
    chunk_size: int | None = None,
    impl: str | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Gated linear attention over a sequence (Yang et al. 2023, eq. 3; chunked form section 4).

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t and o_t = (scale * q_t) S_t, with S_0 = h0.

    Args:
      q, k: (b, t, h, k) queries and keys.
      v: (b, t, h, v) values.
      log_g: (b, t, h, k) log forget gates, <= 0 (the paper uses ``logsigmoid(x) / 16``).
      scale: query scale; None means k ** -0.5.
      h0: (b, h, k, v) initial state, or None for zeros.
      chunk_size: chunk length c of the chunked form: t is zero-padded to a multiple of c (a
        sequence shorter than c runs as one shorter chunk) and each chunk is split into
        sub-chunks of the largest divisor of c up to 8. None: :func:`default_chunk_size`.
        Ignored by ``"recurrent"``. ``"pallas"`` needs a power of two >= 16 and uses
        sub-chunks of 16.
      impl: ``"chunked"``, ``"recurrent"`` or ``"pallas"`` (the Pallas kernel of
        :mod:`effseq.ops.pallas.gla`: forward and backward kernels in Pallas, the gate
        gradient's suffix sums in XLA; no ``segment_ids``); None picks the default (see
        ``ops._impl``).
      segment_ids: (b, t) integer document ids of packed rows (:mod:`effseq.ops.segments`): the
        state is zeroed where a new document starts; ``h0`` belongs to each row's first
        document and ``S_last`` is its last one's. None: one document per row.

    Sequence parallelism: under a mesh whose ``sequence`` axis splits t (it must divide), each
    shard runs its slice from a zero state, the shards all-gather their final states and
    per-key-channel decays exp(sum of log gates) (:func:`effseq.ops.sequence.carry`), and each
    runs its slice again from the state entering it: two local passes (the first's outputs are
    dropped) and one all-gather of (b, h, k) + (b, h, k, v) per shard.

    Returns:
      ``(o, S_last)``: o (b, t, h, v) in the dtype of ``q``; the final state (b, h, k, v) in
      float32.
    """
    op = "gated_linear_attention"
    impl = resolve_impl(op, impl)
    _validate(op, q, k, v, log_g, h0)
    if chunk_size is None:
        chunk_size = default_chunk_size()
    chunk_size = _checks.check_positive_int(op, "chunk_size", chunk_size)
    f32 = jnp.float32
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    starts = packed_starts(op, segment_ids, b, t)
    if impl == "pallas" and segment_ids is not None:
        raise ValueError(
            f"{op}: impl='pallas' does not support packed rows (segment_ids); "
            "impl='chunked' (the default) and impl='recurrent' do"
        )
    h0 = jnp.zeros((b, h, dk, dv), f32) if h0 is None else h0.astype(f32)
    if t == 0:
        return jnp.zeros((b, 0, h, dv), q.dtype), h0
    n = sequence.shards()
    if n > 1:
        sequence.check_length(op, t, n)
        return _sharded(q, k, v, log_g, h0, scale, chunk_size, impl, segment_ids)
    if impl == "pallas":
        from effseq.ops.pallas._common import per_device
        from effseq.ops.pallas.gla import gated_linear_attention_pallas

        def kernel(q, k, v, log_g, h0):
            return gated_linear_attention_pallas(
                q, k, v, log_g, h0, default_scale(scale, dk), chunk_size=chunk_size
            )

        # Rows over data x fsdp, heads over tensor: each device runs its block of the kernel.
        return per_device(kernel, (q, k, v, log_g, h0), (0,) * 5, (2, 2, 2, 2, 1), (0, 0), (2, 1))
    q32 = q.astype(f32) * default_scale(scale, dk)
    args = (q32, k.astype(f32), v.astype(f32), log_g.astype(f32), h0)
    if impl == "recurrent":
        o, S = _recurrent(*args, starts=starts)
    else:
        o, S = _chunked(*args, chunk_size=chunk_size, starts=starts)
    return o.astype(q.dtype), S


def _sharded(q, k, v, log_g, h0, scale, chunk_size, impl, segment_ids):
    """:func:`gated_linear_attention` with time split over the sequence axis
    (:mod:`effseq.ops.sequence`): each shard's slice from a zero state, summarised by its
    per-key-channel decay exp(sum of log gates), folded across shards, then run again from the
    state entering it."""
    scale = default_scale(scale, q.shape[-1])

    def local(q, k, v, log_g, h0, seg, scale):
        edge = sequence.boundary_cut(seg)
        log_g = open_first_gate(log_g, edge)

        def run(S):
            return gated_linear_attention(
                q,
                k,
                v,
                log_g,
                scale=scale,
                h0=S,
                chunk_size=chunk_size,
                impl=impl,
                segment_ids=seg,
            )

        _, from_zero = run(jnp.zeros_like(h0))
        # A document starting in the slice (or on its first step) drops whatever came in.
        decay = sequence.cut(jnp.exp(jnp.sum(log_g.astype(jnp.float32), axis=1)), edge)
        decay = sequence.cut(decay, sequence.any_start(seg))
        incoming, last = sequence.carry(decay, from_zero, h0, apply=_decay_rows)
        o, _ = run(sequence.cut(incoming, edge))
        return o, last

    time, whole = sequence.TIME, sequence.WHOLE
    specs = (time, time, time, time, whole, time, whole)
    return sequence.run(local, specs, (time, whole))(q, k, v, log_g, h0, segment_ids, scale)


def _decay_rows(decay: Array, S: Array) -> Array:
    """diag(decay) S: decay (b, h, k) on the key axis of S (b, h, k, v)."""
    return decay[..., None] * S


def default_chunk_size() -> int:
    """The chunk length the chunked form uses when ``chunk_size`` is None: 16 where
    ``linear_scan`` runs sequentially (CPU), 64 on accelerators."""
    if resolve_impl("linear_scan", None) == "sequential":
        return _CPU_CHUNK
    return _ACCELERATOR_CHUNK


def _recurrent(q, k, v, log_g, h0, *, starts=None):
    """The step form scanned token by token (segmented and rematerialised,
    :func:`effseq.ops._chunking.segmented_scan`); float32 inputs, ``q`` already scaled.
    ``starts`` (b, t) bool: zero the state before the step where a document starts."""
    if starts is None:
        return segmented_scan(lambda S, x: _step(S, *x), h0, (q, k, v, log_g))
    step = lambda S, x: _step(reset_at_start(S, x[4]), *x[:4])  # noqa: E731
    return segmented_scan(step, h0, (q, k, v, log_g, starts))


def _sub_chunk_size(c: int) -> int:
    """Largest divisor of ``c`` not above ``_SUB_CHUNK``: sub-chunks must tile the chunk."""
    return max(d for d in range(1, min(c, _SUB_CHUNK) + 1) if c % d == 0)


def _split_sub(x: Array, c2: int) -> Array:
    """(..., c, x) -> (..., m, c2, x): sub-chunk i, step t within it."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // c2, c2, x.shape[-1])


class _Decays(NamedTuple):
    """Decay factors of a stack of chunks, every one exp(sum of log gates) <= 1.

    Shapes for chunks (..., m, c2, k) (m sub-chunks of c2 steps) are noted per field.
    """

    from_start: Array  # (..., m, c2, k) chunk start -> t, inclusive of t's own gate
    to_end: Array  # (..., m, c2, k) s -> chunk end, exclusive of s's own gate
    from_sub_start: Array  # (..., m, c2, k) start of t's sub-chunk -> t
    to_sub_end: Array  # (..., m, c2, k) s -> end of s's sub-chunk
    between: Array  # (..., m, m, k) over the sub-chunks strictly between j and i; 0 unless i > j
    diag: Array  # (..., m, c2, c2, k) s -> t inside a sub-chunk; 0 where s > t
    chunk: Array  # (..., k) over the whole chunk


def _rounding_residual(pre: Array, g: Array) -> Array:
    """``lo`` such that pre + lo is the running sum of g (..., c2, k) along axis -2, nearly exactly.

    ``pre`` is the float32 running sum. pre_t - pre_s is exact when small (Sterbenz), but pre_t
    and pre_s each carry a rounding error of up to ulp(|pre|): with log_g = -20, |pre| reaches
    140 within 8 steps and ulp(140) = 1.5e-5, a 1.5e-5 relative error in a decay of ~1 between
    nearby steps. TwoSum (Knuth) recovers each step's rounding error exactly; their running
    sum corrects the difference to about an ulp of itself, which brought the worst error of the
    mixed -20 / ~0 gate tests from 0.36 to 0.04 of the float32 tolerance. XLA does not
    reassociate float arithmetic (no fast-math), so the correction survives compilation; were
    it optimised away, lo would be 0 and the uncorrected accuracy above would remain.
    """
    prev = jnp.concatenate([jnp.zeros_like(pre[..., :1, :]), pre[..., :-1, :]], axis=-2)
    total = prev + g
    g_rounded = total - prev
    err = (prev - (total - g_rounded)) + (g - g_rounded)  # prev + g == total + err exactly
    # total and pre round the same sum, a few ulps apart, so total - pre is exact.
    return jnp.cumsum((total - pre) + err, axis=-2)


def _decays(g: Array) -> _Decays:
    """Decay factors from log gates g (..., m, c2, k) (Yang et al. 2023, section 4.2).

    Each sum of log gates is formed directly, from sums inside one sub-chunk and totals of
    whole sub-chunks, never as a difference of two running sums over the chunk: with
    log_g = -20 those cancel badly (ulp(1280) = 1e-4) and the naive factors exp(-cumsum)
    overflow. Every exp has a non-positive argument. The sums are matmuls with 0/1 masks, so
    they add exactly the gates they span.
    """
    m, c2 = g.shape[-3], g.shape[-2]
    f32 = np.float32
    ones = np.ones((c2, c2), f32)
    i = np.arange(m)
    lower = i[:, None] > i[None, :]  # [i, j] = j < i
    between = (i[None, :, None] < i) & (i < i[:, None, None])  # [i, j, l] = j < l < i
    pre = jnp.einsum("tr,...irk->...itk", np.tril(ones), g, precision=_EXACT)
    suf = jnp.einsum("sr,...irk->...isk", np.triu(ones, 1), g, precision=_EXACT)
    tot = pre[..., -1, :]  # (..., m, k)
    tot_before = jnp.einsum("il,...lk->...ik", lower.astype(f32), tot, precision=_EXACT)
    tot_after = jnp.einsum("jl,...lk->...jk", lower.T.astype(f32), tot, precision=_EXACT)
    tot_between = jnp.einsum("ijl,...lk->...ijk", between.astype(f32), tot, precision=_EXACT)
    # Inside a sub-chunk the decay is a difference of running sums, but only over c2 steps,
    # and corrected for the sums' rounding; -inf above the diagonal before the exp, so masked
    # entries are exactly 0 and nothing overflows.
    lo = _rounding_residual(pre, g)
    expo = pre[..., :, None, :] - pre[..., None, :, :]
    expo = expo + (lo[..., :, None, :] - lo[..., None, :, :])
    causal = np.tril(np.ones((c2, c2), bool))[:, :, None]
    diag = jnp.where(causal, expo, -jnp.inf)
    return _Decays(
        from_start=jnp.exp(pre + tot_before[..., None, :]),
        to_end=jnp.exp(suf + tot_after[..., None, :]),
        from_sub_start=jnp.exp(pre),
        to_sub_end=jnp.exp(suf),
        between=jnp.exp(jnp.where(lower[:, :, None], tot_between, -jnp.inf)),
        diag=jnp.exp(diag),
        chunk=jnp.exp(tot.sum(axis=-2)),
    )


class _Masks(NamedTuple):
    """0/1 float masks of packed documents for chunks split into m sub-chunks of c2 steps
    (from :func:`effseq.ops.segments.chunk_masks`; h axis 1, broadcasting over heads)."""

    pairs: Array  # (G, b, 1, m, c2, m, c2) t and s in one document
    diag: Array  # (G, b, 1, m, c2, c2, 1) the same inside each sub-chunk
    carry_in: Array  # (G, b, 1, m, c2, 1) the state entering the chunk reaches t
    to_end: Array  # (G, b, 1, m, c2, 1) s reaches the chunk's final state
    carry_through: Array  # (G, b, 1, 1) the entering state reaches the final state
    not_start: Array  # (G, b, 1, c, 1) 0 where a document starts


def _sub_masks(masks, c2: int) -> _Masks:
    """:class:`_Masks` from float chunk masks (intra (G, b, 1, c, c), carry_in, to_end
    (G, b, 1, c), carry_through (G, b, 1)) and the starts (G, b, 1, c)."""
    intra, carry_in, to_end, carry_through, starts = masks
    *lead, c = carry_in.shape
    m = c // c2
    pairs = intra.reshape(*lead, m, c2, m, c2)
    diag = jnp.moveaxis(jnp.diagonal(pairs, axis1=-4, axis2=-2), -1, -3)  # (..., m, c2, c2)
    return _Masks(
        pairs=pairs,
        diag=diag[..., None],
        carry_in=carry_in.reshape(*lead, m, c2, 1),
        to_end=to_end.reshape(*lead, m, c2, 1),
        carry_through=carry_through[..., None],
        not_start=(1.0 - starts)[..., None],
    )


def _mask_decays(d: _Decays, mk: _Masks | None) -> _Decays:
    """The decays with every factor that crosses a document start set to 0; ``between`` is
    per pair of sub-chunks, so the scores it builds are masked with ``mk.pairs`` instead."""
    if mk is None:
        return d
    return d._replace(
        from_start=d.from_start * mk.carry_in,
        to_end=d.to_end * mk.to_end,
        diag=d.diag * mk.diag,
        chunk=d.chunk * mk.carry_through,
    )


def _chunk_states(S: Array, k_to_end: Array, v: Array, decay: Array) -> tuple[Array, Array]:
    """States entering and leaving each of G consecutive chunks.

    S (b, h, k, v) enters the first; k_to_end (G, b, h, m, c2, k), v (G, b, h, m, c2, v),
    decay (G, b, h, k). Returns (S_in, S_out), both (G, b, h, k, v).
    """
    dS = jnp.einsum("...isk,...isv->...kv", k_to_end, v)
    # S_n = diag(decay_n) S_{n-1} + K_n^T V_n; a few chunks, so the log-depth form (no loop).
    S_out = linear_scan_time_major(decay[..., None], dS, S, "associative")
    return jnp.concatenate([S[None], S_out[:-1]], axis=0), S_out


def _chunks_forward(S, q, k, v, g, mk=None):
    """Outputs of G consecutive chunks; all (G, b, h, m, c2, x) float32, q already scaled;
    ``mk`` the :class:`_Masks` of packed documents, or None.

    Returns (S_out, o, scores, scores_diag): the states after each chunk (G, b, h, k, v), the
    outputs (G, b, h, m, c2, v), and the intra-chunk attention scores between sub-chunks
    (G, b, h, m, c2, m, c2) and inside them (G, b, h, m, c2, c2).
    """
    d = _mask_decays(_decays(g), mk)
    S_in, S_out = _chunk_states(S, k * d.to_end, v, d.chunk)
    # Queries read the state entering their chunk, decayed from the chunk start.
    o = jnp.einsum("...itk,...kv->...itv", q * d.from_start, S_in)
    # Sub-chunk pairs i > j factor through the boundary before sub-chunk i (the paper's
    # secondary chunking): decay(s -> t) = to_sub_end(s) * between(i, j) * from_sub_start(t).
    k_weighted = d.between[..., :, :, None, :] * (k * d.to_sub_end)[..., None, :, :, :]
    scores = jnp.einsum("...itk,...ijsk->...itjs", q * d.from_sub_start, k_weighted)
    if mk is not None:
        scores = scores * mk.pairs
    scores_diag = jnp.sum(q[..., :, None, :] * k[..., None, :, :] * d.diag, axis=-1)
    o = o + jnp.einsum("...itjs,...jsv->...itv", scores, v)
    o = o + jnp.einsum("...its,...isv->...itv", scores_diag, v)
    return S_out, o, scores, scores_diag


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunks_step(S, q, k, v, g, c2, masks):
    """One scan step of the chunked form: G consecutive chunks.

    S (b, h, k, v) enters the first chunk; q, k, g (G, b, h, c, k) and v (G, b, h, c, v),
    float32, q already scaled; c2 divides c. ``masks``: None, or the packed documents' float
    masks (intra, carry_in, to_end, carry_through, starts) of these chunks (see
    :func:`_sub_masks`). Returns (S after the last chunk, o (G, b, h, c, v)).
    """
    mk = None if masks is None else _sub_masks(masks, c2)
    S_out, o, _, _ = _chunks_forward(S, *(_split_sub(x, c2) for x in (q, k, v, g)), mk)
    return S_out[-1], o.reshape(v.shape)


def _chunks_step_fwd(S, q, k, v, g, c2, masks):
    mk = None if masks is None else _sub_masks(masks, c2)
    S_out, o, scores, scores_diag = _chunks_forward(
        S, *(_split_sub(x, c2) for x in (q, k, v, g)), mk
    )
    return (S_out[-1], o.reshape(v.shape)), (S, q, k, v, g, masks, scores, scores_diag)


def _chunks_step_bwd(c2, residuals, cotangents):
    """Hand-derived backward of :func:`_chunks_step`, recomputing the decays.

    Plain autodiff of the forward gives the same gradients but builds, keeps or recomputes
    every (c2, c2, k) and (m, m, c2, k) intermediate several times over: it measured 1.4x
    slower fwd+bwd on CPU. The gate gradient uses the closed form of Yang et al. (2023): with
    Lambda the running sum of log gates inside a chunk, the chunk depends on Lambda only through
    exp(Lambda_t - Lambda_s) (query side +, key side -) and the decay of the state, so
    dL/dLambda_r = q_r * dq_r - k_r * dk_r (+ rowsum(S_out * dS_out) at the chunk's last step)
    and dL/dlog_g_r is the suffix sum over r' >= r of dL/dLambda_r' within the chunk.
    """
    S, q, k, v, g, masks, scores, scores_diag = residuals
    dS_last, do = cotangents
    G, b, h, c, _ = q.shape
    mk = None if masks is None else _sub_masks(masks, c2)
    q, k, v, g, do = (_split_sub(x, c2) for x in (q, k, v, g, do))
    d = _mask_decays(_decays(g), mk)
    q_in, k_out = q * d.from_sub_start, k * d.to_sub_end
    q_start, k_end = q * d.from_start, k * d.to_end
    S_in, S_out = _chunk_states(S, k_end, v, d.chunk)
    # Gradient w.r.t. the state entering each chunk: it runs backwards through the chunks,
    # dS_in[n] = decay_n * dS_in[n+1] + Q_n^T dO_n, from the cotangent of the last state.
    q_read = jnp.einsum("...itk,...itv->...kv", q_start, do)
    dS_in = linear_scan_time_major(d.chunk[..., None], q_read, dS_last, "associative", reverse=True)
    dS_out = jnp.concatenate([dS_in[1:], dS_last[None]], axis=0)

    dscores = jnp.einsum("...itv,...jsv->...itjs", do, v)
    if mk is not None:
        dscores = dscores * mk.pairs
    dscores_diag = jnp.einsum("...itv,...isv->...its", do, v)
    dv = (
        jnp.einsum("...itjs,...itv->...jsv", scores, do)
        + jnp.einsum("...its,...itv->...isv", scores_diag, do)
        + jnp.einsum("...isk,...kv->...isv", k_end, dS_out)
    )
    k_weighted = d.between[..., :, :, None, :] * k_out[..., None, :, :, :]  # (i, j, s, k)
    q_weighted = q_in[..., :, None, :, :] * d.between[..., :, :, None, :]  # (i, j, t, k)
    dq = (
        d.from_start * jnp.einsum("...itv,...kv->...itk", do, S_in)
        + d.from_sub_start * jnp.einsum("...itjs,...ijsk->...itk", dscores, k_weighted)
        + jnp.sum(dscores_diag[..., None] * k[..., None, :, :] * d.diag, axis=-2)
    )
    dk = (
        d.to_end * jnp.einsum("...isv,...kv->...isk", v, dS_out)
        + d.to_sub_end * jnp.einsum("...itjs,...ijtk->...jsk", dscores, q_weighted)
        + jnp.sum(dscores_diag[..., None] * q[..., :, None, :] * d.diag, axis=-3)
    )
    dlam = (q * dq - k * dk).reshape(G, b, h, c, -1)
    dlam = dlam.at[..., -1, :].add(jnp.sum(S_out * dS_out, axis=-1))
    dg = jnp.einsum("rt,...tk->...rk", np.triu(np.ones((c, c), np.float32)), dlam, precision=_EXACT)
    if mk is None:
        return (dS_in[0], *(x.reshape(G, b, h, c, x.shape[-1]) for x in (dq, dk, dv)), dg, None)
    # A start's own gate decays only the zeroed state: its gradient is exactly 0 (the suffix
    # sum above gives 0 up to rounding). The masks are constants.
    dg = dg * mk.not_start
    grads = (x.reshape(G, b, h, c, x.shape[-1]) for x in (dq, dk, dv))
    return (dS_in[0], *grads, dg, jax.tree.map(jnp.zeros_like, masks))


_chunks_step.defvjp(_chunks_step_fwd, _chunks_step_bwd)


def _chunked(q, k, v, log_g, h0, *, chunk_size: int, starts=None):
    """Chunkwise-parallel GLA (Yang et al. 2023, section 4); float32 inputs, q already scaled.

    A ``lax.scan`` carries the state across groups of G chunks (about 128 steps per group);
    inside a group the chunk states come from :func:`linear_scan_time_major` and all G chunks'
    outputs are computed at once. About 128 steps per scan iteration measured fastest on CPU
    for chunks of 16 to 64 (one chunk per iteration also hit a 2.5x slower path in XLA's CPU
    fusion), and scanning at all keeps each iteration's (c2, c2, k) intermediates in cache:
    computing every chunk at once was 2.5-3x slower. ``starts`` (b, t) bool: document starts
    of packed rows, or None.
    """
    t = q.shape[1]
    c2 = _sub_chunk_size(chunk_size)
    # A sequence shorter than a chunk runs as one chunk of the next multiple of c2.
    c = min(chunk_size, -(-t // c2) * c2)
    n = -(-t // c)
    group = 1 if n == 1 else min(n, max(2, _STEPS_PER_SCAN // c))
    n = -(-n // group) * group  # whole groups; padded chunks leave the state unchanged
    chunks = tuple(to_chunks(x, n, c) for x in (q, k, v, log_g))
    if starts is not None:
        masks = (*float_chunk_masks(starts, n, c), to_chunks(starts[..., None], n, c) * 1.0)
        chunks = (*chunks, masks)
    chunks = jax.tree.map(lambda x: x.reshape(n // group, group, *x.shape[1:]), chunks)
    if starts is None:
        S, o = jax.lax.scan(lambda S, xs: _chunks_step(S, *xs, c2, None), h0, chunks)
    else:
        S, o = jax.lax.scan(lambda S, xs: _chunks_step(S, *xs[:4], c2, xs[4]), h0, chunks)
    return from_chunks(o.reshape(n, *o.shape[2:]), t), S


def gated_linear_attention_reference(
    q: Array,
    k: Array,
    v: Array,
    log_g: Array,
    *,
    scale=None,
    h0: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Slow reference for :func:`gated_linear_attention`: a plain ``lax.scan`` over time.

    Eq. 3 of Yang et al. (2023) step by step in float32, differentiated by plain autodiff, the
    state zeroed before the step where a document of ``segment_ids`` starts. Shapes as in
    :func:`gated_linear_attention`. Returns ``(o, S_last)``: o (b, t, h, v) in the dtype of
    ``q``, S_last (b, h, k, v) in float32.
    """
    op = "gated_linear_attention_reference"
    _validate(op, q, k, v, log_g, h0)
    f32 = jnp.float32
    b, t, h, dk = q.shape
    starts = packed_starts(op, segment_ids, b, t)
    scale = default_scale(scale, dk)
    S = jnp.zeros((b, h, dk, v.shape[-1]), f32) if h0 is None else h0.astype(f32)

    def body(S, x):
        q_t, k_t, v_t, g_t, *start_t = x
        if start_t:
            S = jnp.where(start_t[0][:, None, None, None], 0.0, S)
        S = jnp.exp(g_t)[..., None] * S + k_t[..., :, None] * v_t[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", scale * q_t, S)

    xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, log_g))
    if starts is not None:
        xs = (*xs, jnp.moveaxis(starts, 1, 0))
    S, o = jax.lax.scan(body, S, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), S


__all__ = ["gated_linear_attention", "gated_linear_attention_reference", "gla_step"]
