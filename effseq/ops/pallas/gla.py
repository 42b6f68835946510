"""Pallas kernel for chunked gated linear attention (``impl="pallas"``).

Yang, Wang, Shen, Panda & Kim (2023), "Gated Linear Attention Transformers with
Hardware-Efficient Training" (arXiv:2312.06635), eq. 3 in the row-vector convention:

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t        o_t = (scale * q_t) S_t

**Forward (Pallas).** One kernel in the "fused chunk" form: the grid is parallel over
(batch, head, tiles of the value dimension) and each program walks the chunks of its row in a
``lax.fori_loop``, carrying its (dk, bv) slice of the state in float32 (held transposed,
(bv, dk), so that every gate multiplies along the lane axis). One kernel rather than two
(chunk states, then outputs) because the state never leaves the program: no (n, dk, dv) array
of chunk states goes through HBM, and the only sequential part, the state carry, is one
(c, dk)^T (c, bv) product per chunk. The value tiles recompute the intra-chunk scores, which
depend on q, k and the gates only: cheap next to the state traffic they save for dv <= 64.

Per chunk of c steps, with Lambda_t the running sum of log gates from the chunk start
(inclusive), split into sub-chunks of c2 = 16 steps (Triton's smallest dot dimension):

* inter-chunk: o_t += (q_t * exp(Lambda_t)) S_in;
* between sub-chunks (the paper's secondary chunking): for rows t in sub-chunk i and columns
  s before it, with b the last step before sub-chunk i, the decay exp(Lambda_t - Lambda_s)
  factors through b as exp(Lambda_t - Lambda_b) * exp(Lambda_b - Lambda_s), both exponents
  <= 0, so o_i += [(q_i * exp(Lambda_i - Lambda_b)) (k * exp(Lambda_b - Lambda))^T] v is two
  matmuls (columns at or after sub-chunk i are masked to 0; they are c wide, a power of two);
* inside a sub-chunk: A_ts = sum_d q_td k_sd exp(Lambda_td - Lambda_sd) for s <= t, formed
  elementwise over a (c2, c2, dk) block with the exponent masked to -inf above the diagonal;
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

**Backward (XLA).** ``jax.custom_vjp``: the backward pass recomputes through the op's XLA
chunked path (``jax.vjp`` of :func:`effseq.ops.gla._chunked`, whose own backward is
hand-written): no part of the backward is Pallas yet. Gradients w.r.t. q, k, v, log_g, h0 and
the scale.
"""

from __future__ import annotations

import functools

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
    *,
    n_chunks: int,
    c: int,
):
    """One (batch, head, value tile): all chunks in order, the state carried as (bv, dk)."""
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
        start = pl.multiple_of(n * c, c)
        whole = pl.ds(start, c)
        k_all = k_ref[whole, :].astype(f32)
        v_all = v_ref[whole, :].astype(f32)
        hi_all = hi_ref[whole, :]
        lo_all = lo_ref[whole, :]
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
                expo = jnp.where(rows_c < i * _SUB, (hi_b - hi_all) + (lo_b - lo_all), -jnp.inf)
                k_w = k_all * jnp.exp(expo)
                scores = _common.dot(q_w, k_w, trans_b=True)  # (c2, c)
                o_i = o_i + _common.dot(scores, v_all)
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
        k_end = k_all * jnp.exp((hi_l - hi_all) + (lo_l - lo_all))
        return st * jnp.exp(hi_l + lo_l) + _common.dot(v_all, k_end, trans_a=True)

    st = jax.lax.fori_loop(0, n_chunks, chunk, h0_ref[...].astype(f32).T)
    s_ref[...] = st.T


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


def _forward(q, k, v, log_g, h0, scale, *, chunk_size: int):
    """The Pallas forward: shapes as the public op, h0 float32; returns (o in q's dtype,
    S_last float32)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, max(_SUB, _next_pow2(t)))
    T = -(-t // c) * c
    dkp = max(_SUB, _next_pow2(dk))
    bv = min(_BLOCK_V, max(_SUB, _next_pow2(dv)))
    dvp = -(-dv // bv) * bv
    q, k, log_g = (_common.pad_axis(_common.pad_axis(x, 1, T), 3, dkp) for x in (q, k, log_g))
    v = _common.pad_axis(_common.pad_axis(v, 1, T), 3, dvp)
    h0 = _common.pad_axis(_common.pad_axis(h0, 2, dkp), 3, dvp)
    hi, lo = _running_log_gates(log_g.astype(jnp.float32), c)
    scale = jnp.asarray(scale, jnp.float32).reshape(1, 1)

    seq_k = pl.BlockSpec((None, T, None, dkp), lambda ib, ih, iv: (ib, 0, ih, 0))
    seq_v = pl.BlockSpec((None, T, None, bv), lambda ib, ih, iv: (ib, 0, ih, iv))
    state = pl.BlockSpec((None, None, dkp, bv), lambda ib, ih, iv: (ib, ih, 0, iv))
    o, S = _common.call(
        functools.partial(_kernel, n_chunks=T // c, c=c),
        out_shape=(
            jax.ShapeDtypeStruct((b, T, h, dvp), q.dtype),
            jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32),
        ),
        grid=(b, h, dvp // bv),
        in_specs=[
            pl.BlockSpec((1, 1), lambda ib, ih, iv: (0, 0)),
            seq_k,
            seq_k,
            seq_v,
            seq_k,
            seq_k,
            state,
        ],
        out_specs=(seq_v, state),
        name="gla_chunk_fwd",
    )(scale, q, k, v, hi, lo, h0)
    return o[:, :t, :, :dv], S[:, :, :dk, :dv]


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gla(q, k, v, log_g, h0, scale, chunk_size):
    return _forward(q, k, v, log_g, h0, scale, chunk_size=chunk_size)


def _gla_fwd(q, k, v, log_g, h0, scale, chunk_size):
    out = _forward(q, k, v, log_g, h0, scale, chunk_size=chunk_size)
    return out, (q, k, v, log_g, h0, scale)


def _gla_bwd(chunk_size, residuals, cotangents):
    _, vjp = jax.vjp(functools.partial(_xla, chunk_size=chunk_size), *residuals)
    return vjp(cotangents)


_gla.defvjp(_gla_fwd, _gla_bwd)


def gated_linear_attention_pallas(
    q: Array, k: Array, v: Array, log_g: Array, h0: Array, scale, *, chunk_size: int
) -> tuple[Array, Array]:
    """Single-shard, unpacked GLA through the Pallas kernel; inputs already validated.

    Args:
      q, k: (b, t, h, k); v: (b, t, h, v); log_g: (b, t, h, k) <= 0; h0: (b, h, k, v) float32;
      scale: the query scale (a float or a scalar array).
      chunk_size: chunk length c, a power of two >= 16 (a sequence shorter than c runs as one
        chunk of the next power of two >= 16 above t).

    Returns:
      ``(o, S_last)``: o (b, t, h, v) in the dtype of q, S_last (b, h, k, v) float32.
    """
    _common.check_tile(OP, "chunk_size", chunk_size)
    scale = jnp.asarray(scale, jnp.float32)
    return _gla(q, k, v, log_g, h0.astype(jnp.float32), scale, chunk_size)


__all__ = ["gated_linear_attention_pallas"]
