"""Pallas kernel for Mamba-2's SSD (Dao & Gu 2024) behind ``ssd(..., impl="pallas")``.

Per head, with a state H of shape (p, n) and the per-step log decay a_t = dt_t A <= 0,

    H_t = exp(a_t) H_{t-1} + dt_t x_t^T B_t,        y_t = H_t C_t + D x_t.

The chunked form (the SSD algorithm of Sec. 6) over chunks of c steps, H the state entering
the chunk and, for steps i, j of the chunk, seg[i, j] = a_{j+1} + ... + a_i (j <= i):

    y_i   = sum_{j <= i} exp(seg[i, j]) (C_i . B_j) dt_j x_j  +  exp(a_1 + ... + a_i) H C_i
            + D x_i
    H_out = exp(a_1 + ... + a_c) H  +  sum_j exp(a_{j+1} + ... + a_c) dt_j x_j^T B_j

Forward (Pallas): one "fused chunk" kernel on a grid (b, h, p tiles), every program walking
the chunks of its row in order with a ``lax.fori_loop`` that carries its (p tile, n) slice of
H in float32. One kernel rather than two (chunk states, then outputs) because a head's state
is small (p tile x n floats) and the walk keeps it in registers: x, B and C are read once and
y written once, with no (nc, p, n) intermediate in memory. The price is parallelism, which
only comes from b * h * (p / p tile) programs. The group of B and C a head reads
(i // (h // g)) comes from the head index in their ``BlockSpec`` index map, so B and C are
never copied per head. D x is added inside the kernel, before the one cast of y to x's dtype.

Every exponent is a sum of exactly the terms it spans, never a difference of running sums
(the masked cumulative sum of the paper's Listing 1, as the XLA path does): with decays of
exp(-20) per step, running sums reach -20 c and a difference of two would cancel to the
float32 spacing there.

Dtypes: x, B and C enter the kernel in their own dtype (bf16 feeds the tensor cores as it
is): C B^T takes them as they are, and the intra-chunk product and the state update take the
decay-weighted scores and dt x rounded to x's dtype. Decays, dt, D and the state are float32,
as are the products with the state; every product accumulates in float32
(:func:`effseq.ops.pallas._common.dot`).

Padding (exact): t is padded up to a multiple of c with dt = 0, x = B = C = 0 steps, which
leave the state unchanged (decay exp(0) = 1, nothing written) and whose outputs are dropped;
p and n are padded up to powers of two >= 16 with zero columns of x / B / C / h0: a zero
column of B or C neither writes nor reads a state column, a zero column of x writes a zero
state row, and the padded rows and columns of y and of the state are sliced off.

Backward: a ``jax.custom_vjp`` whose backward is NOT Pallas: it recomputes through the XLA
chunked path (``effseq.ops.ssd._chunked``) and takes its ``jax.vjp``, so every input's
gradient (x, dt, A, B, C, D, h0) is the chunked path's. The residuals are the inputs only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from effseq.ops.pallas import _common
from effseq.typing import Array

__all__ = ["ssd_pallas"]

OP = "ssd"
# Widest slice of the head dimension p one program handles (its state slice is P_TILE x n).
P_TILE = 64


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _kernel(x_ref, a_ref, dt_ref, b_ref, c_ref, d_ref, h0_ref, y_ref, h_ref, *, nc, c):
    """One (batch, head, p tile): x_ref (T, bp); a_ref, dt_ref (T,) float32; b_ref, c_ref
    (T, n); d_ref (1,) float32 or None; h0_ref, h_ref (bp, n) float32; y_ref (T, bp)."""
    f32 = jnp.float32
    cd = x_ref.dtype  # dtype of the second-stage dot operands
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal = col <= row
    strict = col < row

    def body(k, H):
        s = pl.ds(pl.multiple_of(k * c, c), c)
        xk = x_ref[s, :]  # (c, bp)
        ak = a_ref[s]  # (c,) log decays, <= 0
        dtk = dt_ref[s]
        Bk = b_ref[s, :]  # (c, n)
        Ck = c_ref[s, :]
        # terms[i, j] = a_i where j < i: the column sums of its cumulative sum down the rows
        # are the segment sums seg[i, j] = a_{j+1} + ... + a_i, each a sum of its own terms.
        terms = jnp.where(strict, ak[:, None], 0.0)
        seg = jnp.cumsum(terms, axis=0)
        decay = jnp.where(causal, jnp.exp(seg), 0.0)  # (c, c)
        to_end = jnp.exp(jnp.sum(terms, axis=0))  # [j] = exp(a_{j+1} + ... + a_c)
        from_start = jnp.exp(jnp.cumsum(ak))  # [i] = exp(a_1 + ... + a_i)
        total = jnp.exp(jnp.sum(ak))
        u = xk.astype(f32) * dtk[:, None]  # dt x, (c, bp)
        scores = _common.dot(Ck, Bk, trans_b=True) * decay  # (c, c) float32
        y = _common.dot(scores.astype(cd), u.astype(cd))
        y = y + from_start[:, None] * _common.dot(Ck.astype(f32), H, trans_b=True)
        if d_ref is not None:
            y = y + d_ref[...][None, :] * xk.astype(f32)
        y_ref[s, :] = y.astype(y_ref.dtype)
        w = (u * to_end[:, None]).astype(cd)
        return total * H + _common.dot(w, Bk.astype(cd), trans_a=True)

    h_ref[...] = lax.fori_loop(0, nc, body, h0_ref[...].astype(f32))


def _forward(x, dt, A, B, C, D, h0, *, chunk_size: int):
    """The Pallas forward on unpadded inputs; returns (y in x's dtype, H float32)."""
    f32 = jnp.float32
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    c = min(chunk_size, max(_common.MIN_DOT, _next_pow2(t)))
    nc = -(-t // c)
    pp = max(_common.MIN_DOT, _next_pow2(p))
    bp = min(P_TILE, pp)
    npad = max(_common.MIN_DOT, _next_pow2(n))

    cd = jnp.result_type(x.dtype, B.dtype, C.dtype)
    x = _common.pad_axis(_common.pad_axis(x.astype(cd), 1, c), 3, pp)
    B, C = (_common.pad_axis(_common.pad_axis(z.astype(cd), 1, c), 3, npad) for z in (B, C))
    dt = dt.astype(f32)
    a = jnp.moveaxis(dt * A.astype(f32), 1, 2)  # (b, h, t): per-step log decay
    a, dt = (_common.pad_axis(z, 2, c) for z in (a, jnp.moveaxis(dt, 1, 2)))
    h0 = _common.pad_axis(_common.pad_axis(h0.astype(f32), 2, pp), 3, npad)
    T = nc * c

    in_specs = [
        pl.BlockSpec((None, T, None, bp), lambda i, j, k: (i, 0, j, k)),  # x
        pl.BlockSpec((None, None, T), lambda i, j, k: (i, j, 0)),  # a
        pl.BlockSpec((None, None, T), lambda i, j, k: (i, j, 0)),  # dt
        pl.BlockSpec((None, T, None, npad), lambda i, j, k: (i, 0, j // r, 0)),  # B (group)
        pl.BlockSpec((None, T, None, npad), lambda i, j, k: (i, 0, j // r, 0)),  # C (group)
    ]
    args = [x, a, dt, B, C]
    if D is not None:
        in_specs.append(pl.BlockSpec((1,), lambda i, j, k: (j,)))
        args.append(D.astype(f32))
    in_specs.append(pl.BlockSpec((None, None, bp, npad), lambda i, j, k: (i, j, k, 0)))  # h0
    args.append(h0)

    def kernel(*refs):
        if D is None:
            refs = (*refs[:5], None, *refs[5:])
        _kernel(*refs, nc=nc, c=c)

    y, H = _common.call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, T, h, pp), x.dtype),
            jax.ShapeDtypeStruct((b, h, pp, npad), f32),
        ),
        grid=(b, h, pp // bp),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, T, None, bp), lambda i, j, k: (i, 0, j, k)),
            pl.BlockSpec((None, None, bp, npad), lambda i, j, k: (i, j, k, 0)),
        ),
        name="ssd_fused_chunk_fwd",
    )(*args)
    return y[:, :t, :, :p], H[:, :, :p, :n]


def _xla_chunked(x, dt, A, B, C, D, h0, *, chunk_size: int):
    """The XLA chunked path on float32 copies (what the backward differentiates)."""
    from effseq.ops.ssd import _chunked

    f32 = jnp.float32
    args = tuple(z.astype(f32) for z in (x, dt, A, B, C))
    D = None if D is None else D.astype(f32)
    y, H = _chunked(*args, D, h0.astype(f32), chunk_size=chunk_size)
    return y.astype(x.dtype), H


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd(x, dt, A, B, C, D, h0, chunk_size):
    return _forward(x, dt, A, B, C, D, h0, chunk_size=chunk_size)


def _ssd_fwd(x, dt, A, B, C, D, h0, chunk_size):
    return _forward(x, dt, A, B, C, D, h0, chunk_size=chunk_size), (x, dt, A, B, C, D, h0)


def _ssd_bwd(chunk_size, res, cts):
    _, vjp = jax.vjp(functools.partial(_xla_chunked, chunk_size=chunk_size), *res)
    return vjp(cts)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None,
    h0: Array,
    *,
    chunk_size: int,
) -> tuple[Array, Array]:
    """SSD on one shard, unpacked rows: the Pallas forward, the XLA chunked path's gradient.

    Shapes as in :func:`effseq.ops.ssd.ssd` (validated there); ``h0`` is given (float32).
    ``chunk_size`` must be a power of two >= 16; a sequence shorter than it runs as one chunk
    of the next power of two >= max(t, 16). Returns ``(y, h_last)``: y (b, t, h, p) in x's
    dtype, h_last (b, h, p, n) float32.
    """
    _common.check_tile(OP, "chunk_size", chunk_size)
    return _ssd(x, dt, A, B, C, D, h0, chunk_size)
