"""Pallas kernel of the gated delta rule (Gated DeltaNet): ``gated_delta_rule(impl="pallas")``.

The maths is :mod:`effseq.ops.delta_rule`'s chunked WY/UT form (Yang et al. 2024,
arXiv:2406.06484, section 3; with gates, Yang, Kautz & Hatamizadeh 2025, arXiv:2412.06464,
section 3.3), row-vector convention, with gates G_t = exp(log_g_t) one per head (Gated
DeltaNet) or one per key channel (KDA, Kimi Team 2025, arXiv:2510.26692). Within a chunk of c
steps entered with the state S_0 (k x v), with Gamma_t = G_1 ... G_t (a scalar or a k-vector,
products and quotients of which act per key channel) and q already scaled:

    A[s, r] = beta_s sum_i k_s[i] k_r[i] Gamma_s[i] / Gamma_r[i]   (r < s)
    T = (I + A)^-1                                 the UT transform
    W = T diag(beta) (K * Gamma),  U0 = T diag(beta) V
    U = U0 - W S_0                                 the corrections u_s = beta_s (v_s - k_s S'_s)
    O = (Q * Gamma) S_0 + P U,     P[t, s] = sum_i q_t[i] k_s[i] Gamma_t[i] / Gamma_s[i] (s <= t)
    S_c = diag(Gamma_c) S_0 + (K * Gamma_c / Gamma)^T U

Split between XLA and Pallas (forward):

* XLA, in the wrapper, for all chunks at once: the running sums of the log gates within each
  chunk as a compensated pair (pre, lo) (``delta_rule._cumulative_log_gates``), A and its
  inverse T (``delta_rule._unit_lower_inverse``: blockwise doubling, log2(c) rounds of
  batched matmuls; a c-row forward substitution inside a Triton kernel would need a masked
  update of the whole (c, c) tile per row, and T is state-independent, so it stays with the
  other all-chunks-at-once work). With per-key-channel gates also P: its (c, c, k) decay
  tensor does not fit a kernel's registers, so it is formed here like A and passed in.
* Pallas, one kernel (``_forward_kernel``), the fla-style "fused chunk" form: grid over
  (batch, head, value tiles of width ``block_v``), all independent; inside, a
  ``lax.fori_loop`` over the chunks carries S (k x block_v, float32) and per chunk forms
  U = T diag(beta) (V - (K * Gamma) S_0) (the same U: W S_0 = T X S_0 with X =
  diag(beta) (K * Gamma), so the (c, k) tile W is never formed), with per-head gates also P
  (q k^T times the masked decays, exp of compensated log-gate differences, -inf above the
  diagonal so nothing overflows), writes O and updates S. Per head every gate is a (c, 1)
  column and is applied to the (c, block_v) side of a product (Q * Gamma) S = Gamma (Q S),
  (K * E)^T U = K^T (E U), so q and k stay as stored: the kernels hold no (c, k) float32
  tile. One kernel rather than two (chunk states, then outputs): the state never leaves the
  chip, each input is read once per value tile, and P, recomputed per value tile, is
  O(c^2 k) per chunk against the O(c k block_v) of the state products.

Backward: Pallas for the chunk loop, autodiff for the XLA terms. The kernel is a
``jax.custom_vjp``: its forward also saves the state entering every chunk ((b, h, n k, v)
float32, as fla's chunked kernels do). The backward is two kernels, as the forward's work
splits into a recurrence and per-chunk products:

* ``_backward_state_kernel``, grid (batch, head, value tile), sequential: the chunks in
  reverse carrying dL/dS in float32; per chunk it recomputes P and writes dU (the
  corrections' gradient) and dL/dS leaving the chunk; the last carry is dh0. It keeps few
  tiles live (no S, no U, no W: W^T dU = X^T (T^T dU)), like the forward.
* ``_backward_chunk_kernel``, grid (batch, head, chunk x value tile), all independent: from
  the saved S, dL/dS' and dU it recomputes U and forms the gradients of the scaled query, k,
  v, beta, the running log gates and T, and per key channel of P (the formulas are in the
  docstrings). The heavy per-chunk products run in parallel over chunks, not inside the
  recurrence. Gradients other than dv sum over the value axis: each value tile writes its
  share and XLA adds the shares. Its own value tile (``BLOCK_V_CHUNKS``): wider than the
  sequential kernels' (fewer shares, less recomputation of the per-chunk (c, c) terms),
  which already have n times more programs to fill the GPU. Its products with S come first
  and those with S^T last, so the two shared-memory copies of S (one per operand layout of
  the TF32 products) are not live at once.

JAX's autodiff then takes dT, dP and the log-gate gradient back through the XLA terms (the UT
transform's inverse, A, P, the running sums) to q, k, beta and log_g, as it does for the XLA
chunked path. ``BACKWARD = "xla"`` switches to the first version, which recomputes the whole
backward through the XLA chunked path (``jax.vjp`` of ``delta_rule._chunked``), kept as a
cross-check.

Dtypes: q, k, v reach the kernel in their own dtype (q k^T, the one product of inputs alone,
runs on bf16 operands as they are); gates, beta, T and the state are float32. A product of
bf16 q or k with a float32 tile (the state, U, dO, ...) runs as bf16 products: the float32
side is split into 2 bf16 terms (16 significant bits, finer than the TF32 of the default
matmul precision) or 3 where the precision is 'highest' (all 24), see ``_dot``; q and k are
never widened to float32 tiles (half the registers, the bf16 tensor-core rate). Products of
float32 tiles alone use ``_common.dot`` (float32 accumulation at the configured matmul
precision). o comes back in the dtype of q, the final state in float32.

Padding (exact): t up to a multiple of the chunk with zero keys, beta 0 and log gate 0 (an
identity step: nothing decays, nothing is written; its outputs are dropped); the key and value
widths up to powers of two >= 16 with zero columns of q, k, v and h0 (a zero key channel
neither reads nor writes the state, whose extra rows stay 0; a zero value column stays 0 in
U and S), sliced off after.

Fit (``python -m effseq.benchmarks.kernel_report --ops gated_delta_rule``: Triton's compile
for sm_90 at b 1, t 1024, 16 heads x 128, bf16, chunk 64): every kernel fits Hopper's
227 KiB of shared memory (68-112 KiB) and uses wgmma; per head the forward spills nothing,
the sequential backward 60 B, the chunk backward 64 B. ``BLOCK_V``, ``BLOCK_V_CHUNKS`` and
``LAUNCH`` (warps, software-pipelining stages) were chosen by that report. Per key channel
(KDA) the (c, k) gate tiles are float32: the forward spills 0.6 KB, the sequential backward
1.2 KB, the chunk backward 0.3 KB.

Limits: packed rows (``segment_ids``) are refused with a ValueError (``"chunked"`` and
``"recurrent"`` support them). Not yet timed on a GPU (no GPU was at hand when this was
written).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from effseq.ops.pallas import _common
from effseq.typing import Array

OP = "gated_delta_rule"
# Value-tile width of the grid of the forward and of the backward's sequential kernel: the
# state tile is (k, BLOCK_V) float32.
BLOCK_V = 16
# Value-tile width of the backward's chunk-parallel kernel (its grid has n chunks x v /
# BLOCK_V_CHUNKS programs per head, and every gradient but dv is summed over the tiles).
BLOCK_V_CHUNKS = 32
# "pallas": the chunk loop's backward is a Pallas kernel, the XLA terms (T, the running log
# gates) are differentiated by autodiff; "xla": the whole backward recomputes through the XLA
# chunked path (the first version, kept as a cross-check).
BACKWARD = "pallas"
# Triton launch parameters per kernel: (num_warps, num_stages), from kernel_report at
# k = v = 128, chunk 64 (fewest spills). Per head the forward's loop keeps its load
# pipelining (without it: 44 B of spills); the sequential backward spills 5x more with it.
# Per key channel the forward reads the log gates afresh for each (c, kp) gate tile, which
# pipelined would need more shared memory than a block has; unpipelined it halves the spills.
LAUNCH = {"fwd": (4, 2), "fwd_per_channel": (4, 1), "bwd_state": (4, 1), "bwd_chunks": (8, 1)}


def _launch(kernel: str, per_channel: bool = False) -> dict:
    warps, stages = LAUNCH.get(kernel + "_per_channel" if per_channel else kernel, LAUNCH[kernel])
    return dict(num_warps=warps, num_stages=stages)


def _next_pow2(n: int, least: int = _common.MIN_DOT) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


class _Chunk(dict):
    """A chunk's tiles, the gate terms formed on first use (see :func:`_chunk`)."""

    def __missing__(self, key):
        self[key] = value = self.again(key)
        return value

    def again(self, key):
        """``key`` formed anew (not the cached one), from fresh reads where the chunk has
        ``fresh_reads``: a (c, kp) term used early and late need not be live in between."""
        return dict.__getitem__(self, "_make")(key)


def _chunk(refs, i, c: int, per_channel: bool, fresh_reads: bool = False):
    """Chunk ``i``'s inputs and the state-independent quantities built from them.

    Returns a dict: q, k (as stored), v (float32), beta (c, 1), T (c, c); F = Gamma_t and
    E = Gamma_c / Gamma_t as (c, 1) per head or (c, kp) per key channel, gc = Gamma_c as a
    column (1, 1) or (kp, 1) that scales the state's rows; per head also D[t, s] =
    Gamma_t / Gamma_s for s <= t else 0 (c, c), per key channel instead P, the XLA-formed
    (c, c) read-out matrix. The gate terms are traced where a kernel first uses them, each
    from its own reads of the running log gates: per key channel they are (c, kp) float32
    tiles, and Triton emits them in program order, so F and E are then not live together.
    Per head no (c, kp) float32 tile is formed: the kernels apply the per-head gates to the
    narrower (c, bv) side of each product (see :func:`_gdot`).
    """
    q_ref, k_ref, v_ref, beta_ref, pre_ref, lo_ref, t_ref = refs[:7]
    f32 = jnp.float32
    # A traced chunk index (the loops) is hinted as a multiple of c; a constant one is not.
    span = pl.ds(i * c if isinstance(i, int) else pl.multiple_of(i * c, c), c)
    end = pl.ds(i * c + c - 1, 1)
    x = _Chunk(q=q_ref[span, :], k=k_ref[span, :], T=t_ref[span, :], span=span)
    x["beta"] = beta_ref[span][:, None]
    x["v"] = v_ref[span, :].astype(f32)
    if per_channel:
        x["P"] = refs[7][span, :]

    def gates(whole: bool):
        """(pre, lo) of the chunk's steps (``whole``) or of its last one."""
        rows = span if whole else end
        if per_channel:
            return pre_ref[rows, :], lo_ref[rows, :]  # (c or 1, kp)
        return pre_ref[rows][:, None], lo_ref[rows][:, None]  # (c or 1, 1)

    loaded = {}

    def make(key):
        if not loaded or fresh_reads:
            loaded.update(whole=gates(True), last=gates(False))
        (pre, lo), (pre_end, lo_end) = loaded["whole"], loaded["last"]
        if key == "F":
            return jnp.exp(pre + lo)
        if key == "E":
            return jnp.exp((pre_end - pre) + (lo_end - lo))
        if key == "gc":
            return jnp.transpose(jnp.exp(pre_end + lo_end))
        assert key == "D" and not per_channel, key
        rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
        cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
        expo = (pre - jnp.transpose(pre)) + (lo - jnp.transpose(lo))
        # -inf above the diagonal before the exp: those entries are exactly 0, no overflow.
        return jnp.exp(jnp.where(rows >= cols, expo, -jnp.inf))

    x["_make"] = make
    return x


def _split_terms() -> int:
    """How many bfloat16 terms an f32 operand is split into against a bf16 one: 3 (the f32
    significand whole) where JAX's matmul precision asks for IEEE float32, else 2 (16 bits,
    finer than TF32's 11, the default's rounding of an f32 product on a GPU)."""
    return 3 if _common._precision() is not None else 2


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """:func:`_common.dot`, but a product of a bfloat16 tile (q, k as stored) with a float32
    one runs as bf16 products: the f32 side is split into bf16 terms hi + lo (+ lo2), each
    exact in bf16, and their products summed in float32. The bf16 tile then never becomes a
    float32 one (half its registers, and the tensor cores' bf16 rate) and the result is
    within 2^-16 of the f32 product's (exact at 'highest'), where TF32 gives 2^-11."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    if (a.dtype == bf16) != (b.dtype == bf16) and f32 in (a.dtype, b.dtype):
        wide_is_a = a.dtype == f32
        wide = a if wide_is_a else b
        total = None
        for _ in range(_split_terms()):
            term = wide.astype(bf16)
            wide = wide - term.astype(f32)
            part = _common.dot(
                term if wide_is_a else a, b if wide_is_a else term, trans_a=trans_a, trans_b=trans_b
            )
            total = part if total is None else total + part
        return total
    if a.dtype != b.dtype:
        a, b = a.astype(f32), b.astype(f32)
    return _common.dot(a, b, trans_a=trans_a, trans_b=trans_b)


def _gdot(a, G, m, *, trans_a: bool = False, trans_b: bool = False):
    """(a * G) @ m (``trans_a``: (a * G)^T @ m; ``trans_b``: (a * G) @ m^T) for a (c, kp) tile
    ``a`` scaled row-wise by G (c, 1) (per-head gates) or elementwise by G (c, kp) (per key
    channel). With a column G the scaling moves to the (c, bv) side (m's rows, or the result's
    rows): a (c, kp) float32 tile is then never formed, and ``a`` stays in its own dtype
    (:func:`_dot`)."""
    if G.shape[1] != 1:
        return _common.dot(a.astype(jnp.float32) * G, m, trans_a=trans_a, trans_b=trans_b)
    if trans_a:
        return _dot(a, G * m, trans_a=True)
    return G * _dot(a, m, trans_b=trans_b)


def _read_out(x, scale):
    """The chunk's (c, c) read-out matrix P (scale included)."""
    if "P" in x:
        return x["P"]
    return _common.dot(x["q"], x["k"], trans_b=True) * (x["D"] * scale[:, None])


def _forward_kernel(*refs, c: int, n: int, kp: int, per_channel: bool, save_states: bool):
    """One (batch, head, value tile): the chunks in order, the state carried in float32.

    Per chunk, with V' = V - (K * Gamma) S_0 (c, bv), U = T diag(beta) V' (= U0 - W S_0 of
    the module docstring, with W's (c, kp) tile never formed), O = (Q * Gamma) S_0 + P U and
    S_c = diag(Gamma_c) S_0 + (K * E)^T U.

    Refs: q, k (tp, kp), v (tp, bv), beta (tp,), pre, lo (tp,) per head or (tp, kp) per key
    channel, T (tp, c) (row t of chunk i holds row t of that chunk's T), per key channel P
    (tp, c) likewise, h0 (kp, bv), scale (1,); out o (tp, bv), S_last (kp, bv) and, with
    ``save_states``, the state entering every chunk (n kp, bv) for the backward.
    """
    nin = 8 if per_channel else 7
    inputs, (h0_ref, scale_ref), outs = refs[:nin], refs[nin : nin + 2], refs[nin + 2 :]
    o_ref, s_ref = outs[:2]
    scale = scale_ref[...]  # (1,), broadcasts

    def body(i, S):
        x = _chunk(inputs, i, c, per_channel, fresh_reads=per_channel)
        if save_states:
            outs[2][pl.ds(pl.multiple_of(i * kp, kp), kp), :] = S
        F = x["F"]
        U = _common.dot(x["T"], x["beta"] * (x["v"] - _gdot(x["k"], F, S)))  # (c, bv)
        o = _gdot(x["q"], F * scale[:, None], S) + _common.dot(_read_out(x, scale), U)
        o_ref[x["span"], :] = o.astype(o_ref.dtype)
        return x["gc"] * S + _gdot(x["k"], x["E"], U, trans_a=True)

    s_ref[...] = lax.fori_loop(0, n, body, h0_ref[...].astype(jnp.float32))


def _backward_state_kernel(*refs, c: int, n: int, kp: int, per_channel: bool):
    """Backward, sequential part. One (batch, head, value tile): the chunks in reverse,
    carrying dL/dS in float32. Per chunk, with dO and dS' the gradients of its outputs and of
    the state leaving it, and P recomputed:

        dU = P^T dO + (K * E) dS'      dY = T^T dU      (Y = diag(beta) V')
        dS = (Q~ * Gamma)^T dO + diag(Gamma_c) dS' - (K * Gamma)^T diag(beta) dY

    (E = Gamma_c / Gamma; W^T dU = X^T T^T dU with X = diag(beta) (K * Gamma), so W is not
    formed). Writes dU (the gradient of the corrections) and dS' per chunk, for
    :func:`_backward_chunk_kernel`, and dS of the first chunk as dh0.

    Refs: the forward's inputs, scale (1,), dO (tp, bv), dS_last (kp, bv); out dU (tp, bv),
    dS' (n kp, bv), dh0 (kp, bv).
    """
    f32 = jnp.float32
    nin = 8 if per_channel else 7
    inputs, (scale_ref, do_ref, ds_ref) = refs[:nin], refs[nin : nin + 3]
    du_ref, dstates_ref, dh0_ref = refs[nin + 3 :]
    scale = scale_ref[...]

    def body(j, dS):
        i = n - 1 - j
        x = _chunk(inputs, i, c, per_channel)
        dstates_ref[pl.ds(pl.multiple_of(i * kp, kp), kp), :] = dS
        dO = do_ref[x["span"], :].astype(f32)
        F = x["F"]
        dU = _common.dot(_read_out(x, scale), dO, trans_a=True) + _gdot(x["k"], x["E"], dS)
        du_ref[x["span"], :] = dU
        dY = _common.dot(x["T"], dU, trans_a=True)
        dS_in = _gdot(x["q"], F * scale[:, None], dO, trans_a=True) + x["gc"] * dS
        return dS_in - _gdot(x["k"], x["beta"] * F, dY, trans_a=True)

    dh0_ref[...] = lax.fori_loop(0, n, body, ds_ref[...].astype(f32))


def _backward_chunk_kernel(*refs, c: int, per_channel: bool):
    """Backward, parallel part. One (batch, head, chunk, value tile), all independent: with
    S the saved state entering the chunk, dS' and dU from :func:`_backward_state_kernel`, and
    the forward's V' = V - (K * Gamma) S, R = diag(beta) V', U = T R and P recomputed:

        dY = T^T dU, dT = dU R^T, dv = diag(beta) dY, dbeta = rowsum(dY * V')
        dQg = dO S^T, dP = dO U^T, d(K * E) = U dS'^T, dX = -dY S^T, dGamma_c = <S, dS'>

    (X = diag(beta) (K * Gamma); dX = T^T dW with dW = -dU S^T, and dT = dW X^T + dU Y^T
    = dU R^T), and from those the gradients of the scaled query q~, k, the running log
    gates (Gamma = exp of them); per head P = (q~ k^T) * D is differentiated here too, per
    key channel dP is written for XLA. Per head the log-gate gradient is a row sum, and each
    of its (c, kp) terms is read off a (c, bv) one (e.g. rowsum(dQg * Qg) = scale F
    rowsum(dO * (q S))), so the only (c, kp) float32 tiles are the dq and dk accumulators.
    Every gradient but dv sums over the value axis, so this tile's share is written and the
    wrapper adds the tiles up.

    Refs: the forward's inputs as (c, ...) blocks, scale (1,), S, dS' (kp, bv), dO, dU
    (c, bv); out dq~, dk (c, kp), dv (c, bv), dbeta (c,), dgamma (c,) or (c, kp), dT (c, c),
    and per key channel dP (c, c).
    """
    f32 = jnp.float32
    nin = 8 if per_channel else 7
    inputs, (scale_ref, s_ref, ds_ref, do_ref, du_ref) = refs[:nin], refs[nin : nin + 5]
    dq_ref, dk_ref, dv_ref, dbeta_ref, dgamma_ref, dt_ref = refs[nin + 5 : nin + 11]
    scale = scale_ref[...]
    last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    x = _chunk(inputs, 0, c, per_channel, fresh_reads=True)
    T, beta, q, k = x["T"], x["beta"], x["q"], x["k"]
    # Program order matters for shared memory: the products with S and dS' as the right
    # operand (contracting over k) come first, those with S^T and dS'^T (contracting over the
    # value tile) last, after S and dS' are read again, so Triton's two shared-memory copies
    # of each (one per operand layout) are not live at once.
    S, dS = s_ref[...], ds_ref[...]
    state_end = jnp.sum(S * dS, axis=1, keepdims=True) * x["gc"]  # (kp, 1)
    KS = _gdot(k, x["F"], S)  # (K * Gamma) S, (c, bv)
    if not per_channel:
        qS = _dot(q, S)  # (c, bv)
        kdS = _gdot(k, x["E"], dS)  # (K * E) dS': rowsum(d(K * E) * (K * E)) = rowsum(U * kdS)
    dO, dU = do_ref[...].astype(f32), du_ref[...]
    Vp = x["v"] - KS
    R = beta * Vp
    U = _common.dot(T, R)
    dY = _common.dot(T, dU, trans_a=True)
    dt_ref[...] = _common.dot(dU, R, trans_b=True)
    dv_ref[...] = (beta * dY).astype(dv_ref.dtype)
    dbeta_ref[...] = jnp.sum(dY * Vp, axis=1)
    dP = _common.dot(dO, U, trans_b=True)  # (c, c)
    if per_channel:
        refs[nin + 11][...] = dP
        S, dS = s_ref[...], ds_ref[...]
        kf = k.astype(f32)
        F = x.again("F")
        dq = _common.dot(dO, S, trans_b=True) * F  # dQg * Gamma
        dgamma = dq * (q.astype(f32) * scale[:, None])  # dQg * Qg
        a1 = _common.dot(U, dS, trans_b=True) * x.again("E")  # d(K * E) * E
        a2 = _common.dot(dY, S, trans_b=True) * (-beta * F)  # dX * beta Gamma
        dk_ref[...] = a1 + a2
        at_end = jnp.sum(a1 * kf, axis=0, keepdims=True) + jnp.transpose(state_end)
        dgamma_ref[...] = dgamma + kf * (a2 - a1) + jnp.where(last, at_end, 0.0)
        dq_ref[...] = dq
        return
    # Per head: F, E, beta are (c, 1) columns, scaled onto the (c, bv) / (c, c) side; the
    # log-gate gradient is a row sum, each (c, kp) term of it read off a (c, bv) one.
    P = _read_out(x, scale)
    dPD = dP * x["D"]
    through_end = jnp.sum(U * kdS, axis=1)
    M = dP * P
    at_end = jnp.sum(through_end) + jnp.sum(state_end)
    dgamma_ref[...] = (
        jnp.sum(M, axis=1)
        - jnp.sum(M, axis=0)
        + jnp.sum(dO * qS, axis=1) * (scale * x["F"][:, 0])
        - through_end
        - jnp.sum(dY * KS, axis=1) * beta[:, 0]
        + jnp.where(last[:, 0], at_end, 0.0)
    )
    S, dS = s_ref[...], ds_ref[...]
    dq_ref[...] = _common.dot(x["F"] * dO, S, trans_b=True) + _dot(dPD, k)
    dk = _common.dot(x["E"] * U, dS, trans_b=True) - _common.dot(
        beta * x["F"] * dY, S, trans_b=True
    )
    dk_ref[...] = dk + _dot(dPD, q, trans_a=True) * scale[:, None]


class _Layout:
    """Grid and block specs for padded shapes; static (a ``custom_vjp`` non-diff argument)."""

    def __init__(self, b, h, tp, c, kp, vp, bv, per_channel):
        self.b, self.h, self.tp, self.c, self.kp, self.vp, self.bv = b, h, tp, c, kp, vp, bv
        self.per_channel = per_channel
        self.n = tp // c
        self.nin = 8 if per_channel else 7  # kernel inputs before h0 / scale
        self.grid = (b, h, vp // bv)

    def seq(self, width: int, tiled: bool = False):  # (b, tp, h, width)
        if tiled:
            return pl.BlockSpec((None, self.tp, None, width), lambda b, h, v: (b, 0, h, v))
        return pl.BlockSpec((None, self.tp, None, width), lambda b, h, v: (b, 0, h, 0))

    def step(self):  # (b, tp, h)
        return pl.BlockSpec((None, self.tp, None), lambda b, h, v: (b, 0, h))

    def gates(self):  # (b, tp, h) or (b, tp, h, kp)
        return self.seq(self.kp) if self.per_channel else self.step()

    def state(self, rows: int):  # (b, h, rows, vp)
        return pl.BlockSpec((None, None, rows, self.bv), lambda b, h, v: (b, h, 0, v))

    def scalar(self):
        return pl.BlockSpec((1,), lambda b, h, v: (0,))

    def share(self, width: int | None):  # (nv, b, tp, h[, width]): one value tile's share
        if width is None:
            return pl.BlockSpec((None, None, self.tp, None), lambda b, h, v: (v, b, 0, h))
        return pl.BlockSpec((None, None, self.tp, None, width), lambda b, h, v: (v, b, 0, h, 0))

    def inputs(self):
        specs = [self.seq(self.kp), self.seq(self.kp), self.seq(self.bv, tiled=True)]
        specs += [self.step(), self.gates(), self.gates(), self.seq(self.c)]
        return specs + [self.seq(self.c)] if self.per_channel else specs

    # Per-chunk blocks on the grid (b, h, n * nv) of the backward's parallel part.
    def chunk_index(self, p):
        return p // self.grid[2], p % self.grid[2]  # (chunk, value tile)

    def c_seq(self, width: int, tiled: bool = False):  # (b, tp, h, width)
        def index(b, h, p):
            i, v = self.chunk_index(p)
            return (b, i, h, v if tiled else 0)

        return pl.BlockSpec((None, self.c, None, width), index)

    def c_step(self):  # (b, tp, h)
        return pl.BlockSpec((None, self.c, None), lambda b, h, p: (b, self.chunk_index(p)[0], h))

    def c_gates(self):  # (b, tp, h) or (b, tp, h, kp)
        return self.c_seq(self.kp) if self.per_channel else self.c_step()

    def c_state(self):  # (b, h, n kp, vp): chunk i's (kp, bv) tile
        return pl.BlockSpec(
            (None, None, self.kp, self.bv), lambda b, h, p: (b, h, *self.chunk_index(p))
        )

    def c_share(self, width: int | None):  # (nv, b, tp, h[, width])
        def index(b, h, p):
            i, v = self.chunk_index(p)
            return (v, b, i, h) if width is None else (v, b, i, h, 0)

        shape = (None, None, self.c, None) + (() if width is None else (width,))
        return pl.BlockSpec(shape, index)

    def c_inputs(self):
        specs = [self.c_seq(self.kp), self.c_seq(self.kp), self.c_seq(self.bv, tiled=True)]
        specs += [self.c_step(), self.c_gates(), self.c_gates(), self.c_seq(self.c)]
        return specs + [self.c_seq(self.c)] if self.per_channel else specs

    def kwargs(self):
        return dict(c=self.c, n=self.n, kp=self.kp, per_channel=self.per_channel)


def _forward_call(lay: _Layout, inputs, h0, scale, *, save_states: bool):
    f32 = jnp.float32
    b, h, tp, kp, vp = lay.b, lay.h, lay.tp, lay.kp, lay.vp
    out_shape = [
        jax.ShapeDtypeStruct((b, tp, h, vp), inputs[0].dtype),
        jax.ShapeDtypeStruct((b, h, kp, vp), f32),
    ]
    out_specs = [lay.seq(lay.bv, tiled=True), lay.state(kp)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, lay.n * kp, vp), f32))
        out_specs.append(lay.state(lay.n * kp))
    return _common.call(
        functools.partial(_forward_kernel, save_states=save_states, **lay.kwargs()),
        out_shape=tuple(out_shape),
        grid=lay.grid,
        in_specs=[*lay.inputs(), lay.state(kp), lay.scalar()],
        out_specs=tuple(out_specs),
        name="gated_delta_rule_fwd",
        **_launch("fwd", lay.per_channel),
    )(*inputs, h0, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(lay: _Layout, inputs, h0, scale):
    """The chunk loop on padded inputs (q, k, v, beta, pre, lo, T[, P]): (o (b, tp, h, vp),
    S_last (b, h, kp, vp))."""
    return tuple(_forward_call(lay, inputs, h0, scale, save_states=False))


def _kernel_fwd(lay, inputs, h0, scale):
    o, S, states = _forward_call(lay, inputs, h0, scale, save_states=True)
    return (o, S), (inputs, scale, states)


def _kernel_bwd(lay, residuals, cotangents):
    inputs, scale, states = residuals
    q, k, v = inputs[:3]
    dO, dS = cotangents
    f32 = jnp.float32
    b, h, tp, kp, vp, c = lay.b, lay.h, lay.tp, lay.kp, lay.vp, lay.c
    # Sequential: dU per step and dL/dS' per chunk, in reverse; dh0.
    dU, dstates, dh0 = _common.call(
        functools.partial(_backward_state_kernel, **lay.kwargs()),
        out_shape=(
            jax.ShapeDtypeStruct((b, tp, h, vp), f32),
            jax.ShapeDtypeStruct((b, h, lay.n * kp, vp), f32),
            jax.ShapeDtypeStruct((b, h, kp, vp), f32),
        ),
        grid=lay.grid,
        in_specs=[*lay.inputs(), lay.scalar(), lay.seq(lay.bv, tiled=True), lay.state(kp)],
        out_specs=(lay.seq(lay.bv, tiled=True), lay.state(lay.n * kp), lay.state(kp)),
        name="gated_delta_rule_bwd_state",
        **_launch("bwd_state"),
    )(*inputs, scale, dO, dS)
    # Parallel over chunks: everything else, on its own value tile (BLOCK_V_CHUNKS).
    lay = _Layout(b, h, tp, c, kp, vp, min(BLOCK_V_CHUNKS, vp), lay.per_channel)
    nv = lay.grid[2]
    shares = lambda *shape: jax.ShapeDtypeStruct((nv, b, tp, h, *shape), f32)  # noqa: E731
    gate_width = kp if lay.per_channel else None
    out_shape = [shares(kp), shares(kp), jax.ShapeDtypeStruct((b, tp, h, vp), v.dtype)]
    out_shape += [shares(), shares(*(() if gate_width is None else (gate_width,))), shares(c)]
    out_specs = [lay.c_share(kp), lay.c_share(kp), lay.c_seq(lay.bv, tiled=True)]
    out_specs += [lay.c_share(None), lay.c_share(gate_width), lay.c_share(c)]
    if lay.per_channel:
        out_shape.append(shares(c))
        out_specs.append(lay.c_share(c))
    tile = lay.c_seq(lay.bv, tiled=True)
    grads = _common.call(
        functools.partial(_backward_chunk_kernel, c=c, per_channel=lay.per_channel),
        out_shape=tuple(out_shape),
        grid=(b, h, lay.n * nv),
        in_specs=[*lay.c_inputs(), lay.scalar(), lay.c_state(), lay.c_state(), tile, tile],
        out_specs=tuple(out_specs),
        name="gated_delta_rule_bwd_chunks",
        **_launch("bwd_chunks"),
    )(*inputs, scale, states, dstates, dO, dU)
    dq, dk, dv, dbeta, dgamma, dT = grads[:6]
    dq = dq.sum(0)  # the gradient of the scaled query q~ = scale q
    dscale = jnp.sum(dq * q.astype(f32)).reshape(1)
    dgamma = dgamma.sum(0)  # o and S depend on pre + lo only
    d_inputs = [(dq * scale).astype(q.dtype), dk.sum(0).astype(k.dtype), dv, dbeta.sum(0)]
    d_inputs += [dgamma, dgamma, dT.sum(0)]
    if lay.per_channel:
        d_inputs.append(grads[6].sum(0))
    return tuple(d_inputs), dh0, dscale


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def _forward(q, k, v, log_g, beta, h0, scale, *, chunk_size: int, block_v: int):
    """Pads, forms the XLA terms, runs the kernel, unpads; differentiable (Pallas backward
    for the kernel, autodiff for the XLA terms). Returns (o in q's dtype, S_last float32)."""
    from effseq.ops.delta_rule import (
        _cumulative_log_gates,
        _decayed_products,
        _unit_lower_inverse,
    )

    f32 = jnp.float32
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    per_channel = log_g.ndim == 4
    c = min(chunk_size, _next_pow2(t))
    n = -(-t // c)
    tp = n * c
    kp, vp = _next_pow2(dk), _next_pow2(dv)
    lay = _Layout(b, h, tp, c, kp, vp, min(block_v, vp), per_channel)

    q = _common.pad_axis(_common.pad_axis(q, 1, c), 3, kp)
    k = _common.pad_axis(_common.pad_axis(k, 1, c), 3, kp)
    v = _common.pad_axis(_common.pad_axis(v, 1, c), 3, vp)
    g = _common.pad_axis(log_g.astype(f32), 1, c)
    g = _common.pad_axis(g, 3, kp) if per_channel else g[..., None]  # (b, tp, h, kp or 1)
    beta = _common.pad_axis(beta.astype(f32), 1, c)
    h0 = _common.pad_axis(_common.pad_axis(h0.astype(f32), 2, kp), 3, vp)
    scale = jnp.reshape(jnp.asarray(scale, f32), (1,))

    # XLA: compensated running log gates per chunk, A and T = (I + A)^-1 (and per key channel
    # P), for all chunks at once.
    chunked = lambda x: jnp.moveaxis(x.reshape(b, n, c, h, *x.shape[3:]), 3, 2)  # noqa: E731
    unchunk = lambda x: jnp.moveaxis(x, 2, 3).reshape(b, tp, h, *x.shape[4:])  # noqa: E731
    pre, lo = _cumulative_log_gates(chunked(g))  # (b, n, h, c, kp or 1)
    k_c = chunked(k.astype(f32))  # (b, n, h, c, kp)
    A = _decayed_products(chunked(beta)[..., None] * k_c, k_c, pre, lo, strict=True)
    T = unchunk(_unit_lower_inverse(A))  # (b, tp, h, c)
    extra = ()
    if per_channel:
        q_c = chunked(q.astype(f32)) * scale
        extra = (unchunk(_decayed_products(q_c, k_c, pre, lo, strict=False)),)
        pre, lo = unchunk(pre), unchunk(lo)  # (b, tp, h, kp)
    else:
        pre, lo = unchunk(pre[..., 0]), unchunk(lo[..., 0])  # (b, tp, h)
    inputs = (q, k, v, beta, pre, lo, T, *extra)
    if BACKWARD == "xla":
        o, S = _forward_call(lay, inputs, h0, scale, save_states=False)
    else:
        o, S = _kernel(lay, inputs, h0, scale)
    return o[:, :t, :, :dv], S[:, :, :dk, :dv]


def _xla(q, k, v, log_g, beta, h0, scale, *, chunk_size: int):
    """The XLA chunked path on the same inputs: what the XLA backward differentiates."""
    from effseq.ops.delta_rule import _chunked

    f32 = jnp.float32
    o, S = _chunked(
        q.astype(f32) * scale,
        k.astype(f32),
        v.astype(f32),
        log_g.astype(f32) if log_g.ndim == 4 else log_g.astype(f32)[..., None],
        beta.astype(f32),
        h0.astype(f32),
        chunk_size=chunk_size,
    )
    return o.astype(q.dtype), S


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _recompute_op(q, k, v, log_g, beta, h0, scale, chunk_size, block_v):
    return _forward(q, k, v, log_g, beta, h0, scale, chunk_size=chunk_size, block_v=block_v)


def _recompute_fwd(q, k, v, log_g, beta, h0, scale, chunk_size, block_v):
    out = _forward(q, k, v, log_g, beta, h0, scale, chunk_size=chunk_size, block_v=block_v)
    return out, (q, k, v, log_g, beta, h0, scale)


def _recompute_bwd(chunk_size, block_v, residuals, cotangents):
    del block_v
    _, vjp = jax.vjp(functools.partial(_xla, chunk_size=chunk_size), *residuals)
    return vjp(cotangents)


_recompute_op.defvjp(_recompute_fwd, _recompute_bwd)


def gated_delta_rule_pallas(
    q: Array,
    k: Array,
    v: Array,
    log_g: Array,
    beta: Array,
    h0: Array,
    scale: float | Array,
    *,
    chunk_size: int,
    block_v: int | None = None,
) -> tuple[Array, Array]:
    """:func:`effseq.ops.delta_rule.gated_delta_rule` with ``impl="pallas"`` on one shard,
    unpacked, t > 0, inputs validated: q, k (b, t, h, k), v (b, t, h, v), log_g (b, t, h) (one
    gate per head) or (b, t, h, k) (one per key channel), beta (b, t, h), h0 (b, h, k, v)
    float32, scale a float or scalar array.
    ``block_v``: the value-tile width of the forward and of the sequential backward kernel,
    None for ``BLOCK_V`` (the chunk backward uses ``BLOCK_V_CHUNKS``). Returns ``(o, S_last)``: o
    (b, t, h, v) in q's dtype, S_last (b, h, k, v) float32."""
    block_v = BLOCK_V if block_v is None else block_v
    _common.check_tile(OP, "chunk_size", chunk_size)
    _common.check_tile(OP, "block_v", block_v)
    scale = jnp.asarray(scale, jnp.float32)
    if BACKWARD == "xla":
        return _recompute_op(q, k, v, log_g, beta, h0, scale, chunk_size, block_v)
    return _forward(q, k, v, log_g, beta, h0, scale, chunk_size=chunk_size, block_v=block_v)


__all__ = ["gated_delta_rule_pallas"]
