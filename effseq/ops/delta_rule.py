"""The gated delta rule: Gated DeltaNet, and KDA with one gate per key channel.

Yang, Kautz & Hatamizadeh (ICLR 2025), "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(arXiv:2412.06464), eq. 10; with a gate per key channel instead of per head it is Kimi Delta
Attention (Kimi Team 2025, "Kimi Linear", arXiv:2510.26692). In the row-vector convention, with
gates G_t = exp(log_g_t) in (0, 1] (one per head, or one per key channel) and beta_t in [0, 1]:

    S'_t = diag(G_t) S_{t-1}                                  S (k, v)
    S_t  = S'_t + k_t^T (beta_t (v_t - k_t S'_t))              the delta rule on the decayed state
         = (I - beta_t k_t^T k_t) diag(G_t) S_{t-1} + beta_t k_t^T v_t
    o_t  = (scale * q_t) S_t                                   o_t (v)

Keys and queries are used as given (the layers L2-normalise them; with ||k_t|| <= 1 and beta_t in
[0, 1] the transition I - beta_t k_t^T k_t is non-expansive).

Forms of the same maths:

* :func:`gated_delta_rule_reference`: the two update lines above in a ``lax.scan`` over time.
* :func:`gated_delta_rule_step`: one token, for decoding.
* ``impl="recurrent"``: the step scanned token by token, rematerialised per segment.
* ``impl="chunked"`` (default): the chunkwise-parallel form with the WY/UT representation of a
  chunk's delta updates (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
  Rule over Sequence Length", arXiv:2406.06484, section 3; with gates, Yang et al. 2025,
  section 3.3). Inside a chunk entered with state S_0 and with Gamma_t = G_1 ... G_t, the
  state after step t is diag(Gamma_t) S_0 + sum_{s<=t} diag(Gamma_t / Gamma_s) k_s^T u_s, where
  u_s = beta_s (v_s - k_s S'_s) is the step's correction. Substituting S'_s gives the
  unit-lower-triangular system (I + A) U = diag(beta) (V - (K * Gamma) S_0) with
  A[s, r] = beta_s sum_i k_s[i] k_r[i] Gamma_s[i] / Gamma_r[i] for r < s, so
  U = T diag(beta) V - T diag(beta) (K * Gamma) S_0 with T = (I + A)^-1 (the UT transform,
  inverted blockwise by doubling, all matmuls). Everything except the terms in S_0 is
  independent across chunks and computed for all chunks at once; a ``lax.scan`` then carries
  S_0 from chunk to chunk with three small matmuls. Every decay Gamma_t / Gamma_s (s <= t) is
  exp of a non-positive sum of log gates, formed in log space with the rounding of the running
  sums compensated, so gates down to exp(-20) per step neither overflow nor lose accuracy.
* ``impl="pallas"``: the same chunked form with the loop over chunks (and its backward) as
  Pallas kernels, Triton on NVIDIA GPUs, interpret mode on a CPU
  (:mod:`effseq.ops.pallas.delta`); per-head and per-key-channel gates, no packed rows.

Packed sequences (``segment_ids``, the convention of :mod:`effseq.ops.segments`): at a document
start the state is zeroed before the step's own update. The reference and the recurrent form
reset inside their scans; the chunked form stays chunked: every decay Gamma_t / Gamma_s is
multiplied by "no start in (s, t]" (:func:`effseq.ops.segments.chunk_masks`), so A (and with it
T) and P decouple per document, the terms in S_0 reach only the chunk's first document
(carry_in), and only the last document's corrections reach the state leaving the chunk.
Cost, fwd+bwd with per-head gates at b = 2, t = 4096, h = 4, k = v = 64, chunk 64, on a 2-core
CPU shared with other jobs (medians of 5, two runs): 711 / 507 ms without ids, 668 / 506 ms
with 8 random documents per row, the same within the noise.

Speed (2-core CPU, jax 0.10.2, b = 2, t = 4096, h = 4, k = v = 64, float32, fwd+bwd of o):
chunked with per-head gates 191 ms at chunk 64 (143 at 32, 131 at 16), ``"recurrent"`` 351 ms,
the reference scan 773 ms, causal XLA attention 1049 ms. Per-channel gates (KDA) form a
(c, c, k) decay tensor per chunk: 1926 ms at chunk 64, 471 ms at chunk 16.

Everything runs in float32 whatever the input dtype; ``o`` is cast back to the dtype of ``q``
and states are returned in float32.
"""

from __future__ import annotations

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
from effseq.typing import Array


def _check_unit_interval(op: str, name: str, x) -> None:
    """Raises if a concrete ``x`` has an entry outside [0, 1]; traced values are not inspected."""
    try:
        values = np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    values = values.astype(np.float32)
    if values.size and (np.nanmin(values) < 0 or np.nanmax(values) > 1):
        raise ValueError(
            f"{op}: `{name}` holds delta-rule step sizes and must lie in [0, 1], got values in "
            f"[{float(np.nanmin(values)):.4g}, {float(np.nanmax(values)):.4g}] in "
            f"{_checks.shape_str(x)}"
        )


def _check_gate_rank(op: str, name: str, log_g, rank: int, per_head: str, per_key: str) -> None:
    """Gates come per head (rank ``rank``) or per key channel (one more axis)."""
    if not hasattr(log_g, "shape"):
        _checks.check_rank(op, name, log_g, rank, per_head)  # raises the TypeError
    if log_g.ndim not in (rank, rank + 1):
        raise ValueError(
            f"{op}: `{name}` must have rank {rank} {per_head} (one gate per head) or "
            f"{rank + 1} {per_key} (one per key channel), got {_checks.shape_str(log_g)}"
        )


def _validate(op: str, q, k, v, log_g, beta, h0) -> None:
    for name, x, layout in (
        ("q", q, "(b, t, h, k)"),
        ("k", k, "(b, t, h, k)"),
        ("v", v, "(b, t, h, v)"),
        ("beta", beta, "(b, t, h)"),
    ):
        _checks.check_rank(op, name, x, len(layout.split(",")), layout)
    _check_gate_rank(op, "log_g", log_g, 3, "(b, t, h)", "(b, t, h, k)")
    arrays = [("q", q), ("k", k), ("v", v), ("log_g", log_g), ("beta", beta)]
    if h0 is not None:
        _checks.check_rank(op, "h0", h0, 4, "(b, h, k, v)")
        arrays.append(("h0", h0))
    for name, x in arrays:
        _checks.check_real(op, name, x)
    dims = [
        (name, x, axis, letter)
        for name, x in arrays
        if name != "h0"
        for axis, letter in enumerate("bth")
    ]
    dims += [("q", q, 3, "k"), ("k", k, 3, "k"), ("v", v, 3, "v")]
    if log_g.ndim == 4:
        dims.append(("log_g", log_g, 3, "k"))
    if h0 is not None:
        dims += [("h0", h0, axis, letter) for axis, letter in enumerate("bhkv")]
    _checks.check_dims(op, dims)
    _checks.check_nonpositive(op, "log_g", log_g)
    _check_unit_interval(op, "beta", beta)


def _step(S, q_t, k_t, v_t, g_t, beta_t):
    """Unchecked float32 step; ``q_t`` already scaled, g_t (b, h, 1) or (b, h, k) log gates.

    S (b, h, k, v), q_t, k_t (b, h, k), v_t (b, h, v), beta_t (b, h).
    """
    S = jnp.exp(g_t)[..., None] * S
    u = beta_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S))
    S = S + k_t[..., :, None] * u[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", q_t, S)


def _gates_per_channel(log_g: Array) -> Array:
    """Per-head gates (..., h) get a trailing axis of 1, which broadcasts over k."""
    return log_g if log_g.ndim == 4 else log_g[..., None]


def gated_delta_rule_step(
    S: Array,
    q_t: Array,
    k_t: Array,
    v_t: Array,
    log_g_t: Array,
    beta_t: Array,
    scale=None,
) -> tuple[Array, Array]:
    """One token of the gated delta rule (Yang, Kautz & Hatamizadeh 2025, eq. 10).

    Decays the state by exp(log_g_t), applies the delta update
    S += k_t^T (beta_t (v_t - k_t S)), and reads it with scale * q_t.

    Args:
      S: (b, h, k, v) state before the token.
      q_t, k_t: (b, h, k) query and key.
      v_t: (b, h, v) value.
      log_g_t: (b, h) log gate per head (GDN), or (b, h, k) per key channel (KDA); <= 0.
      beta_t: (b, h) step size in [0, 1].
      scale: query scale; None means k ** -0.5.

    Returns:
      ``(S, o_t)``: the new state (b, h, k, v) in float32 and the output (b, h, v) in the dtype
      of ``q_t``.
    """
    op = "gated_delta_rule_step"
    _checks.check_rank(op, "S", S, 4, "(b, h, k, v)")
    for name, x, layout in (
        ("q_t", q_t, "(b, h, k)"),
        ("k_t", k_t, "(b, h, k)"),
        ("v_t", v_t, "(b, h, v)"),
        ("beta_t", beta_t, "(b, h)"),
    ):
        _checks.check_rank(op, name, x, len(layout.split(",")), layout)
    _check_gate_rank(op, "log_g_t", log_g_t, 2, "(b, h)", "(b, h, k)")
    arrays = (("S", S), ("q_t", q_t), ("k_t", k_t), ("v_t", v_t))
    arrays += (("log_g_t", log_g_t), ("beta_t", beta_t))
    for name, x in arrays:
        _checks.check_real(op, name, x)
    dims = [("S", S, axis, letter) for axis, letter in enumerate("bhkv")]
    dims += [
        (name, x, axis, letter)
        for name, x in (("q_t", q_t), ("k_t", k_t))
        for axis, letter in enumerate("bhk")
    ]
    dims += [("v_t", v_t, axis, letter) for axis, letter in enumerate("bhv")]
    dims += [(name, x, axis, "bhk"[axis]) for name, x in arrays[4:] for axis in range(x.ndim)]
    _checks.check_dims(op, dims)
    _checks.check_nonpositive(op, "log_g_t", log_g_t)
    _check_unit_interval(op, "beta_t", beta_t)
    f32 = jnp.float32
    g_t = log_g_t if log_g_t.ndim == 3 else log_g_t[..., None]
    S, o_t = _step(
        S.astype(f32),
        q_t.astype(f32) * default_scale(scale, q_t.shape[-1]),
        k_t.astype(f32),
        v_t.astype(f32),
        g_t.astype(f32),
        beta_t.astype(f32),
    )
    return S, o_t.astype(q_t.dtype)


def gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    log_g: Array,
    beta: Array,
    *,
    scale=None,
    h0: Array | None = None,
    chunk_size: int = 64,
    impl: str | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """The gated delta rule over a sequence (Yang, Kautz & Hatamizadeh 2025, eq. 10).

    S_t = diag(exp(log_g_t)) S_{t-1}, then S_t += k_t^T (beta_t (v_t - k_t S_t)), and
    o_t = (scale * q_t) S_t, with S_0 = h0.

    Args:
      q, k: (b, t, h, k) queries and keys, used as given (normalise them before).
      v: (b, t, h, v) values.
      log_g: (b, t, h) log gates, one per head (Gated DeltaNet), or (b, t, h, k), one per key
        channel (KDA); <= 0.
      beta: (b, t, h) delta-rule step sizes in [0, 1].
      scale: query scale; None means k ** -0.5.
      h0: (b, h, k, v) initial state, or None for zeros.
      chunk_size: chunk length c of the chunked form: t is padded to a multiple of c with steps
        that leave the state unchanged (a sequence shorter than c runs as one chunk of length
        t). Ignored by ``"recurrent"``.
      impl: ``"chunked"``, ``"recurrent"`` or ``"pallas"`` (the Pallas kernels of
        :mod:`effseq.ops.pallas.delta`, forward and backward; no ``segment_ids``); None picks
        the default (see ``ops._impl``).
      segment_ids: (b, t) integer document ids of packed rows (:mod:`effseq.ops.segments`): the
        state is zeroed where a new document starts; ``h0`` belongs to each row's first
        document and ``S_last`` is its last one's. None: one document per row.

    Sequence parallelism: under a mesh whose ``sequence`` axis splits t (it must divide), a
    slice maps the state entering it to M S + F with a dense (k, k) M. Each shard gets M and F
    from one local run with v + k value columns (from the state [0 | I], values [v | 0]), the
    shards all-gather them (:func:`effseq.ops.sequence.carry`), and each runs its slice again
    from the state entering it: two local passes, the first (v + k) / v times as wide in the
    values, one all-gather of (b, h, k, k + v) and n (k, k) x (k, v) products per shard.

    Returns:
      ``(o, S_last)``: o (b, t, h, v) in the dtype of ``q``; the final state (b, h, k, v) in
      float32.
    """
    op = "gated_delta_rule"
    impl = resolve_impl(op, impl)
    _validate(op, q, k, v, log_g, beta, h0)
    chunk_size = _checks.check_positive_int(op, "chunk_size", chunk_size)
    f32 = jnp.float32
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    starts = packed_starts(op, segment_ids, b, t)
    h0 = jnp.zeros((b, h, dk, dv), f32) if h0 is None else h0.astype(f32)
    if t == 0:
        return jnp.zeros((b, 0, h, dv), q.dtype), h0
    n = sequence.shards()
    if n > 1:
        sequence.check_length(op, t, n)
        return _sharded(q, k, v, log_g, beta, h0, scale, chunk_size, impl, segment_ids)
    if impl == "pallas":
        if segment_ids is not None:
            raise ValueError(
                f"{op}: impl='pallas' does not support packed rows (segment_ids); use "
                "impl='chunked' (the default) or 'recurrent', which do"
            )
        from effseq.ops.pallas._common import per_device
        from effseq.ops.pallas.delta import gated_delta_rule_pallas

        def kernel(q, k, v, log_g, beta, h0):
            return gated_delta_rule_pallas(
                q, k, v, log_g, beta, h0, default_scale(scale, dk), chunk_size=chunk_size
            )

        # Rows over data x fsdp, heads over tensor: each device runs its block of the kernel.
        return per_device(
            kernel, (q, k, v, log_g, beta, h0), (0,) * 6, (2, 2, 2, 2, 2, 1), (0, 0), (2, 1)
        )
    args = (
        q.astype(f32) * default_scale(scale, dk),
        k.astype(f32),
        v.astype(f32),
        _gates_per_channel(log_g).astype(f32),
        beta.astype(f32),
        h0,
    )
    if impl == "recurrent":
        o, S = _recurrent(*args, starts=starts)
    else:
        o, S = _chunked(*args, chunk_size=chunk_size, starts=starts)
    return o.astype(q.dtype), S


def _sharded(q, k, v, log_g, beta, h0, scale, chunk_size, impl, segment_ids):
    """:func:`gated_delta_rule` with time split over the sequence axis
    (:mod:`effseq.ops.sequence`). A slice maps the state entering it to M S + F with a dense
    (k, k) M acting on the key axis: the state update is linear in S and M does not depend on
    v, so one local run from [0 | I] with values [v | 0] gives F (its first v columns) and M
    (its last k) together. The summaries are folded across shards and each slice runs again
    from the state entering it."""
    scale = default_scale(scale, q.shape[-1])

    def local(q, k, v, log_g, beta, h0, seg, scale):
        edge = sequence.boundary_cut(seg)
        log_g = open_first_gate(log_g, edge)

        def run(S, v):
            return gated_delta_rule(
                q,
                k,
                v,
                log_g,
                beta,
                scale=scale,
                h0=S,
                chunk_size=chunk_size,
                impl=impl,
                segment_ids=seg,
            )

        b, _, h, dk = k.shape
        dv = v.shape[-1]
        # A start inside the slice resets the run, so M comes out 0 there by itself.
        eye = jnp.broadcast_to(jnp.eye(dk, dtype=h0.dtype), (b, h, dk, dk))
        unit = jnp.concatenate([jnp.zeros_like(h0), eye], axis=-1)
        _, summary = run(unit, jnp.concatenate([v, jnp.zeros((*v.shape[:3], dk), v.dtype)], -1))
        M = sequence.cut(summary[..., dv:], edge)
        incoming, last = sequence.carry(M, summary[..., :dv], h0, apply=_left_multiply)
        o, _ = run(sequence.cut(incoming, edge), v)
        return o, last

    time, whole = sequence.TIME, sequence.WHOLE
    specs = (time, time, time, time, time, whole, time, whole)
    return sequence.run(local, specs, (time, whole))(q, k, v, log_g, beta, h0, segment_ids, scale)


def _left_multiply(M: Array, S: Array) -> Array:
    """M S on the key axis: M (b, h, k, k), S (b, h, k, v)."""
    return jnp.einsum("bhij,bhjv->bhiv", M, S, precision=jax.lax.Precision.HIGHEST)


def _recurrent(q, k, v, g, beta, h0, *, starts=None):
    """The step form scanned token by token (segmented and rematerialised,
    :func:`effseq.ops._chunking.segmented_scan`); float32 inputs, ``q`` already scaled.
    ``starts`` (b, t) bool: zero the state before the step where a document starts."""
    if starts is None:
        return segmented_scan(lambda S, x: _step(S, *x), h0, (q, k, v, g, beta))
    step = lambda S, x: _step(reset_at_start(S, x[5]), *x[:5])  # noqa: E731
    return segmented_scan(step, h0, (q, k, v, g, beta, starts))


def _cumulative_log_gates(g: Array) -> tuple[Array, Array]:
    """Running sums of log gates g (..., c, kg) along axis -2 as a pair (pre, lo).

    pre + lo is the running sum nearly exactly: with log_g = -20, |pre| reaches 1280 within a
    chunk of 64, and ulp(1280) = 1.2e-4 would be a 1e-4 relative error in a decay of ~1 between
    nearby steps after a run of strong gates. TwoSum (Knuth) recovers each addition's rounding
    error; their running sum ``lo`` corrects a difference pre_t - pre_s (exact by Sterbenz when
    it is small, which is when the decay matters) to about an ulp of itself. See
    ``ops/gla.py``'s ``_rounding_residual`` for the measured effect.
    """
    pre = jnp.cumsum(g, axis=-2)
    prev = jnp.concatenate([jnp.zeros_like(pre[..., :1, :]), pre[..., :-1, :]], axis=-2)
    total = prev + g
    g_rounded = total - prev
    err = (prev - (total - g_rounded)) + (g - g_rounded)  # prev + g == total + err exactly
    return pre, jnp.cumsum((total - pre) + err, axis=-2)


def _decayed_products(
    x: Array, y: Array, pre: Array, lo: Array, strict: bool, same_doc: Array | None = None
) -> Array:
    """M[t, s] = sum_i x_t[i] y_s[i] exp(sum of log gates over (s, t]) for s <= t (s < t if
    ``strict``), else 0. x, y (..., c, k); pre, lo (..., c, kg) from _cumulative_log_gates;
    ``same_doc`` (..., c, c) 0/1: packed documents, the decay times "no start in (s, t]".

    The exponent is masked to -inf above the diagonal before the exp, so masked entries are
    exactly 0 and nothing overflows.
    """
    c, kg = pre.shape[-2:]
    expo = (pre[..., :, None, :] - pre[..., None, :, :]) + (
        lo[..., :, None, :] - lo[..., None, :, :]
    )
    mask = np.tril(np.ones((c, c), bool), -1 if strict else 0)[:, :, None]
    decay = jnp.exp(jnp.where(mask, expo, -jnp.inf))  # (..., c, c, kg)
    if kg == 1:  # one gate per head: a plain matmul, then the decay
        if same_doc is not None:
            return jnp.einsum("...tk,...sk->...ts", x, y) * (decay[..., 0] * same_doc)
        return jnp.einsum("...tk,...sk->...ts", x, y) * decay[..., 0]
    if same_doc is not None:
        decay = decay * same_doc[..., None]
    return jnp.einsum("...tk,...sk,...tsk->...ts", x, y, decay)


def _unit_lower_inverse(A: Array) -> Array:
    """(I + A)^-1 for strictly lower-triangular A (..., c, c): the UT transform's T.

    Blockwise doubling: with the diagonal blocks of size s already inverted (X1, X2), the
    inverse of the block of size 2s is [[X1, 0], [-X2 L21 X1, X2]], L21 being that block's
    lower-left part of A. log2(c) rounds of batched matmuls, each inverse exact for its block
    (no Neumann series, whose powers of A grow). ``jax.scipy.linalg.solve_triangular`` would do
    the same job, but its batched form under ``jax.grad`` deadlocked intermittently on CPU
    (jaxlib 0.10.2, t = 4096 fwd+bwd), and matmuls run well everywhere.
    """
    c = A.shape[-1]
    size = 1 << max(c - 1, 0).bit_length()  # next power of two; padding is identity rows
    A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, size - c)] * 2)
    batch = A.shape[:-2]
    D = jnp.ones((*batch, size, 1, 1), A.dtype)  # inverted diagonal blocks (..., m, s, s)
    s = 1
    while s < size:
        m = size // (2 * s)
        X1, X2 = D[..., 0::2, :, :], D[..., 1::2, :, :]
        # Diagonal blocks of size 2s of A, then their lower-left quarter (..., m, s, s).
        diag = jnp.diagonal(A.reshape(*batch, m, 2 * s, m, 2 * s), axis1=-4, axis2=-2)
        L21 = jnp.moveaxis(diag, -1, -3)[..., s:, :s]
        low = -jnp.einsum("...ij,...jk,...kl->...il", X2, L21, X1)
        top = jnp.concatenate([X1, jnp.zeros_like(X1)], axis=-1)
        D = jnp.concatenate([top, jnp.concatenate([low, X2], axis=-1)], axis=-2)
        s *= 2
    return D[..., 0, :c, :c]


def _chunk_terms(q, k, v, g, beta, masks=None):
    """The state-independent terms of every chunk; inputs (..., c, x) float32, q scaled;
    ``masks`` None or the float (intra, carry_in, to_end, carry_through) of packed documents
    (:func:`effseq.ops._chunking.float_chunk_masks`, broadcasting against (..., c, c), (..., c)
    and (...)).

    Returns (W, U0, Qg, P, Kend, decay): with S_0 the state entering the chunk, the corrections
    are U = U0 - W S_0, the outputs O = Qg S_0 + P U and the state leaving the chunk
    diag(decay) S_0 + Kend^T U. Shapes (..., c, k), (..., c, v), (..., c, k), (..., c, c),
    (..., c, k), (..., kg).
    """
    pre, lo = _cumulative_log_gates(g)
    from_start = jnp.exp(pre + lo)  # Gamma_t, (..., c, kg)
    to_end = jnp.exp((pre[..., -1:, :] - pre) + (lo[..., -1:, :] - lo))  # Gamma_c / Gamma_s
    bk = beta[..., None] * k
    if masks is not None:
        return _packed_chunk_terms(q, k, v, beta, pre, lo, from_start, to_end, bk, masks)
    A = _decayed_products(bk, k, pre, lo, strict=True)
    T = _unit_lower_inverse(A)
    W = jnp.einsum("...ts,...sk->...tk", T, bk * from_start)
    U0 = jnp.einsum("...ts,...sv->...tv", T, beta[..., None] * v)
    P = _decayed_products(q, k, pre, lo, strict=False)
    decay = from_start[..., -1, :]
    return W, U0, q * from_start, P, k * to_end, decay


def _packed_chunk_terms(q, k, v, beta, pre, lo, from_start, to_end, bk, masks):
    """:func:`_chunk_terms` with packed documents: every decay times "no start in (s, t]".

    A masked by ``intra`` is block-diagonal per document, so T = (I + A)^-1 is too and each
    document's corrections see only its own earlier steps; S_0 reaches the corrections and
    outputs of the chunk's first document only (``carry_in`` on Gamma_t), and only the last
    document's corrections (``to_end``) and S_0 when no document starts (``carry_through``)
    reach the state leaving the chunk.
    """
    intra, carry_in, to_end_mask, carry_through = masks
    from_start = from_start * carry_in[..., None]
    A = _decayed_products(bk, k, pre, lo, strict=True, same_doc=intra)
    T = _unit_lower_inverse(A)
    W = jnp.einsum("...ts,...sk->...tk", T, bk * from_start)
    U0 = jnp.einsum("...ts,...sv->...tv", T, beta[..., None] * v)
    P = _decayed_products(q, k, pre, lo, strict=False, same_doc=intra)
    decay = from_start[..., -1, :] * carry_through[..., None]
    return W, U0, q * from_start, P, k * (to_end * to_end_mask[..., None]), decay


def _chunked(q, k, v, g, beta, h0, *, chunk_size: int, starts=None):
    """Chunkwise-parallel gated delta rule (WY/UT form); float32 inputs, q already scaled.
    ``starts`` (b, t) bool: document starts of packed rows, or None."""
    t = q.shape[1]
    c = min(chunk_size, t)
    n = -(-t // c)
    if starts is None:
        chunks = tuple(to_chunks(x, n, c) for x in (q, k, v, g, beta))
        W, U0, Qg, P, Kend, decay = _chunk_terms(*chunks)
    else:
        # A start's own gate decays only the zeroed state: every factor it enters is masked or
        # a difference where it cancels. Setting it to 0 (an identity gate) changes no value
        # and makes its gradient exactly 0 rather than 0 up to the rounding of that cancellation.
        g = jnp.where(starts[:, :, None, None], 0.0, g)
        chunks = tuple(to_chunks(x, n, c) for x in (q, k, v, g, beta))
        W, U0, Qg, P, Kend, decay = _chunk_terms(*chunks, float_chunk_masks(starts, n, c))

    def chunk_step(S, xs):
        W, U0, Qg, P, Kend, decay = xs
        U = U0 - jnp.einsum("bhck,bhkv->bhcv", W, S)
        o = jnp.einsum("bhck,bhkv->bhcv", Qg, S) + jnp.einsum("bhts,bhsv->bhtv", P, U)
        S = decay[..., None] * S + jnp.einsum("bhck,bhcv->bhkv", Kend, U)
        return S, o

    S, o = jax.lax.scan(chunk_step, h0, (W, U0, Qg, P, Kend, decay))
    return from_chunks(o, t), S


def gated_delta_rule_reference(
    q: Array,
    k: Array,
    v: Array,
    log_g: Array,
    beta: Array,
    *,
    scale=None,
    h0: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Slow reference for :func:`gated_delta_rule`: a plain ``lax.scan`` over time.

    Eq. 10 of Yang, Kautz & Hatamizadeh (2025) step by step in float32 (decay, then the delta
    update, then the read), differentiated by plain autodiff, the state zeroed before the step
    where a document of ``segment_ids`` starts. Shapes as in
    :func:`gated_delta_rule`. Returns ``(o, S_last)``: o (b, t, h, v) in the dtype of ``q``,
    S_last (b, h, k, v) in float32.
    """
    op = "gated_delta_rule_reference"
    _validate(op, q, k, v, log_g, beta, h0)
    f32 = jnp.float32
    b, t, h, dk = q.shape
    starts = packed_starts(op, segment_ids, b, t)
    scale = default_scale(scale, dk)
    S = jnp.zeros((b, h, dk, v.shape[-1]), f32) if h0 is None else h0.astype(f32)

    def body(S, x):
        q_t, k_t, v_t, g_t, beta_t, *start_t = x  # g_t (b, h) or (b, h, k)
        if start_t:
            S = jnp.where(start_t[0][:, None, None, None], 0.0, S)
        S = jnp.exp(g_t if g_t.ndim == 3 else g_t[..., None])[..., None] * S
        kS = jnp.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + jnp.einsum("bhk,bhv->bhkv", k_t, beta_t[..., None] * (v_t - kS))
        return S, jnp.einsum("bhk,bhkv->bhv", scale * q_t, S)

    xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, log_g, beta))
    if starts is not None:
        xs = (*xs, jnp.moveaxis(starts, 1, 0))
    S, o = jax.lax.scan(body, S, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), S


__all__ = ["gated_delta_rule", "gated_delta_rule_reference", "gated_delta_rule_step"]
