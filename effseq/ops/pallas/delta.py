"""Pallas kernel of the gated delta rule (Gated DeltaNet): ``gated_delta_rule(impl="pallas")``.

The maths is :mod:`effseq.ops.delta_rule`'s chunked WY/UT form (Yang et al. 2024,
arXiv:2406.06484, section 3; with gates, Yang, Kautz & Hatamizadeh 2025, arXiv:2412.06464,
section 3.3), row-vector convention, one gate G_t = exp(log_g_t) per head. Within a chunk of c
steps entered with the state S_0 (k x v), with Gamma_t = G_1 ... G_t and q already scaled:

    A[s, r] = beta_s (k_s . k_r) Gamma_s / Gamma_r   (r < s), T = (I + A)^-1   the UT transform
    W = T diag(beta) (K * Gamma),  U0 = T diag(beta) V
    U = U0 - W S_0                                   the corrections u_s = beta_s (v_s - k_s S'_s)
    O = (Q * Gamma) S_0 + P U,     P[t, s] = (q_t . k_s) Gamma_t / Gamma_s   (s <= t)
    S_c = Gamma_c S_0 + (K * Gamma_c / Gamma)^T U

Split between XLA and Pallas (forward):

* XLA, in the wrapper, for all chunks at once: the running sums of the log gates within each
  chunk as a compensated pair (pre, lo) (``delta_rule._cumulative_log_gates``), A and its
  inverse T (``delta_rule._unit_lower_inverse``: blockwise doubling, log2(c) rounds of
  batched matmuls; a c-row forward substitution inside a Triton kernel would need a masked
  update of the whole (c, c) tile per row, and T is state-independent, so it stays with the
  other all-chunks-at-once work).
* Pallas, one kernel (``_chunk_loop``), the fla-style "fused chunk" form: grid over
  (batch, head, value tiles of width ``block_v``), all independent; inside, a
  ``lax.fori_loop`` over the chunks carries S (k x block_v, float32) and per chunk forms W,
  U0, U, P (q k^T times the masked decays, exp of compensated log-gate differences, -inf
  above the diagonal so nothing overflows), writes O and updates S. One kernel rather than
  two (chunk states, then outputs): the state never leaves the chip, each input is read once
  per value tile, and W and P, recomputed per value tile, are O(c^2 k) per chunk against the
  O(c k v) of the state products, a small share at the usual k = v.

Backward: XLA. A ``jax.custom_vjp`` whose backward recomputes through the op's XLA chunked path
(``jax.vjp`` of ``delta_rule._chunked``, the same float32 maths) and returns the gradients of
q, k, v, log_g, beta, h0 and the scale. No part of the backward is Pallas yet.

Dtypes: q, k, v reach the kernel in their own dtype (q k^T, the one product of inputs alone,
runs on bf16 operands as they are); gates, beta, T and the state are float32, products
involving them run in float32 (``_common.dot``: float32 accumulation at the configured matmul
precision). o comes back in the dtype of q, the final state in float32.

Padding (exact): t up to a multiple of the chunk with zero keys, beta 0 and log gate 0 (an
identity step: nothing decays, nothing is written; its outputs are dropped); the key and value
widths up to powers of two >= 16 with zero columns of q, k, v and h0 (a zero key channel
neither reads nor writes the state, whose extra rows stay 0; a zero value column stays 0 in
U and S), sliced off after.

Limits: one gate per head only. Per-key-channel gates (KDA) would need the (c, c, k) decay
tensor of P inside the kernel; ``impl="pallas"`` refuses them with a ValueError (use
``"chunked"``). Packed rows (``segment_ids``) are refused too (``"chunked"`` and
``"recurrent"`` support them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from effseq.ops.pallas import _common

OP = "gated_delta_rule"
# Value-tile width of the grid: the state tile is (k, BLOCK_V) float32.
BLOCK_V = 64


def _next_pow2(n: int, least: int = _common.MIN_DOT) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


def _chunk_loop(
    q_ref, k_ref, v_ref, beta_ref, pre_ref, lo_ref, t_ref, h0_ref, scale_ref,
    o_ref, s_ref, *, c: int, n: int,
):  # fmt: skip
    """One (batch, head, value tile): the chunks in order, the state carried in float32.

    Refs: q, k (tp, k), v (tp, bv), beta, pre, lo (tp,), T (tp, c) (row t of chunk i holds
    row t of that chunk's T), h0 (k, bv), scale (1,); out o (tp, bv), S_last (k, bv).
    """
    f32 = jnp.float32
    scale = scale_ref[...]  # (1,), broadcasts
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal = rows >= cols

    def body(i, S):
        span = pl.ds(pl.multiple_of(i * c, c), c)
        end = pl.ds(i * c + c - 1, 1)
        q = q_ref[span, :]
        k = k_ref[span, :]
        v = v_ref[span, :]
        beta = beta_ref[span]
        pre = pre_ref[span]
        lo = lo_ref[span]
        T = t_ref[span, :]
        pre_end = pre_ref[end]  # (1,)
        lo_end = lo_ref[end]
        from_start = jnp.exp(pre + lo)  # Gamma_t
        to_end = jnp.exp((pre_end - pre) + (lo_end - lo))  # Gamma_c / Gamma_t
        kf = k.astype(f32)
        bk = beta[:, None] * kf
        W = _common.dot(T, bk * from_start[:, None])  # (c, k)
        U = _common.dot(T, beta[:, None] * v.astype(f32)) - _common.dot(W, S)  # (c, bv)
        expo = (pre[:, None] - pre[None, :]) + (lo[:, None] - lo[None, :])
        decay = jnp.exp(jnp.where(causal, expo, -jnp.inf))
        P = _common.dot(q, k, trans_b=True) * (decay * scale[:, None])
        Qg = q.astype(f32) * (from_start * scale)[:, None]
        o = _common.dot(Qg, S) + _common.dot(P, U)
        o_ref[span, :] = o.astype(o_ref.dtype)
        gamma_c = jnp.exp(pre_end + lo_end)  # (1,)
        return gamma_c[:, None] * S + _common.dot(kf * to_end[:, None], U, trans_a=True)

    S = lax.fori_loop(0, n, body, h0_ref[...].astype(f32))
    s_ref[...] = S


def _forward(q, k, v, log_g, beta, h0, scale, *, chunk_size: int, block_v: int):
    """The Pallas forward on unpadded inputs; returns (o in q's dtype, S_last float32)."""
    from effseq.ops.delta_rule import (
        _cumulative_log_gates,
        _decayed_products,
        _unit_lower_inverse,
    )

    f32 = jnp.float32
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, _next_pow2(t))
    n = -(-t // c)
    tp = n * c
    kp, vp = _next_pow2(dk), _next_pow2(dv)
    bv = min(block_v, vp)

    q = _common.pad_axis(_common.pad_axis(q, 1, c), 3, kp)
    k = _common.pad_axis(_common.pad_axis(k, 1, c), 3, kp)
    v = _common.pad_axis(_common.pad_axis(v, 1, c), 3, vp)
    g = _common.pad_axis(log_g.astype(f32), 1, c)
    beta = _common.pad_axis(beta.astype(f32), 1, c)
    h0 = _common.pad_axis(_common.pad_axis(h0.astype(f32), 2, kp), 3, vp)

    # XLA: compensated running log gates per chunk, A and T = (I + A)^-1, for all chunks.
    chunked = lambda x: x.reshape(b, n, c, h, *x.shape[3:])  # noqa: E731
    g_c = jnp.moveaxis(chunked(g), 3, 2)[..., None]  # (b, n, h, c, 1)
    pre, lo = _cumulative_log_gates(g_c)
    k_c = jnp.moveaxis(chunked(k.astype(f32)), 3, 2)  # (b, n, h, c, kp)
    beta_c = jnp.moveaxis(chunked(beta), 3, 2)  # (b, n, h, c)
    A = _decayed_products(beta_c[..., None] * k_c, k_c, pre, lo, strict=True)
    T = _unit_lower_inverse(A)  # (b, n, h, c, c)
    unchunk = lambda x: jnp.moveaxis(x, 2, 3).reshape(b, tp, h, *x.shape[4:])  # noqa: E731
    T = unchunk(T)  # (b, tp, h, c)
    pre, lo = unchunk(pre[..., 0]), unchunk(lo[..., 0])  # (b, tp, h)
    scale = jnp.reshape(jnp.asarray(scale, f32), (1,))

    seq = lambda width, tile: pl.BlockSpec(  # noqa: E731
        (None, tp, None, width), lambda bi, hi, vi: (bi, 0, hi, tile(vi))
    )
    per_step = pl.BlockSpec((None, tp, None), lambda bi, hi, vi: (bi, 0, hi))
    state = pl.BlockSpec((None, None, kp, bv), lambda bi, hi, vi: (bi, hi, 0, vi))
    whole = lambda vi: 0  # noqa: E731
    same = lambda vi: vi  # noqa: E731
    o, S = _common.call(
        functools.partial(_chunk_loop, c=c, n=n),
        out_shape=(
            jax.ShapeDtypeStruct((b, tp, h, vp), q.dtype),
            jax.ShapeDtypeStruct((b, h, kp, vp), f32),
        ),
        grid=(b, h, vp // bv),
        in_specs=[
            seq(kp, whole),
            seq(kp, whole),
            seq(bv, same),
            per_step,
            per_step,
            per_step,
            seq(c, whole),
            state,
            pl.BlockSpec((1,), lambda bi, hi, vi: (0,)),
        ],
        out_specs=(seq(bv, same), state),
        name="gated_delta_rule_fwd",
    )(q, k, v, beta, pre, lo, T, h0, scale)
    return o[:, :t, :, :dv], S[:, :, :dk, :dv]


def _xla(q, k, v, log_g, beta, h0, scale, *, chunk_size: int):
    """The XLA chunked path on the same inputs: what the backward differentiates."""
    from effseq.ops.delta_rule import _chunked

    f32 = jnp.float32
    o, S = _chunked(
        q.astype(f32) * scale,
        k.astype(f32),
        v.astype(f32),
        log_g.astype(f32)[..., None],
        beta.astype(f32),
        h0.astype(f32),
        chunk_size=chunk_size,
    )
    return o.astype(q.dtype), S


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _op(q, k, v, log_g, beta, h0, scale, chunk_size, block_v):
    return _forward(q, k, v, log_g, beta, h0, scale, chunk_size=chunk_size, block_v=block_v)


def _op_fwd(q, k, v, log_g, beta, h0, scale, chunk_size, block_v):
    out = _forward(q, k, v, log_g, beta, h0, scale, chunk_size=chunk_size, block_v=block_v)
    return out, (q, k, v, log_g, beta, h0, scale)


def _op_bwd(chunk_size, block_v, residuals, cotangents):
    del block_v
    _, vjp = jax.vjp(functools.partial(_xla, chunk_size=chunk_size), *residuals)
    return vjp(cotangents)


_op.defvjp(_op_fwd, _op_bwd)


def gated_delta_rule_pallas(
    q, k, v, log_g, beta, h0, scale, *, chunk_size: int, block_v: int | None = None
):
    """:func:`effseq.ops.delta_rule.gated_delta_rule` with ``impl="pallas"`` on one shard,
    unpacked, t > 0, inputs validated: q, k (b, t, h, k), v (b, t, h, v), log_g (b, t, h) (one
    gate per head), beta (b, t, h), h0 (b, h, k, v) float32, scale a float or scalar array.
    ``block_v``: the value-tile width, None for ``BLOCK_V``. Returns ``(o, S_last)``: o
    (b, t, h, v) in q's dtype, S_last (b, h, k, v) float32."""
    block_v = BLOCK_V if block_v is None else block_v
    _common.check_tile(OP, "chunk_size", chunk_size)
    _common.check_tile(OP, "block_v", block_v)
    if log_g.ndim != 3:
        raise ValueError(
            f"{OP}: impl='pallas' supports one gate per head (log_g of shape (b, t, h)); got "
            f"log_g of shape {tuple(log_g.shape)}, one gate per key channel (KDA): use "
            "impl='chunked' or 'recurrent' for those"
        )
    scale = jnp.asarray(scale, jnp.float32)
    return _op(q, k, v, log_g, beta, h0, scale, chunk_size, block_v)


__all__ = ["gated_delta_rule_pallas"]
