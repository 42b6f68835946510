"""Pallas kernel for Mamba-2's SSD (Dao & Gu 2024) behind ``ssd(..., impl="pallas")``.

Per head, with a state H of shape (p, n) and the per-step log decay a_t = dt_t A <= 0,

    H_t = exp(a_t) H_{t-1} + dt_t x_t^T B_t,        y_t = H_t C_t + D x_t.

The chunked form (the SSD algorithm of Sec. 6) over chunks of c steps, H the state entering
the chunk and, for steps i, j of the chunk, seg[i, j] = a_{j+1} + ... + a_i (j <= i):

    y_i   = sum_{j <= i} exp(seg[i, j]) (C_i . B_j) dt_j x_j  +  exp(a_1 + ... + a_i) H C_i
            + D x_i
    H_out = exp(a_1 + ... + a_c) H  +  sum_j exp(a_{j+1} + ... + a_c) dt_j x_j^T B_j

Forward (Pallas), in two forms:

* without gradients (inference), one "fused chunk" kernel ``ssd_fused_chunk_fwd`` on a grid
  (b, h, p tiles), every program walking the chunks of its row in order with a
  ``lax.fori_loop`` that carries its (p tile, n) slice of H in float32: x, B and C are read
  once, y written once, and no (nc, p, n) array of chunk states is ever in memory. Its
  parallelism is only b * h * (p / p tile) programs;
* under ``jax.vjp`` / ``grad`` (training), where the backward needs the state entering every
  chunk anyway, two kernels: ``ssd_fwd_states`` (grid b x h x p tiles) walks the chunks doing
  only the state update (one (p tile, c) x (c, n) product per chunk) and writes each chunk's
  entering state; ``ssd_fwd_chunks`` (grid b x h x chunks * p tiles, all independent) does
  the (c, c) work of every chunk from its state. The sequential part is then the cheap one.

The group of B and C a head reads (i // (h // g)) comes from the head index in their
``BlockSpec`` index maps, so B and C are never copied per head. D x is added inside the
kernels, before the one cast of y to x's dtype.

Every exponent is a sum of exactly the terms it spans, never a difference of running sums
(the masked cumulative sum of the paper's Listing 1, as the XLA path does): with decays of
exp(-20) per step, running sums reach -20 c and a difference of two would cancel to the
float32 spacing there.

Dtypes: x, B and C enter the kernel in their own dtype (bf16 feeds the tensor cores as it
is): C B^T takes them as they are, and the intra-chunk product and the state update take the
decay-weighted scores and dt x rounded to x's dtype. Decays, dt, D and the state are float32,
as are the products with the state; every product accumulates in float32
(:func:`effseq.ops.pallas._common.dot`). The backward likewise takes the (c, c) decay-weighted
matrices and dy in x's dtype into its products with B, C and dy, and keeps everything that
touches the state gradient in float32.

Padding (exact): t is padded up to a multiple of c with dt = 0, x = B = C = 0 steps, which
leave the state unchanged (decay exp(0) = 1, nothing written) and whose outputs are dropped;
p and n are padded up to powers of two >= 16 with zero columns of x / B / C / h0: a zero
column of B or C neither writes nor reads a state column, a zero column of x writes a zero
state row, and the padded rows and columns of y and of the state are sliced off.

Backward (Pallas, with small XLA reductions around it): a ``jax.custom_vjp``. The forward
keeps the state entering each chunk (b, h, nc, p, n) float32 as a residual besides the
inputs. Then two kernels, split like the forward's maths so that only cheap work is
sequential: ``ssd_bwd_states`` (grid b x h x p tiles) walks the chunks in reverse carrying
G, the gradient of the state leaving a chunk, (p tile, n) float32, from that of h_last to
that of h0 (per chunk one product, G <- exp(total) G + (from_start dy)^T C) and writes each
chunk's G; ``ssd_bwd_chunks`` (grid b x h x chunks * p tiles, all independent) takes a
chunk's H and G and does the (c, c) work: dx (complete) and each p tile's share of dB, dC
(per head), of x . du and of the log decays' gradient. XLA then sums the shares over p tiles
and over the heads of each group, forms d(dt) = x . du + A da, dA = sum dt da and
dD = sum dy x. The decays' gradient is taken over exactly the exponent terms containing each
step (the segment-sum part as a product with a 0/1 triangle, its other factor split exactly
into three bfloat16 parts so the products are exact on the tensor cores), never as a
difference of sums, so decays of exp(-20) beside ~1 lose nothing.

On a Hopper SM (``python -m effseq.benchmarks.kernel_report --ops ssd``: Triton's compile for
sm_90 at the GPU plan's shapes, 32 heads x p 64, n 128, chunk 64, bf16; p tile 64): all five
kernels fit in shared memory (64-104 KiB of 227) and use wgmma. The two heavy ones run with
8 warps (``LAUNCH``): their float32 state slices (64 x 128: H, and G in the backward) and
(c, c) matrices spilled registers at 4 warps (fused forward 692 B, chunk backward 2556 B).
The fused forward also runs with one stage (the prefetched next chunk held registers) and
does its float32 product with the state before the (c, c) scores exist: no spills. The chunk
backward is ordered so few arrays are live at once, reads H, G, B, C and dy from their refs
where used, takes H and G as the left operand of their float32 products (staged in shared
memory, not a float32 left operand in registers), and no longer has a float32 CUDA-core
product (the 0/1-triangle product above): 68 B of spills remain (80 with D). The three
other kernels use 166-222 registers at 4 warps, no spills.
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
# Triton's num_warps / num_stages per kernel (the module docstring's "On a Hopper SM").
LAUNCH = {
    "ssd_fused_chunk_fwd": dict(num_warps=8, num_stages=1),
    "ssd_fwd_states": dict(num_warps=4, num_stages=2),
    "ssd_fwd_chunks": dict(num_warps=4, num_stages=2),
    "ssd_bwd_states": dict(num_warps=4, num_stages=2),
    "ssd_bwd_chunks": dict(num_warps=8, num_stages=1),
}


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _chunk_decays(ak, c):
    """Decays of one chunk from its log decays ak (c,): the masked segment-sum matrix L
    (c, c), to_end (c,), from_start (c,), the whole chunk's decay (scalar), and the mask
    ``causal`` (j <= i). Each exponent is a sum of exactly the terms it spans."""
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal = col <= row
    # terms[i, j] = a_i where j < i: its cumulative sum down the rows is the segment sum
    # seg[i, j] = a_{j+1} + ... + a_i, its column sums a_{j+1} + ... + a_c.
    terms = jnp.where(col < row, ak[:, None], 0.0)
    L = jnp.where(causal, jnp.exp(jnp.cumsum(terms, axis=0)), 0.0)
    to_end = jnp.exp(jnp.sum(terms, axis=0))  # [j] = exp(a_{j+1} + ... + a_c)
    from_start = jnp.exp(jnp.cumsum(ak))  # [i] = exp(a_1 + ... + a_i)
    total = jnp.exp(jnp.sum(ak))
    return L, to_end, from_start, total, causal


def _chunk_output(x_ref, a_ref, dt_ref, b_ref, c_ref, s, d, H, c):
    """y (c, bp) float32 of one chunk: (L * C B^T)(dt x) + from_start * (C H^T) + D x, from
    the rows ``s`` of its refs: x (c, bp), log decays and dt (c,), B, C (c, n); D (1,) or
    None and the state entering it H (bp, n) float32. Also returns u = dt x, to_end, total
    and B for the state update. The refs are read in the order that left the fused kernel
    without register spills on sm_90 (the decays before dt)."""
    f32 = jnp.float32
    Bk, Ck, xk = b_ref[s, :], c_ref[s, :], x_ref[s, :]
    cd = xk.dtype
    L, to_end, from_start, total, _ = _chunk_decays(a_ref[s], c)
    u = xk.astype(f32) * dt_ref[s][:, None]  # dt x, (c, bp)
    # The read of the state first: its float32 product is done before the (c, c) scores
    # are live (in the other order the fused kernel spilled registers on sm_90).
    y = from_start[:, None] * _common.dot(Ck.astype(f32), H, trans_b=True)
    scores = _common.dot(Ck, Bk, trans_b=True) * L  # (c, c) float32
    y = y + _common.dot(scores.astype(cd), u.astype(cd))
    if d is not None:
        y = y + d[None, :] * x_ref[s, :].astype(f32)  # x read again: not held
    return y, u, to_end, total, Bk


def _state_update(H, u, to_end, total, Bk):
    """The state leaving a chunk: exp(total) H + (to_end * dt x)^T B."""
    w = (u * to_end[:, None]).astype(Bk.dtype)
    return total * H + _common.dot(w, Bk, trans_a=True)


def _fwd_kernel(x_ref, a_ref, dt_ref, b_ref, c_ref, d_ref, h0_ref, y_ref, h_ref, *, nc, c):
    """Inference form, fused: one (batch, head, p tile) walks its chunks in order carrying its
    state slice. x_ref (T, bp); a_ref, dt_ref (T,) float32; b_ref, c_ref (T, n); d_ref (1,)
    float32 or None; h0_ref, h_ref (bp, n) float32; y_ref (T, bp)."""
    d = None if d_ref is None else d_ref[...]

    def body(k, H):
        s = pl.ds(pl.multiple_of(k * c, c), c)
        y, u, to_end, total, Bk = _chunk_output(x_ref, a_ref, dt_ref, b_ref, c_ref, s, d, H, c)
        y_ref[s, :] = y.astype(y_ref.dtype)
        return _state_update(H, u, to_end, total, Bk)

    h_ref[...] = lax.fori_loop(0, nc, body, h0_ref[...].astype(jnp.float32))


def _fwd_state_kernel(x_ref, a_ref, dt_ref, b_ref, h0_ref, h_ref, hs_ref, *, nc, c):
    """Training form, sequential part: the states alone, chunk by chunk (one product each, no
    (c, c) product); hs_ref (nc, bp, n) float32 receives the state entering each chunk."""
    f32 = jnp.float32
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)

    def body(k, H):
        s = pl.ds(pl.multiple_of(k * c, c), c)
        hs_ref[pl.ds(k, 1), :, :] = H[None]
        ak = a_ref[s]
        to_end = jnp.exp(jnp.sum(jnp.where(col < row, ak[:, None], 0.0), axis=0))
        u = x_ref[s, :].astype(f32) * dt_ref[s][:, None]
        return _state_update(H, u, to_end, jnp.exp(jnp.sum(ak)), b_ref[s, :])

    h_ref[...] = lax.fori_loop(0, nc, body, h0_ref[...].astype(f32))


def _fwd_chunk_kernel(x_ref, a_ref, dt_ref, b_ref, c_ref, d_ref, hs_ref, y_ref, *, c):
    """Training form, parallel part: one chunk of one (batch, head, p tile) from the state
    entering it (hs_ref (bp, n) float32); refs as in :func:`_fwd_kernel`, one chunk long."""
    d = None if d_ref is None else d_ref[...]
    y, *_ = _chunk_output(x_ref, a_ref, dt_ref, b_ref, c_ref, slice(None), d, hs_ref[...], c)
    y_ref[...] = y.astype(y_ref.dtype)


def _bwd_state_kernel(a_ref, c_ref, dy_ref, dh_ref, gs_ref, dh0_ref, *, nc, c):
    """The sequential part of the backward for one (batch, head, p tile): chunks in reverse
    order, carrying G, the gradient of the state leaving the chunk (bp, n) float32, from
    dh_ref (that of h_last) to dh0_ref (that of h0); gs_ref (nc, bp, n) receives each
    chunk's G. Per chunk G <- total G + (from_start * dy)^T C: one product, no (c, c) work.
    a_ref (T,) float32, c_ref (T, n), dy_ref (T, bp)."""
    f32 = jnp.float32
    cd = c_ref.dtype

    def body(kk, G):
        k = nc - 1 - kk
        s = pl.ds(pl.multiple_of(k * c, c), c)
        gs_ref[pl.ds(k, 1), :, :] = G[None]
        ak = a_ref[s]
        from_start = jnp.exp(jnp.cumsum(ak))
        read = (from_start[:, None] * dy_ref[s, :].astype(f32)).astype(cd)
        return jnp.exp(jnp.sum(ak)) * G + _common.dot(read, c_ref[s, :], trans_a=True)

    dh0_ref[...] = lax.fori_loop(0, nc, body, dh_ref[...].astype(f32))


def _bwd_chunk_kernel(
    x_ref, a_ref, dt_ref, b_ref, c_ref, d_ref, hs_ref, gs_ref, dy_ref,
    dx_ref, db_ref, dc_ref, ddt_ref, da_ref, *, c,
):  # fmt: skip
    """The parallel part of the backward: one chunk of one (batch, head, p tile), given the
    state entering it H (hs_ref) and the gradient G of the state leaving it (gs_ref), both
    (bp, n) float32. Inputs as in :func:`_fwd_kernel` but one chunk long; dy_ref (c, bp) the
    gradient of y. Out: dx_ref (c, bp) in x's dtype; this p tile's share of the B and C
    gradients db_ref, dc_ref (c, n), of sum_p x du (ddt_ref (c,)) and of the log decays'
    gradient (da_ref (c,)), all float32, summed over tiles and heads by the wrapper.

    With S = C B^T, u = dt x, P = L * (dy u^T): dC = P B + from_start * (dy H),
    dB = P^T C + to_end * (u G), du = (L * S)^T dy + to_end * (B G^T), dx = dt du + D dy and
    d(dt) = x . du + A da. The log decays' gradient da_m sums the gradients of the exponents
    that contain a_m (seg[i, j] for j < m <= i, from_start_i for i >= m, to_end_j for j < m,
    the total), each over exactly those terms.
    """
    f32 = jnp.float32
    cd = x_ref.dtype
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    # Register pressure (sm_90, p tile 64, n 128, c 64; see "On a Hopper SM" above): the
    # (c, c) work comes first, reduced to what the rest needs (S L and P in x's dtype, the
    # decays' segment-sum gradient); then the terms with H, then those with G, each read
    # from its ref where used, not held. The float32 products with H and G take the state
    # as the left operand (computed transposed, then transposed back), so that Triton
    # stages it in shared memory, not a (c, n) float32 left operand in registers.
    L, to_end, from_start, total, causal = _chunk_decays(a_ref[...], c)
    Bk, Ck, dyk = b_ref[...], c_ref[...], dy_ref[...].astype(cd)
    u = x_ref[...].astype(f32) * dt_ref[...][:, None]
    S = _common.dot(Ck, Bk, trans_b=True)  # (c, c)
    P = _common.dot(dyk, u.astype(cd), trans_b=True) * L  # L * (dy u^T)
    # Gradients of the log decays: a_m is in seg[i, j] for j < m <= i, in from_start_i for
    # m <= i, in to_end_j for j < m, and in the chunk's total; each sum below spans exactly
    # those terms (no differences of larger sums, which would cancel where strong and weak
    # decays meet). First the segment sums': with M = d seg = L S (dy u^T) = S P,
    # spans[i, m] = sum_{j < m} M[i, j], a product with a 0/1 triangle. M is split exactly
    # into three bfloat16 parts (8 + 8 + 8 significant bits: hi + mid + lo == M in float32)
    # so that the three products are exact on the tensor cores and accumulate in float32:
    # a float32 ("highest") product here was a CUDA-core loop heavy in registers.
    M = S * P
    hi = M.astype(jnp.bfloat16)
    rest = M - hi.astype(f32)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(f32)).astype(jnp.bfloat16)
    strict_upper = (row < col).astype(jnp.bfloat16)  # [j, m] = j < m
    spans = _common.dot(hi, strict_upper) + _common.dot(mid, strict_upper)
    spans = spans + _common.dot(lo, strict_upper)
    da = jnp.sum(jnp.where(causal, spans, 0.0), axis=0)  # over i >= m
    SLc, Pc = (S * L).astype(cd), P.astype(cd)
    # The terms with H, the state entering the chunk: dC = P B + from_start * (dy H) and
    # d from_start_i (log) = from_start_i sum_p dy[i, p] (C H^T)[i, p]
    #                      = from_start_i sum_n C[i, n] (dy H)[i, n].
    dy32 = dy_ref[...].astype(f32)
    dyH = _common.dot(hs_ref[...], dy32, trans_a=True, trans_b=True).T  # (H^T dy^T)^T, (c, n)
    d_read = from_start * jnp.sum(c_ref[...].astype(f32) * dyH, axis=1)
    dc_ref[...] = _common.dot(Pc, b_ref[...]) + from_start[:, None] * dyH
    da = da + jnp.sum(jnp.where(causal, d_read[:, None], 0.0), axis=0)  # over i >= m
    # The terms with G, the gradient of the state leaving it: dB = P^T C + to_end * (u G),
    # du = (L S)^T dy + to_end * (B G^T) and d to_end_j (log) = to_end_j sum_n B (u G)[j, n].
    uG = _common.dot(gs_ref[...], u, trans_a=True, trans_b=True).T  # (G^T u^T)^T, (c, n)
    db_ref[...] = _common.dot(Pc, c_ref[...], trans_a=True) + to_end[:, None] * uG
    d_to_end = to_end * jnp.sum(b_ref[...].astype(f32) * uG, axis=1)
    BG = _common.dot(gs_ref[...], b_ref[...].astype(f32), trans_b=True).T  # (G B^T)^T, (c, bp)
    du = _common.dot(SLc, dy_ref[...].astype(cd), trans_a=True) + to_end[:, None] * BG
    dx = dt_ref[...][:, None] * du
    if d_ref is not None:
        dx = dx + d_ref[...][None, :] * dy_ref[...].astype(f32)  # dy read again: not held
    dx_ref[...] = dx.astype(dx_ref.dtype)
    ddt_ref[...] = jnp.sum(x_ref[...].astype(f32) * du, axis=1)
    d_total = total * jnp.sum(hs_ref[...] * gs_ref[...])
    da_ref[...] = da + jnp.sum(jnp.where(col < row, d_to_end[None, :], 0.0), axis=1) + d_total


class _Dims:
    """Padded sizes: chunk c, chunks nc, T = nc c, p padded to pp in tiles of bp, n to npad;
    r heads per group."""

    def __init__(self, x, B, chunk_size):
        b, t, h, p = x.shape
        self.b, self.t, self.h, self.p = b, t, h, p
        self.g, self.n = B.shape[2], B.shape[3]
        self.r = h // self.g
        self.c = min(chunk_size, max(_common.MIN_DOT, _next_pow2(t)))
        self.nc = -(-t // self.c)
        self.T = self.nc * self.c
        self.pp = max(_common.MIN_DOT, _next_pow2(p))
        self.bp = min(P_TILE, self.pp)
        self.tiles = self.pp // self.bp
        self.npad = max(_common.MIN_DOT, _next_pow2(self.n))


def _padded_inputs(d: _Dims, x, dt, A, B, C):
    """x (b, T, h, pp) and B, C (b, T, g, npad) in their common dtype; a = dt A and dt as
    (b, h, T) float32. Padding: dt = 0, x = B = C = 0 steps and zero p / n columns."""
    f32 = jnp.float32
    cd = jnp.result_type(x.dtype, B.dtype, C.dtype)
    x = _common.pad_axis(_common.pad_axis(x.astype(cd), 1, d.c), 3, d.pp)
    B, C = (_common.pad_axis(_common.pad_axis(z.astype(cd), 1, d.c), 3, d.npad) for z in (B, C))
    dt = dt.astype(f32)
    a = jnp.moveaxis(dt * A.astype(f32), 1, 2)  # (b, h, t): per-step log decay
    a, dt = (_common.pad_axis(z, 2, d.c) for z in (a, jnp.moveaxis(dt, 1, 2)))
    return x, a, dt, B, C


def _pad_state(d: _Dims, H):
    return _common.pad_axis(_common.pad_axis(H.astype(jnp.float32), 2, d.pp), 3, d.npad)


def _specs(d: _Dims, with_D: bool):
    """BlockSpecs of x, a, dt, B, C[, D] on the grid (batch, head, p tile)."""
    r = d.r
    specs = [
        pl.BlockSpec((None, d.T, None, d.bp), lambda i, j, k: (i, 0, j, k)),  # x
        pl.BlockSpec((None, None, d.T), lambda i, j, k: (i, j, 0)),  # a
        pl.BlockSpec((None, None, d.T), lambda i, j, k: (i, j, 0)),  # dt
        pl.BlockSpec((None, d.T, None, d.npad), lambda i, j, k: (i, 0, j // r, 0)),  # B (group)
        pl.BlockSpec((None, d.T, None, d.npad), lambda i, j, k: (i, 0, j // r, 0)),  # C (group)
    ]
    if with_D:
        specs.append(pl.BlockSpec((1,), lambda i, j, k: (j,)))
    return specs


def _state_spec(d: _Dims):
    return pl.BlockSpec((None, None, d.bp, d.npad), lambda i, j, k: (i, j, k, 0))


def _states_spec(d: _Dims):
    """All nc chunk states (b, h, nc, pp, npad) of one (batch, head, p tile)."""
    return pl.BlockSpec((None, None, d.nc, d.bp, d.npad), lambda i, j, k: (i, j, 0, k, 0))


def _chunk_specs(d: _Dims, with_D: bool):
    """BlockSpecs of one chunk of x, a, dt, B, C[, D] and of its (bp, n) state slice in a
    (b, h, nc, pp, npad) array, on the grid (batch, head, chunk x p tile)."""
    nt, r, c, bp, npad = d.tiles, d.r, d.c, d.bp, d.npad
    seq = pl.BlockSpec((None, c, None, bp), lambda i, j, m: (i, m // nt, j, m % nt))
    vec = pl.BlockSpec((None, None, c), lambda i, j, m: (i, j, m // nt))
    grp = pl.BlockSpec((None, c, None, npad), lambda i, j, m: (i, m // nt, j // r, 0))
    specs = [seq, vec, vec, grp, grp]
    if with_D:
        specs.append(pl.BlockSpec((1,), lambda i, j, m: (j,)))
    state = pl.BlockSpec((None, None, None, bp, npad), lambda i, j, m: (i, j, m // nt, m % nt, 0))
    return specs, seq, state


def _with_none(kernel, D, at: int):
    """``kernel`` called with None in the place of the absent D ref (position ``at``)."""
    if D is not None:
        return kernel
    return lambda *refs: kernel(*refs[:at], None, *refs[at:])


def _forward(x, dt, A, B, C, D, h0, *, chunk_size: int, keep_states: bool = False):
    """The Pallas forward on unpadded inputs: (y in x's dtype, H float32). Without
    ``keep_states`` the fused kernel; with it, the states kernel then the parallel chunks
    kernel, also returning the padded states entering each chunk (b, h, nc, pp, npad)."""
    f32 = jnp.float32
    d = _Dims(x, B, chunk_size)
    y_dtype = x.dtype
    x, a, dt, B, C = _padded_inputs(d, x, dt, A, B, C)
    Ds = [] if D is None else [D.astype(f32)]
    y_shape = jax.ShapeDtypeStruct((d.b, d.T, d.h, d.pp), y_dtype)
    h_shape = jax.ShapeDtypeStruct((d.b, d.h, d.pp, d.npad), f32)
    h0 = _pad_state(d, h0)
    if not keep_states:
        y, H = _common.call(
            _with_none(functools.partial(_fwd_kernel, nc=d.nc, c=d.c), D, 5),
            out_shape=(y_shape, h_shape),
            grid=(d.b, d.h, d.tiles),
            in_specs=[*_specs(d, D is not None), _state_spec(d)],
            out_specs=(_specs(d, False)[0], _state_spec(d)),
            name="ssd_fused_chunk_fwd",
            **LAUNCH["ssd_fused_chunk_fwd"],
        )(x, a, dt, B, C, *Ds, h0)
        return y[:, : d.t, :, : d.p], H[:, :, : d.p, : d.n]

    seq_specs = _specs(d, False)
    H, states = _common.call(
        functools.partial(_fwd_state_kernel, nc=d.nc, c=d.c),
        out_shape=(h_shape, jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.pp, d.npad), f32)),
        grid=(d.b, d.h, d.tiles),
        in_specs=[*seq_specs[:4], _state_spec(d)],
        out_specs=(_state_spec(d), _states_spec(d)),
        name="ssd_fwd_states",
        **LAUNCH["ssd_fwd_states"],
    )(x, a, dt, B, h0)
    specs, seq, state = _chunk_specs(d, D is not None)
    y = _common.call(
        _with_none(functools.partial(_fwd_chunk_kernel, c=d.c), D, 5),
        out_shape=y_shape,
        grid=(d.b, d.h, d.nc * d.tiles),
        in_specs=[*specs, state],
        out_specs=seq,
        name="ssd_fwd_chunks",
        **LAUNCH["ssd_fwd_chunks"],
    )(x, a, dt, B, C, *Ds, states)
    return (y[:, : d.t, :, : d.p], H[:, :, : d.p, : d.n]), states


def _backward(chunk_size, res, cts):
    """Gradients of (x, dt, A, B, C, D, h0): two Pallas kernels (the state gradients chunk by
    chunk in reverse, then every chunk in parallel); the sums over p tiles and over the heads
    of a group, d(dt) = x . du + A da, dA and dD = sum dy x in XLA."""
    x_in, dt_in, A, B_in, C_in, D, h0, states = res
    dy, dH = cts
    f32 = jnp.float32
    d = _Dims(x_in, B_in, chunk_size)
    x, a, dt, B, C = _padded_inputs(d, x_in, dt_in, A, B_in, C_in)
    dy_p = _common.pad_axis(_common.pad_axis(dy.astype(x.dtype), 1, d.c), 3, d.pp)
    seq_specs = _specs(d, False)
    grads_out, dh0 = _common.call(
        functools.partial(_bwd_state_kernel, nc=d.nc, c=d.c),
        out_shape=(
            jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.pp, d.npad), f32),
            jax.ShapeDtypeStruct((d.b, d.h, d.pp, d.npad), f32),
        ),
        grid=(d.b, d.h, d.tiles),
        in_specs=[seq_specs[1], seq_specs[4], seq_specs[0], _state_spec(d)],  # a, C, dy, dH
        out_specs=(_states_spec(d), _state_spec(d)),
        name="ssd_bwd_states",
        **LAUNCH["ssd_bwd_states"],
    )(a, C, dy_p, _pad_state(d, dH))

    # Grid (batch, head, chunk x p tile): every chunk independent given H and G.
    nt, c, npad = d.tiles, d.c, d.npad
    specs, seq, state = _chunk_specs(d, D is not None)
    tile_t = pl.BlockSpec((None, None, c, None, npad), lambda i, j, m: (i, m % nt, m // nt, j, 0))
    tile_v = pl.BlockSpec((None, None, None, c), lambda i, j, m: (i, m % nt, j, m // nt))
    Ds = [] if D is None else [D.astype(f32)]
    per_tile = (d.b, nt, d.T, d.h, npad)
    dx, dB, dC, ddt, da = _common.call(
        _with_none(functools.partial(_bwd_chunk_kernel, c=c), D, 5),
        out_shape=(
            jax.ShapeDtypeStruct((d.b, d.T, d.h, d.pp), x.dtype),
            jax.ShapeDtypeStruct(per_tile, f32),
            jax.ShapeDtypeStruct(per_tile, f32),
            jax.ShapeDtypeStruct((d.b, nt, d.h, d.T), f32),
            jax.ShapeDtypeStruct((d.b, nt, d.h, d.T), f32),
        ),
        grid=(d.b, d.h, d.nc * nt),
        in_specs=[*specs, state, state, seq],
        out_specs=(seq, tile_t, tile_t, tile_v, tile_v),
        name="ssd_bwd_chunks",
        **LAUNCH["ssd_bwd_chunks"],
    )(x, a, dt, B, C, *Ds, states, grads_out, dy_p)

    def group_sum(z):  # (b, tiles, T, h, npad) -> (b, t, g, n)
        z = jnp.sum(z, axis=1)[:, : d.t, :, : d.n]
        return jnp.sum(z.reshape(d.b, d.t, d.g, d.r, d.n), axis=3)

    da = jnp.moveaxis(jnp.sum(da, axis=1)[..., : d.t], 1, 2)  # (b, t, h)
    ddt = jnp.moveaxis(jnp.sum(ddt, axis=1)[..., : d.t], 1, 2)
    dt32 = dt_in.astype(f32)
    ddt = ddt + A.astype(f32) * da
    dA = jnp.sum(dt32 * da, axis=(0, 1))
    dD = None
    if D is not None:
        dD = jnp.einsum("bthp,bthp->h", dy.astype(f32), x_in.astype(f32)).astype(D.dtype)
    return (
        dx[:, : d.t, :, : d.p].astype(x_in.dtype),
        ddt.astype(dt_in.dtype),
        dA.astype(A.dtype),
        group_sum(dB).astype(B_in.dtype),
        group_sum(dC).astype(C_in.dtype),
        dD,
        dh0[:, :, : d.p, : d.n].astype(h0.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd(x, dt, A, B, C, D, h0, chunk_size):
    return _forward(x, dt, A, B, C, D, h0, chunk_size=chunk_size)


def _ssd_fwd(x, dt, A, B, C, D, h0, chunk_size):
    out, states = _forward(x, dt, A, B, C, D, h0, chunk_size=chunk_size, keep_states=True)
    return out, (x, dt, A, B, C, D, h0, states)


_ssd.defvjp(_ssd_fwd, _backward)


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
    """SSD on one shard, unpacked rows, forward and backward in Pallas.

    Shapes as in :func:`effseq.ops.ssd.ssd` (validated there); ``h0`` is given (float32).
    ``chunk_size`` must be a power of two >= 16; a sequence shorter than it runs as one chunk
    of the next power of two >= max(t, 16). Returns ``(y, h_last)``: y (b, t, h, p) in x's
    dtype, h_last (b, h, p, n) float32.
    """
    _common.check_tile(OP, "chunk_size", chunk_size)
    return _ssd(x, dt, A, B, C, D, h0, chunk_size)
