"""Pallas kernel for chunked gated linear attention (``impl="pallas"``).

Yang, Wang, Shen, Panda & Kim (2023), "Gated Linear Attention Transformers with
Hardware-Efficient Training" (arXiv:2312.06635), eq. 3 in the row-vector convention:

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t        o_t = (scale * q_t) S_t

**Forward (Pallas).** One kernel in the "fused chunk" form: the grid is parallel over
(batch, head, tiles of the value dimension) and each program walks the chunks of its row in a
``lax.fori_loop``, carrying its (dk, bv) slice of the state in float32 (held transposed,
(bv, dk), so that every gate multiplies along the lane axis). One kernel rather than two
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
  <= 0, so o_i += [(q_i * exp(Lambda_i - Lambda_b)) (k * exp(Lambda_b - Lambda))^T] v is two
  matmuls (columns at or after sub-chunk i are masked to 0; they are c wide, a power of two);
* inside a sub-chunk: A_ts = sum_d q_td k_sd exp(Lambda_td - Lambda_sd) for s <= t, formed
  elementwise over (c2, c2, dkt) blocks of dkt <= 32 key channels, the exponent masked to
  -inf above the diagonal;
* state: S_out = diag(exp(Lambda_c)) S_in + (k * exp(Lambda_c - Lambda))^T v.

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
writes the state entering each chunk and the final one, (n + 1, dv, dk) per (batch, head), as
the residual (fla's "chunk" form keeps them likewise; recomputing them would cost a second
sequential pass). A second kernel, on the same grid, walks the chunks in reverse carrying
dS^T in float32: dS_in = diag(exp(Lambda_c)) dS_out + (q * exp(Lambda))^T dO, and per chunk

* dq_t = exp(Lambda_t) * (dO_t S_in^T) + sum_{s <= t} (dO_t . v_s) k_s exp(Lambda_t - Lambda_s),
* dk_s = exp(Lambda_c - Lambda_s) * (v_s dS_out^T) + sum_{t >= s} (dO_t . v_s) q_t
  exp(Lambda_t - Lambda_s),
* dv_s = (k_s exp(Lambda_c - Lambda_s)) dS_out + sum_{t >= s} A_ts dO_t,

with the same factorisation of pairs of sub-chunks through a boundary step and (c2, c2, dkt)
blocks inside sub-chunks, so again every exp argument is <= 0. dq and dk are partial sums per
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
# Value-dimension tile of the grid.
_BLOCK_V = 64
# Key channels per block of the intra-sub-chunk (c2, c2, k) product.
_DIAG_K = 32


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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
    """One (batch, head, value tile): all chunks in order, the state carried as (bv, dk).

    ``states_ref`` (for the backward pass, optional): (n + 1, bv, dk), the transposed state
    entering each chunk and the final one."""
    f32 = jnp.float32
    scale = scale_ref[...].astype(f32)  # (1, 1)
    m = c // _SUB
    dk = q_ref.shape[-1]
    dkt = min(dk, _DIAG_K)
    rows_c = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    sub_t = jax.lax.broadcasted_iota(jnp.int32, (_SUB, _SUB, 1), 0)
    sub_s = jax.lax.broadcasted_iota(jnp.int32, (_SUB, _SUB, 1), 1)
    causal = sub_t >= sub_s

    def chunk(n, st):
        if states_ref:
            states_ref[0][n] = st
        start = pl.multiple_of(n * c, c)
        whole = pl.ds(start, c)
        # Whole-chunk tiles are loaded where they are used (L1/L2 hits after the first), not
        # held across the sub-chunk loop: fewer live registers per program.
        for i in range(m):
            rows = pl.ds(start + i * _SUB, _SUB)
            q_i = q_ref[rows, :].astype(f32) * scale
            hi_i = hi_ref[rows, :]
            lo_i = lo_ref[rows, :]
            # Inter-chunk: queries read the entering state, decayed from the chunk start.
            o_i = _common.dot(q_i * jnp.exp(hi_i + lo_i), st, trans_b=True)
            if i:
                # Sub-chunks before i, factored through the boundary step b = i * c2 - 1.
                bnd = pl.ds(start + i * _SUB - 1, 1)
                hi_b = hi_ref[bnd, :]
                lo_b = lo_ref[bnd, :]
                q_w = q_i * jnp.exp((hi_i - hi_b) + (lo_i - lo_b))
                expo = (hi_b - hi_ref[whole, :]) + (lo_b - lo_ref[whole, :])
                expo = jnp.where(rows_c < i * _SUB, expo, -jnp.inf)
                k_w = k_ref[whole, :].astype(f32) * jnp.exp(expo)
                scores = _common.dot(q_w, k_w, trans_b=True)  # (c2, c)
                o_i = o_i + _common.dot(scores, v_ref[whole, :].astype(f32))
            # Inside sub-chunk i: pairwise decays, elementwise over (c2, c2, dkt) blocks of
            # key channels (dkt <= 32 bounds the live block to 8192 values per program).
            diag = jnp.zeros((_SUB, _SUB), f32)
            for j in range(dk // dkt):
                cols = pl.ds(j * dkt, dkt)
                q_j = q_ref[rows, cols].astype(f32) * scale
                k_j = k_ref[rows, cols].astype(f32)
                hi_j = hi_ref[rows, cols]
                lo_j = lo_ref[rows, cols]
                expo = (hi_j[:, None, :] - hi_j[None, :, :]) + (lo_j[:, None, :] - lo_j[None, :, :])
                decay = jnp.exp(jnp.where(causal, expo, -jnp.inf))
                diag = diag + jnp.sum(q_j[:, None, :] * k_j[None, :, :] * decay, axis=-1)
            o_i = o_i + _common.dot(diag, v_ref[rows, :].astype(f32))
            o_ref[rows, :] = o_i.astype(o_ref.dtype)
        # State: S_out = diag(exp(Lambda_c)) S_in + (k * exp(Lambda_c - Lambda))^T v.
        last = pl.ds(start + c - 1, 1)
        hi_l = hi_ref[last, :]
        lo_l = lo_ref[last, :]
        k_end = k_ref[whole, :].astype(f32)
        k_end = k_end * jnp.exp((hi_l - hi_ref[whole, :]) + (lo_l - lo_ref[whole, :]))
        v_all = v_ref[whole, :].astype(f32)
        return st * jnp.exp(hi_l + lo_l) + _common.dot(v_all, k_end, trans_a=True)

    st = jax.lax.fori_loop(0, n_chunks, chunk, h0_ref[...].astype(f32).T)
    s_ref[...] = st.T
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
    """Backward of one (batch, head, value tile): chunks in reverse order, carrying dS^T.

    Everything indexed by key channel is held in column blocks of dkt <= 32 (Python lists),
    the intra-chunk terms in (c2, c2) blocks: pairs of sub-chunks (t in i, s in j < i) factor
    through the last step before i, as in the forward. Pass B walks the key sub-chunks j
    (dk_j, dv_j), pass A the query sub-chunks i (dq_i and the state gradient), so that only one
    sub-chunk's accumulators are live at a time; the pair scores are recomputed in each."""
    f32 = jnp.float32
    scale = scale_ref[...].astype(f32)
    m = c // _SUB
    dk = q_ref.shape[-1]
    dkt = min(dk, _DIAG_K)
    cols = [pl.ds(j * dkt, dkt) for j in range(dk // dkt)]
    sub_t = jax.lax.broadcasted_iota(jnp.int32, (_SUB, _SUB, 1), 0)
    sub_s = jax.lax.broadcasted_iota(jnp.int32, (_SUB, _SUB, 1), 1)
    causal = sub_t >= sub_s

    def blocks(ref, rows, mul=None):
        out = [ref[rows, col].astype(f32) for col in cols]
        return out if mul is None else [x * mul for x in out]

    def decays(hi, lo):
        """(c2, c2, dkt) exp(Lambda_t - Lambda_s) for s <= t inside a sub-chunk, else 0."""
        expo = (hi[:, None, :] - hi[None, :, :]) + (lo[:, None, :] - lo[None, :, :])
        return jnp.exp(jnp.where(causal, expo, -jnp.inf))

    def chunk(r, dst):
        n = n_chunks - 1 - r
        start = pl.multiple_of(n * c, c)
        sub = [pl.ds(start + i * _SUB, _SUB) for i in range(m)]
        last = pl.ds(start + c - 1, 1)
        hi_l, lo_l = blocks(hi_ref, last), blocks(lo_ref, last)
        st_in = [states_ref[n, :, col] for col in cols]  # (bv, dkt)
        # dLambda at the chunk's last step through the decay of the state: rowsum(S_out dS_out).
        for col, d in zip(cols, dst, strict=True):
            rt_ref[pl.ds(n, 1), col] = jnp.sum(states_ref[n + 1, :, col] * d, axis=0)[None, :]

        def boundary(i):
            bnd = pl.ds(start + i * _SUB - 1, 1)
            return blocks(hi_ref, bnd), blocks(lo_ref, bnd)

        def pair(i, j, hb, lb):
            """Gated q of sub-chunk i, gated k of sub-chunk j < i, their factors, scores."""
            hi_i, lo_i = blocks(hi_ref, sub[i]), blocks(lo_ref, sub[i])
            hi_j, lo_j = blocks(hi_ref, sub[j]), blocks(lo_ref, sub[j])
            g_q = [
                jnp.exp((a - b) + (x - y)) for a, b, x, y in zip(hi_i, hb, lo_i, lb, strict=True)
            ]
            g_k = [
                jnp.exp((b - a) + (y - x)) for a, b, x, y in zip(hi_j, hb, lo_j, lb, strict=True)
            ]
            q_w = [x * g for x, g in zip(blocks(q_ref, sub[i], scale), g_q, strict=True)]
            k_w = [x * g for x, g in zip(blocks(k_ref, sub[j]), g_k, strict=True)]
            scores = sum(_common.dot(a, b, trans_b=True) for a, b in zip(q_w, k_w, strict=True))
            return q_w, k_w, g_q, g_k, scores

        # Pass B: key sub-chunks j -> dk_j, dv_j.
        for j in range(m):
            v_j = v_ref[sub[j], :].astype(f32)
            do_j = do_ref[sub[j], :].astype(f32)
            hi_j, lo_j = blocks(hi_ref, sub[j]), blocks(lo_ref, sub[j])
            k_j = blocks(k_ref, sub[j])
            e_k = [
                jnp.exp((a - b) + (x - y))
                for a, b, x, y in zip(hi_l, hi_j, lo_l, lo_j, strict=True)
            ]
            dk_j = [e * _common.dot(v_j, d) for e, d in zip(e_k, dst, strict=True)]
            dv_j = sum(
                _common.dot(x * e, d, trans_b=True) for x, e, d in zip(k_j, e_k, dst, strict=True)
            )
            for i in range(j + 1, m):
                hb, lb = boundary(i)
                q_w, _, _, g_k, scores = pair(i, j, hb, lb)
                do_i = do_ref[sub[i], :].astype(f32)
                dscores = _common.dot(do_i, v_j, trans_b=True)  # (t in i, s in j)
                dv_j = dv_j + _common.dot(scores, do_i, trans_a=True)
                dk_j = [
                    a + g * _common.dot(dscores, w, trans_a=True)
                    for a, g, w in zip(dk_j, g_k, q_w, strict=True)
                ]
            q_j = blocks(q_ref, sub[j], scale)
            dec = [decays(a, b) for a, b in zip(hi_j, lo_j, strict=True)]
            scores = sum(
                jnp.sum(a[:, None, :] * b[None, :, :] * d, axis=-1)
                for a, b, d in zip(q_j, k_j, dec, strict=True)
            )
            dscores = _common.dot(do_j, v_j, trans_b=True)
            dv_ref[sub[j], :] = dv_j + _common.dot(scores, do_j, trans_a=True)
            for col, a, x, d in zip(cols, dk_j, q_j, dec, strict=True):
                dk_ref[sub[j], col] = a + jnp.sum(dscores[:, :, None] * x[:, None, :] * d, axis=0)

        # Pass A: query sub-chunks i -> dq_i and dS_in.
        new = [d * jnp.exp(a + b) for d, a, b in zip(dst, hi_l, lo_l, strict=True)]
        for i in range(m):
            do_i = do_ref[sub[i], :].astype(f32)
            hi_i, lo_i = blocks(hi_ref, sub[i]), blocks(lo_ref, sub[i])
            q_i = blocks(q_ref, sub[i], scale)
            e_q = [jnp.exp(a + b) for a, b in zip(hi_i, lo_i, strict=True)]
            dq_i = [e * _common.dot(do_i, s) for e, s in zip(e_q, st_in, strict=True)]
            new = [
                d + _common.dot(do_i, x * e, trans_a=True)
                for d, x, e in zip(new, q_i, e_q, strict=True)
            ]
            if i:
                hb, lb = boundary(i)
                for j in range(i):
                    _, k_w, g_q, _, _ = pair(i, j, hb, lb)
                    dscores = _common.dot(do_i, v_ref[sub[j], :].astype(f32), trans_b=True)
                    dq_i = [
                        a + g * _common.dot(dscores, w)
                        for a, g, w in zip(dq_i, g_q, k_w, strict=True)
                    ]
            k_i = blocks(k_ref, sub[i])
            dscores = _common.dot(do_i, v_ref[sub[i], :].astype(f32), trans_b=True)
            for col, a, x, h_, l_ in zip(cols, dq_i, k_i, hi_i, lo_i, strict=True):
                d = decays(h_, l_)
                dq_ref[sub[i], col] = a + jnp.sum(dscores[:, :, None] * x[None, :, :] * d, axis=1)
        return new

    dst = jax.lax.fori_loop(0, n_chunks, chunk, [ds_ref[col, :].T for col in cols])
    for col, d in zip(cols, dst, strict=True):
        dh0_ref[col, :] = d.T


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
    sequences of one (batch, head), a (dk, bv) state tile, and the (n + 1, bv, dk) chunk states."""
    scalar = pl.BlockSpec((1, 1), lambda ib, ih, iv: (0, 0))
    seq_k = pl.BlockSpec((None, lay.T, None, lay.dk), lambda ib, ih, iv: (ib, 0, ih, 0))
    seq_v = pl.BlockSpec((None, lay.T, None, lay.bv), lambda ib, ih, iv: (ib, 0, ih, iv))
    state = pl.BlockSpec((None, None, lay.dk, lay.bv), lambda ib, ih, iv: (ib, ih, 0, iv))
    n = lay.T // lay.c
    states = pl.BlockSpec(
        (None, None, n + 1, lay.bv, lay.dk), lambda ib, ih, iv: (ib, ih, 0, iv, 0)
    )
    return scalar, seq_k, seq_v, state, states


def _forward(q, k, v, log_g, h0, scale, *, chunk_size: int, with_states: bool = False):
    """The Pallas forward: shapes as the public op, h0 float32. Returns (o in q's dtype,
    S_last float32) and, ``with_states``, the padded transposed chunk states
    (b, h, n + 1, dv_padded, dk_padded) float32 for the backward pass."""
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
        out_shape.append(jax.ShapeDtypeStruct((b, h, n + 1, lay.dv, lay.dk), jnp.float32))
        out_specs.append(states)
    o, S, *rest = _common.call(
        functools.partial(_kernel, n_chunks=n, c=lay.c),
        out_shape=tuple(out_shape),
        grid=(b, h, nv),
        in_specs=[scalar, seq_k, seq_k, seq_v, seq_k, seq_k, state],
        out_specs=tuple(out_specs),
        name="gla_chunk_fwd",
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
