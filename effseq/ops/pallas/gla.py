"""Pallas kernel for chunked gated linear attention (``impl="pallas"``).

Yang, Wang, Shen, Panda & Kim (2023), "Gated Linear Attention Transformers with
Hardware-Efficient Training" (arXiv:2312.06635), eq. 3 in the row-vector convention:

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t        o_t = (scale * q_t) S_t

**Forward (Pallas).** One kernel in the "fused chunk" form: the grid is parallel over
(batch, head, tiles of the value dimension) and each program walks the chunks of its row in a
``lax.fori_loop``, carrying its (dk, bv) slice of the state in float32 (dk rows: the state
update below is then an M = dk product, Hopper's wgmma at any bv >= 16). One kernel rather than two
(chunk states, then outputs) because the state never leaves the program without a backward
pass to feed (no (n, dk, dv) array of chunk states goes through HBM then), and the only
sequential part, the state carry, is one (c, dk)^T (c, bv) product per chunk. The value tiles
recompute the intra-chunk scores, which depend on q, k and the gates only: cheap next to the
state traffic they save for dv <= 64.

Per chunk of c steps, with Lambda_t the running sum of log gates from the chunk start
(inclusive), split into sub-chunks of c2 = 16 steps (Triton's smallest dot dimension):

* inter-chunk: o_t += (q_t * exp(Lambda_t)) S_in;
* between sub-chunks (the paper's secondary chunking): for rows t in sub-chunk i and columns
  s before it, with b the last step before sub-chunk i, the decay exp(Lambda_t - Lambda_s)
  factors through b as exp(Lambda_t - Lambda_b) * exp(Lambda_b - Lambda_s), both exponents
  <= 0, so per earlier sub-chunk j, o_i += [(q_i * exp(Lambda_i - Lambda_b))
  (k_j * exp(Lambda_b - Lambda_j))^T] v_j is two (c2-sized) matmuls;
* inside a sub-chunk, one key step s at a time: the score column A_ts = sum_d q_td k_sd
  exp(Lambda_td - Lambda_sd) for t >= s is an elementwise (c2, dk) product and row sum (the
  exponent masked to -inf for t < s), and o_i += A_{:,s} v_s a rank-one update;
* state: S_out = diag(exp(Lambda_c)) S_in + sum_j (k_j * exp(Lambda_c - Lambda_j))^T v_j.

Every loop (chunks, sub-chunks, earlier sub-chunks, steps inside one) is a ``fori_loop``, an
scf.for in Triton, not unrolled in Python: one sub-chunk's (c2, dk) tiles are live at a time,
which is what fits the kernels in a Hopper SM (``effseq.benchmarks.kernel_report``, dk = dv =
128, chunk 64, bf16: the unrolled form asked for 596 KiB of shared memory and spilled; this one
asks for under 64 KiB; see ``_BLOCK_V`` and ``_NUM_WARPS`` for the rest).

Every ``exp`` has a non-positive argument, so gates of any strength are safe (exp(-20) per
step is tested): products underflow to 0 where the true decay does. Lambda is formed in the
wrapper (XLA) as a float32 running sum per chunk plus its rounding residual
(:func:`effseq.ops.gla._rounding_residual`, TwoSum): differences Lambda_t - Lambda_s of nearby
steps late in a chunk of strong gates are otherwise off by an ulp of |Lambda| (ulp(1280) =
1.2e-4), a relative error of that size in decays near 1. The kernel adds (hi_t - hi_s) +
(lo_t - lo_s). This costs two float32 gate arrays of reads instead of one.

Dtypes: q, k, v enter the kernel in their own dtype (bfloat16 inputs halve their HBM reads) and
are upcast in it; the gated q and k, the scores and the state are float32 matmul operands
(:func:`_common.dot`: TF32 tensor-core passes at JAX's default precision on a GPU, IEEE float32
under ``jax_default_matmul_precision="highest"``). Rounding those gated operands to bfloat16
(fla's choice) measured up to 1.6x the suite's bfloat16 tolerance on the outputs (t = 37, chunk
32), all-float32 0.32x, which is the final rounding of o to bfloat16 alone. The output is
written in the dtype of q, the state in float32.

Padding (wrapper): t to a multiple of c with q = k = v = 0 and log_g = 0 (identity steps,
dropped); dk to a power of two >= 16 and dv to a multiple of the value tile with zeros, which
is exact: zero key channels of q and k add nothing to any score or output and their state rows
stay 0 (h0 padded with zeros), zero value columns give zero output columns; both are sliced
off.

**Backward (Pallas, gate gradient in XLA).** ``jax.custom_vjp``. The forward kernel also
writes the state entering each chunk and the final one, (n + 1, dk, dv) per (batch, head), as
the residual (fla's "chunk" form keeps them likewise; recomputing them would cost a second
sequential pass). A second kernel, on the same grid, walks the chunks in reverse carrying
dS^T in float32: dS_in = diag(exp(Lambda_c)) dS_out + (q * exp(Lambda))^T dO, and per chunk

* dq_t = exp(Lambda_t) * (dO_t S_in^T) + sum_{s <= t} (dO_t . v_s) k_s exp(Lambda_t - Lambda_s),
* dk_s = exp(Lambda_c - Lambda_s) * (v_s dS_out^T) + sum_{t >= s} (dO_t . v_s) q_t
  exp(Lambda_t - Lambda_s),
* dv_s = (k_s exp(Lambda_c - Lambda_s)) dS_out + sum_{t >= s} A_ts dO_t,

with the same factorisation of pairs of sub-chunks through a boundary step and one step at a
time inside a sub-chunk (dk_j, dv_j: a query step t against the keys of j; dq_i: a key step s
against the queries of i), so again every exp argument is <= 0. dq and dk are partial sums per
value tile; XLA adds them and forms the gate gradient in closed form (Yang et al. 2023,
section 4): dLambda_r = q_r dq_r - k_r dk_r, plus rowsum(S_out * dS_out) (written by the
kernel) at each chunk's last step, and dlog_g_r is the suffix sum of dLambda within the chunk.
dh0 is dS_in of the first chunk. Gradients w.r.t. q, k, v, log_g, h0 and the scale.
``BACKWARD = "xla"`` switches to recomputing through the op's XLA chunked path instead
(``jax.vjp`` of :func:`effseq.ops.gla._chunked`; no Pallas in the backward then), a fallback
checked by the tests too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from effseq.ops.pallas import _common
from effseq.typing import Array

OP = "gated_linear_attention"
# Sub-chunk length: the smallest dot dimension Triton accepts.
_SUB = _common.MIN_DOT
# Value-dimension tile of the grid. 32: at dk = dv = 128, chunk 64 (the GPU benchmark) the
# forward compiles for sm_90 without spills at 8 warps, and b * h * dv / 32 programs fill more
# of a Hopper's 132 SMs than / 64 (kernel_report: the backward spills 620 B at 32, more at 64).
_BLOCK_V = 32
# Triton launch parameters of both kernels: 8 warps halve the registers each (c2, dk) tile
# and the (dk, bv) state take per thread; 2 stages (loads of the next loop step prefetched).
_NUM_WARPS = 8
_NUM_STAGES = 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rows(ref, r0, n=_SUB):
    """Rows r0 .. r0 + n - 1 of a (T, d) block, as float32."""
    return ref[pl.ds(r0, n), :].astype(jnp.float32)


def _decay(hi_a, lo_a, hi_b, lo_b):
    """exp(Lambda_a - Lambda_b) from the (hi, lo) parts: (hi_a - hi_b) + (lo_a - lo_b)."""
    return jnp.exp((hi_a - hi_b) + (lo_a - lo_b))


def _masked_decay(hi_a, lo_a, hi_b, lo_b, keep):
    """As :func:`_decay`, 0 where ``keep`` is False (masked before the exp: no overflow)."""
    return jnp.exp(jnp.where(keep, (hi_a - hi_b) + (lo_a - lo_b), -jnp.inf))


def _kernel(
    scale_ref,
    q_ref,
    k_ref,
    v_ref,
    hi_ref,
    lo_ref,
    h0_ref,
    o_ref,
    s_ref,
    *states_ref,
    n_chunks: int,
    c: int,
):
    """One (batch, head, value tile): all chunks in order, the state carried as (dk, bv).

    ``states_ref`` (for the backward pass, optional): (n + 1, dk, bv), the state entering each
    chunk and the final one. Sub-chunks, the earlier sub-chunks of each and the steps inside
    one are loops (scf.for), not unrolled: one sub-chunk's tiles are live at a time."""
    f32 = jnp.float32
    scale = scale_ref[...].astype(f32)  # (1, 1)
    m = c // _SUB
    step = jax.lax.broadcasted_iota(jnp.int32, (_SUB, 1), 0)

    def chunk(n, st):
        if states_ref:
            states_ref[0][n] = st
        start = pl.multiple_of(n * c, c)

        def sub_chunk(i, carry):
            r0 = pl.multiple_of(start + i * _SUB, _SUB)
            q_i = _rows(q_ref, r0) * scale
            hi_i, lo_i = _rows(hi_ref, r0), _rows(lo_ref, r0)
            # Inter-chunk: queries read the entering state, decayed from the chunk start.
            o_i = _common.dot(q_i * jnp.exp(hi_i + lo_i), st)  # (c2, bv)
            # Earlier sub-chunks j < i, factored through the boundary step b = r0 - 1 (for
            # i = 0 the loop is empty; b = start keeps the read in bounds).
            b = jnp.maximum(r0 - 1, start)
            hi_b, lo_b = _rows(hi_ref, b, 1), _rows(lo_ref, b, 1)
            q_w = q_i * _decay(hi_i, lo_i, hi_b, lo_b)

            def earlier(j, o):
                s0 = pl.multiple_of(start + j * _SUB, _SUB)
                k_w = _rows(k_ref, s0) * _decay(hi_b, lo_b, _rows(hi_ref, s0), _rows(lo_ref, s0))
                scores = _common.dot(q_w, k_w, trans_b=True)  # (t in i, s in j)
                return o + _common.dot(scores, _rows(v_ref, s0))

            o_i = jax.lax.fori_loop(0, i, earlier, o_i)

            # Inside sub-chunk i, one key step s at a time: the score column A[:, s] as an
            # elementwise (c2, dk) product, then the rank-one update A[:, s] v_s.
            def inside(s, o):
                r = r0 + s
                e = _masked_decay(hi_i, lo_i, _rows(hi_ref, r, 1), _rows(lo_ref, r, 1), step >= s)
                a = jnp.sum(q_i * _rows(k_ref, r, 1) * e, axis=1, keepdims=True)  # (c2, 1)
                return o + a * _rows(v_ref, r, 1)

            o_i = jax.lax.fori_loop(0, _SUB, inside, o_i)
            o_ref[pl.ds(r0, _SUB), :] = o_i.astype(o_ref.dtype)
            return carry

        jax.lax.fori_loop(0, m, sub_chunk, 0)
        # State: S_out = diag(exp(Lambda_c)) S_in + (k * exp(Lambda_c - Lambda))^T v.
        last = start + c - 1
        hi_l, lo_l = _rows(hi_ref, last, 1), _rows(lo_ref, last, 1)

        def update(j, acc):
            s0 = pl.multiple_of(start + j * _SUB, _SUB)
            k_e = _rows(k_ref, s0) * _decay(hi_l, lo_l, _rows(hi_ref, s0), _rows(lo_ref, s0))
            return acc + _common.dot(k_e, _rows(v_ref, s0), trans_a=True)  # (dk, bv)

        return jax.lax.fori_loop(0, m, update, st * jnp.exp(hi_l + lo_l).T)

    st = jax.lax.fori_loop(0, n_chunks, chunk, h0_ref[...].astype(f32))
    s_ref[...] = st
    if states_ref:
        states_ref[0][n_chunks] = st


def _bwd_kernel(
    scale_ref,
    q_ref,
    k_ref,
    v_ref,
    hi_ref,
    lo_ref,
    do_ref,
    states_ref,
    ds_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    dh0_ref,
    rt_ref,
    *,
    n_chunks: int,
    c: int,
):
    """Backward of one (batch, head, value tile): chunks in reverse order, carrying dS (dk, bv).

    Per chunk, pass B walks the key sub-chunks j (dk_j, dv_j: the later sub-chunks i > j
    through the boundary before i, then the query steps t inside j one at a time), then dS is
    decayed and pass A walks the query sub-chunks i (dq_i and the state gradient: the earlier
    sub-chunks, then the key steps s inside i). All loops are scf.for; the pair scores are
    recomputed in each pass."""
    f32 = jnp.float32
    scale = scale_ref[...].astype(f32)
    m = c // _SUB
    step = jax.lax.broadcasted_iota(jnp.int32, (_SUB, 1), 0)

    def chunk(r, dst):
        n = n_chunks - 1 - r
        start = pl.multiple_of(n * c, c)
        last = start + c - 1
        hi_l, lo_l = _rows(hi_ref, last, 1), _rows(lo_ref, last, 1)
        # dLambda at the chunk's last step through the decay of the state: rowsum(S_out dS_out).
        rt_ref[pl.ds(n, 1), :] = jnp.sum(states_ref[n + 1] * dst, axis=1)[None, :]

        # Pass B: key sub-chunks j -> dk_j, dv_j.
        def key_sub(j, carry):
            s0 = pl.multiple_of(start + j * _SUB, _SUB)
            k_j, v_j = _rows(k_ref, s0), _rows(v_ref, s0)
            hi_j, lo_j = _rows(hi_ref, s0), _rows(lo_ref, s0)
            e_k = _decay(hi_l, lo_l, hi_j, lo_j)
            # (dk, bv) x (bv, c2), transposed back: an M = dk product, which spills less than
            # the M = c2 one (kernel_report: 620 B against 672).
            dk_j = e_k * _common.dot(dst, v_j, trans_b=True).T  # (c2, dk)
            dv_j = _common.dot(k_j * e_k, dst)  # (c2, bv)

            def later(i, acc):
                dk_j, dv_j = acc
                r0 = pl.multiple_of(start + i * _SUB, _SUB)
                hi_b, lo_b = _rows(hi_ref, r0 - 1, 1), _rows(lo_ref, r0 - 1, 1)
                q_w = (_rows(q_ref, r0) * scale) * _decay(
                    _rows(hi_ref, r0), _rows(lo_ref, r0), hi_b, lo_b
                )
                g_k = _decay(hi_b, lo_b, hi_j, lo_j)
                do_i = _rows(do_ref, r0)
                scores = _common.dot(q_w, k_j * g_k, trans_b=True)  # (t in i, s in j)
                dscores = _common.dot(do_i, v_j, trans_b=True)
                dv_j = dv_j + _common.dot(scores, do_i, trans_a=True)
                dk_j = dk_j + g_k * _common.dot(dscores, q_w, trans_a=True)
                return dk_j, dv_j

            dk_j, dv_j = jax.lax.fori_loop(j + 1, m, later, (dk_j, dv_j))

            # Inside sub-chunk j, one query step t at a time: rows s <= t of the decays.
            def inside(t, acc):
                dk_j, dv_j = acc
                r = s0 + t
                e = _masked_decay(_rows(hi_ref, r, 1), _rows(lo_ref, r, 1), hi_j, lo_j, step <= t)
                q_e = (_rows(q_ref, r, 1) * scale) * e  # (c2, dk)
                do_t = _rows(do_ref, r, 1)
                a = jnp.sum(q_e * k_j, axis=1, keepdims=True)  # A[t, s], (c2, 1)
                da = jnp.sum(v_j * do_t, axis=1, keepdims=True)  # dA[t, s]
                return dk_j + da * q_e, dv_j + a * do_t

            dk_j, dv_j = jax.lax.fori_loop(0, _SUB, inside, (dk_j, dv_j))
            dk_ref[pl.ds(s0, _SUB), :] = dk_j
            dv_ref[pl.ds(s0, _SUB), :] = dv_j
            return carry

        jax.lax.fori_loop(0, m, key_sub, 0)

        # Pass A: query sub-chunks i -> dq_i and dS_in.
        def query_sub(i, dst):
            r0 = pl.multiple_of(start + i * _SUB, _SUB)
            q_i = _rows(q_ref, r0) * scale
            hi_i, lo_i = _rows(hi_ref, r0), _rows(lo_ref, r0)
            do_i = _rows(do_ref, r0)
            e_q = jnp.exp(hi_i + lo_i)
            dq_i = e_q * _common.dot(do_i, states_ref[n], trans_b=True)  # (c2, dk)
            dst = dst + _common.dot(q_i * e_q, do_i, trans_a=True)  # (dk, bv)
            b = jnp.maximum(r0 - 1, start)
            hi_b, lo_b = _rows(hi_ref, b, 1), _rows(lo_ref, b, 1)

            def earlier(j, acc):
                s0 = pl.multiple_of(start + j * _SUB, _SUB)
                k_w = _rows(k_ref, s0) * _decay(hi_b, lo_b, _rows(hi_ref, s0), _rows(lo_ref, s0))
                dscores = _common.dot(do_i, _rows(v_ref, s0), trans_b=True)
                return acc + _common.dot(dscores, k_w)

            acc = jax.lax.fori_loop(0, i, earlier, jnp.zeros_like(dq_i))
            dq_i = dq_i + _decay(hi_i, lo_i, hi_b, lo_b) * acc

            def inside(s, dq):
                r = r0 + s
                e = _masked_decay(hi_i, lo_i, _rows(hi_ref, r, 1), _rows(lo_ref, r, 1), step >= s)
                da = jnp.sum(do_i * _rows(v_ref, r, 1), axis=1, keepdims=True)  # dA[:, s]
                return dq + da * (_rows(k_ref, r, 1) * e)

            dq_ref[pl.ds(r0, _SUB), :] = jax.lax.fori_loop(0, _SUB, inside, dq_i)
            return dst

        return jax.lax.fori_loop(0, m, query_sub, dst * jnp.exp(hi_l + lo_l).T)

    dh0_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk, ds_ref[...].astype(f32))


def _running_log_gates(log_g: Array, c: int) -> tuple[Array, Array]:
    """Per-chunk running sums of log gates (b, T, h, k) -> (hi, lo), both float32, with
    hi + lo the running sum from each chunk's start to nearly an ulp of the difference
    (:func:`effseq.ops.gla._rounding_residual`)."""
    from effseq.ops.gla import _rounding_residual

    b, T, h, dk = log_g.shape
    g = jnp.moveaxis(log_g.reshape(b, T // c, c, h, dk), 2, -2)  # (b, n, h, c, k)
    hi = jnp.cumsum(g, axis=-2)
    lo = _rounding_residual(hi, g)
    back = lambda x: jnp.moveaxis(x, -2, 2).reshape(b, T, h, dk)  # noqa: E731
    return back(hi), back(lo)


class _Layout(NamedTuple):
    """Padded sizes: chunk c, time T (a multiple of c), key dk (a power of two >= 16), value
    tile bv and value dv (a multiple of bv)."""

    c: int
    T: int
    dk: int
    bv: int
    dv: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.T // self.c, self.dv // self.bv


def _layout(t: int, dk: int, dv: int, chunk_size: int) -> _Layout:
    c = min(chunk_size, max(_SUB, _next_pow2(t)))
    bv = min(_BLOCK_V, max(_SUB, _next_pow2(dv)))
    return _Layout(c, -(-t // c) * c, max(_SUB, _next_pow2(dk)), bv, -(-dv // bv) * bv)


def _pad(x: Array, T: int, d: int) -> Array:
    """(b, t, h, x) -> (b, T, h, d) with zeros."""
    return _common.pad_axis(_common.pad_axis(x, 1, T), 3, d)


def _pad_state(S: Array, lay: _Layout) -> Array:
    return _common.pad_axis(_common.pad_axis(S, 2, lay.dk), 3, lay.dv)


def _specs(lay: _Layout):
    """BlockSpecs over the grid (batch, head, value tile): a scalar, (T, dk) and (T, bv)
    sequences of one (batch, head), a (dk, bv) state tile, and the (n + 1, dk, bv) chunk states."""
    scalar = pl.BlockSpec((1, 1), lambda ib, ih, iv: (0, 0))
    seq_k = pl.BlockSpec((None, lay.T, None, lay.dk), lambda ib, ih, iv: (ib, 0, ih, 0))
    seq_v = pl.BlockSpec((None, lay.T, None, lay.bv), lambda ib, ih, iv: (ib, 0, ih, iv))
    state = pl.BlockSpec((None, None, lay.dk, lay.bv), lambda ib, ih, iv: (ib, ih, 0, iv))
    n = lay.T // lay.c
    states = pl.BlockSpec(
        (None, None, n + 1, lay.dk, lay.bv), lambda ib, ih, iv: (ib, ih, 0, 0, iv)
    )
    return scalar, seq_k, seq_v, state, states


def _forward(q, k, v, log_g, h0, scale, *, chunk_size: int, with_states: bool = False):
    """The Pallas forward: shapes as the public op, h0 float32. Returns (o in q's dtype,
    S_last float32) and, ``with_states``, the padded chunk states
    (b, h, n + 1, dk_padded, dv_padded) float32 for the backward pass."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    lay = _layout(t, dk, dv, chunk_size)
    n, nv = lay.grid
    q, k, log_g = (_pad(x, lay.T, lay.dk) for x in (q, k, log_g))
    hi, lo = _running_log_gates(log_g.astype(jnp.float32), lay.c)
    scalar, seq_k, seq_v, state, states = _specs(lay)
    out_shape = [
        jax.ShapeDtypeStruct((b, lay.T, h, lay.dv), q.dtype),
        jax.ShapeDtypeStruct((b, h, lay.dk, lay.dv), jnp.float32),
    ]
    out_specs = [seq_v, state]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, n + 1, lay.dk, lay.dv), jnp.float32))
        out_specs.append(states)
    o, S, *rest = _common.call(
        functools.partial(_kernel, n_chunks=n, c=lay.c),
        out_shape=tuple(out_shape),
        grid=(b, h, nv),
        in_specs=[scalar, seq_k, seq_k, seq_v, seq_k, seq_k, state],
        out_specs=tuple(out_specs),
        name="gla_chunk_fwd",
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )(
        jnp.asarray(scale, jnp.float32).reshape(1, 1),
        q,
        k,
        _pad(v, lay.T, lay.dv),
        hi,
        lo,
        _pad_state(h0, lay),
    )
    out = (o[:, :t, :, :dv], S[:, :, :dk, :dv])
    return (out, rest[0]) if with_states else out


def _backward(q, k, v, log_g, scale, states, do, dS, *, chunk_size: int):
    """The Pallas backward: gradients of (q, k, v, log_g, h0, scale) from the chunk states of
    :func:`_forward` and the cotangents (do, dS) of (o, S_last).

    The kernel gives dq (w.r.t. the scaled query) and dk per value tile, dv, dh0 and, per chunk,
    rowsum(S_out * dS_out); XLA adds the value tiles and forms the gate gradient in closed form
    (Yang et al. 2023): dLambda_r = q_r dq_r - k_r dk_r (+ that row sum at each chunk's last
    step), and dlog_g_r is its suffix sum over r' >= r within the chunk.
    """
    f32 = jnp.float32
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    lay = _layout(t, dk, dv, chunk_size)
    n, nv = lay.grid
    qp, kp, gp = (_pad(x, lay.T, lay.dk) for x in (q, k, log_g))
    hi, lo = _running_log_gates(gp.astype(f32), lay.c)
    scalar, seq_k, seq_v, state, states_spec = _specs(lay)
    per_tile = pl.BlockSpec(
        (None, None, lay.T, None, lay.dk), lambda ib, ih, iv: (ib, iv, 0, ih, 0)
    )
    rows = pl.BlockSpec((None, None, None, n, lay.dk), lambda ib, ih, iv: (ib, ih, iv, 0, 0))
    scale = jnp.asarray(scale, f32)
    dq_s, dk_, dv_, dh0, rt = _common.call(
        functools.partial(_bwd_kernel, n_chunks=n, c=lay.c),
        out_shape=(
            jax.ShapeDtypeStruct((b, nv, lay.T, h, lay.dk), f32),
            jax.ShapeDtypeStruct((b, nv, lay.T, h, lay.dk), f32),
            jax.ShapeDtypeStruct((b, lay.T, h, lay.dv), f32),
            jax.ShapeDtypeStruct((b, h, lay.dk, lay.dv), f32),
            jax.ShapeDtypeStruct((b, h, nv, n, lay.dk), f32),
        ),
        grid=(b, h, nv),
        in_specs=[scalar, seq_k, seq_k, seq_v, seq_k, seq_k, seq_v, states_spec, state],
        out_specs=(per_tile, per_tile, seq_v, state, rows),
        name="gla_chunk_bwd",
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )(
        scale.reshape(1, 1),
        qp,
        kp,
        _pad(v, lay.T, lay.dv),
        hi,
        lo,
        _pad(do, lay.T, lay.dv),
        states,
        _pad_state(dS.astype(f32), lay),
    )
    dq_s, dk_ = dq_s.sum(axis=1), dk_.sum(axis=1)
    q_s = qp.astype(f32) * scale
    dlam = (q_s * dq_s - kp.astype(f32) * dk_).reshape(b, n, lay.c, h, lay.dk)
    dlam = dlam.at[:, :, -1].add(jnp.moveaxis(rt.sum(axis=2), 2, 1))
    dg = jnp.flip(jnp.cumsum(jnp.flip(dlam, axis=2), axis=2), axis=2).reshape(dq_s.shape)
    dscale = jnp.sum(qp.astype(f32) * dq_s)
    cut = lambda x, d, like: x[:, :t, :, :d].astype(like.dtype)  # noqa: E731
    return (
        cut(dq_s * scale, dk, q),
        cut(dk_, dk, k),
        cut(dv_, dv, v),
        cut(dg, dk, log_g),
        dh0[:, :, :dk, :dv],
        dscale,
    )


def _xla(q, k, v, log_g, h0, scale, *, chunk_size: int):
    """The same function through the op's XLA chunked path (float32 inside)."""
    from effseq.ops.gla import _chunked

    f32 = jnp.float32
    o, S = _chunked(
        q.astype(f32) * scale,
        k.astype(f32),
        v.astype(f32),
        log_g.astype(f32),
        h0,
        chunk_size=chunk_size,
    )
    return o.astype(q.dtype), S


# "pallas": the backward kernel above; "xla": recompute through the XLA chunked path's VJP
# (kept as a fallback, and as a second check of the kernel in the tests).
BACKWARD = "pallas"


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gla(q, k, v, log_g, h0, scale, chunk_size):
    return _forward(q, k, v, log_g, h0, scale, chunk_size=chunk_size)


def _gla_fwd(q, k, v, log_g, h0, scale, chunk_size):
    args = (q, k, v, log_g, h0, scale)
    if BACKWARD == "xla":
        return _forward(*args, chunk_size=chunk_size), (None, args)
    out, states = _forward(*args, chunk_size=chunk_size, with_states=True)
    return out, (states, args)


def _gla_bwd(chunk_size, residuals, cotangents):
    states, (q, k, v, log_g, h0, scale) = residuals
    if states is None:
        _, vjp = jax.vjp(functools.partial(_xla, chunk_size=chunk_size), q, k, v, log_g, h0, scale)
        return vjp(cotangents)
    return _backward(q, k, v, log_g, scale, states, *cotangents, chunk_size=chunk_size)


_gla.defvjp(_gla_fwd, _gla_bwd)


def gated_linear_attention_pallas(
    q: Array, k: Array, v: Array, log_g: Array, h0: Array, scale, *, chunk_size: int
) -> tuple[Array, Array]:
    """Single-shard, unpacked GLA through the Pallas kernel; inputs already validated.

    Args:
      q, k: (b, t, h, k); v: (b, t, h, v); log_g: (b, t, h, k) <= 0; h0: (b, h, k, v) float32;
      scale: the query scale (a float or a scalar array).
      chunk_size: chunk length c, a power of two >= 16 (a sequence shorter than c runs as one
        chunk: the smallest power of two >= 16 and >= t).

    Returns:
      ``(o, S_last)``: o (b, t, h, v) in the dtype of q, S_last (b, h, k, v) float32.
    """
    _common.check_tile(OP, "chunk_size", chunk_size)
    scale = jnp.asarray(scale, jnp.float32)
    return _gla(q, k, v, log_g, h0.astype(jnp.float32), scale, chunk_size)


__all__ = ["gated_linear_attention_pallas"]
