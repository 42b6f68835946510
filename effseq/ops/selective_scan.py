"""Mamba's selective scan (S6): a diagonal linear recurrence whose parameters depend on the input.

Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", Algorithm 2
and eq. (2a)-(2b), with zero-order hold for A and the simplified Euler step for B (Sec. 3.5.2,
``dB = delta * B``). Per channel d and state n:

    x_t = exp(delta_t * A) ⊙ x_{t-1} + (delta_t * u_t) B_t        (eq. 2a, discretised)
    y_t = sum_n x_t ⊙ C_t + D ⊙ u_t                                (eq. 2b plus the skip term)

Shapes use the legend of :mod:`effseq.typing`: u, delta (b, t, d); A (d, n); B, C (b, t, n);
D (d,); states (b, d, n).

Implementations (``impl=``, resolved by :func:`effseq.ops._impl.resolve_impl`):

* ``"chunked"`` (default): time is cut into chunks of ``chunk_size``; a ``lax.scan`` over chunks
  carries the state, and inside a chunk the decays, inputs and readout are computed as whole-chunk
  array ops around :func:`effseq.ops.scan.linear_scan_time_major`. A ``jax.custom_vjp`` keeps only
  the inputs and the chunk-start states for the backward pass, which recomputes each chunk's states
  and runs the adjoint recurrence in reverse, so memory is O(t/c·b·d·n + c·b·d·n) instead of the
  O(t·b·d·n) that autodiff of a per-step scan stores. Being a ``custom_vjp``, it supports
  reverse-mode autodiff (grad, vjp) but not forward mode (jvp, jacfwd).
* ``"associative"``: the whole sequence in one ``lax.associative_scan`` (log depth), differentiated
  by plain autodiff; for accelerators, where depth matters more than memory traffic.
* ``"pallas"``: the Pallas kernels of :mod:`effseq.ops.pallas.selective` (Triton on NVIDIA GPUs,
  interpret mode on a CPU, where they are slow and only for checking): a forward kernel that
  keeps each (batch, channel tile)'s state in registers and walks time step by step, saving the
  state at every chunk start, and a reverse-time backward kernel that recomputes each chunk's
  states from those checkpoints and runs the adjoint recurrence. Forward and backward are both
  Pallas (only the sums of per-tile partial gradients of A, B, C, D are XLA); a ``custom_vjp``
  like the chunked path (reverse mode only). Never a default.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from effseq.ops import _checks, segments, sequence
from effseq.ops._impl import resolve_impl
from effseq.ops.scan import linear_scan_time_major
from effseq.typing import Array

__all__ = [
    "default_chunk_size",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_step",
]


def _validate(op, u, delta, A, B, C, D, h0):
    """Checks ranks, realness and that b/t/d/n agree; raises ValueError naming the argument."""
    named = [
        ("u", u, 3, "(b, t, d)"),
        ("delta", delta, 3, "(b, t, d)"),
        ("A", A, 2, "(d, n)"),
        ("B", B, 3, "(b, t, n)"),
        ("C", C, 3, "(b, t, n)"),
    ]
    if D is not None:
        named.append(("D", D, 1, "(d,)"))
    if h0 is not None:
        named.append(("h0", h0, 3, "(b, d, n)"))
    for name, x, rank, layout in named:
        _checks.check_rank(op, name, x, rank, layout)
        _checks.check_real(op, name, x)
    dims = [
        ("u", u, 0, "b"),
        ("delta", delta, 0, "b"),
        ("B", B, 0, "b"),
        ("C", C, 0, "b"),
        ("u", u, 1, "t"),
        ("delta", delta, 1, "t"),
        ("B", B, 1, "t"),
        ("C", C, 1, "t"),
        ("u", u, 2, "d"),
        ("delta", delta, 2, "d"),
        ("A", A, 0, "d"),
        ("A", A, 1, "n"),
        ("B", B, 2, "n"),
        ("C", C, 2, "n"),
    ]
    if D is not None:
        dims.append(("D", D, 0, "d"))
    if h0 is not None:
        dims += [("h0", h0, 0, "b"), ("h0", h0, 1, "d"), ("h0", h0, 2, "n")]
    _checks.check_dims(op, dims)


def _f32(x):
    return None if x is None else x.astype(jnp.float32)


def _step(h, u_t, delta_t, A, B_t, C_t):
    """One step of eq. (2a)-(2b) without the skip term, all float32. Shapes as in the step form."""
    decay = jnp.exp(delta_t[..., None] * A)
    h = decay * h + (delta_t * u_t)[..., None] * B_t[:, None, :]
    # A multiply-and-sum rather than a dot: exact float32 on every backend (no TF32 matmul).
    return h, jnp.sum(h * C_t[:, None, :], axis=-1)


def selective_scan_step(
    h: Array,
    u_t: Array,
    delta_t: Array,
    A: Array,
    B_t: Array,
    C_t: Array,
    D: Array | None = None,
) -> tuple[Array, Array]:
    """One token of the selective scan (Mamba eq. 2a-2b), for autoregressive decoding.

    Args:
      h: (b, d, n) state before this token (kept in float32).
      u_t: (b, d) input.
      delta_t: (b, d) positive step size (softplus already applied).
      A: (d, n) real state matrix (diagonal per channel).
      B_t: (b, n) input projection.
      C_t: (b, n) output projection.
      D: (d,) skip weight, or None for no skip term.

    Returns:
      ``(h, y_t)``: the new state (b, d, n) float32 and the output (b, d) in ``u_t``'s dtype.
    """
    op = "selective_scan_step"
    for name, x, rank, layout in [
        ("h", h, 3, "(b, d, n)"),
        ("u_t", u_t, 2, "(b, d)"),
        ("delta_t", delta_t, 2, "(b, d)"),
        ("A", A, 2, "(d, n)"),
        ("B_t", B_t, 2, "(b, n)"),
        ("C_t", C_t, 2, "(b, n)"),
        *([] if D is None else [("D", D, 1, "(d,)")]),
    ]:
        _checks.check_rank(op, name, x, rank, layout)
        _checks.check_real(op, name, x)
    _checks.check_dims(
        op,
        [
            ("h", h, 0, "b"),
            ("u_t", u_t, 0, "b"),
            ("delta_t", delta_t, 0, "b"),
            ("B_t", B_t, 0, "b"),
            ("C_t", C_t, 0, "b"),
            ("h", h, 1, "d"),
            ("u_t", u_t, 1, "d"),
            ("delta_t", delta_t, 1, "d"),
            ("A", A, 0, "d"),
            *([] if D is None else [("D", D, 0, "d")]),
            ("h", h, 2, "n"),
            ("A", A, 1, "n"),
            ("B_t", B_t, 1, "n"),
            ("C_t", C_t, 1, "n"),
        ],
    )
    u32 = _f32(u_t)
    h, y = _step(_f32(h), u32, _f32(delta_t), _f32(A), _f32(B_t), _f32(C_t))
    if D is not None:
        y = y + _f32(D) * u32
    return h, y.astype(u_t.dtype)


def selective_scan_reference(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    *,
    h0: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Slow reference: a plain per-step ``lax.scan`` over time in float32, plain autodiff.

    Same arguments and results as :func:`selective_scan`. Autodiff stores every step's
    residuals, O(t·b·d·n) memory; this is the baseline the fast path is measured against.
    With ``segment_ids`` the state is zeroed before each document start's step.
    """
    op = "selective_scan_reference"
    _validate(op, u, delta, A, B, C, D, h0)
    b, t, d = u.shape
    n = A.shape[1]
    A32 = _f32(A)
    h = jnp.zeros((b, d, n), jnp.float32) if h0 is None else _f32(h0)
    if segment_ids is None:
        starts = jnp.zeros((t, b), bool)
    else:
        segments.check_segment_ids(op, segment_ids, b, t)
        starts = jnp.moveaxis(segments.document_starts(segment_ids), 1, 0)

    def step(h, xs):
        u_t, delta_t, B_t, C_t, start_t = xs
        h = jnp.where(start_t[:, None, None], 0.0, h)
        return _step(h, u_t, delta_t, A32, B_t, C_t)

    xs = (*(jnp.moveaxis(_f32(x), 1, 0) for x in (u, delta, B, C)), starts)
    h_last, ys = jax.lax.scan(step, h, xs)
    y = jnp.moveaxis(ys, 0, 1)
    if D is not None:
        y = y + _f32(D) * _f32(u)
    return y.astype(u.dtype), h_last


def _contract(spec, x, y):
    """``einsum`` at full float32 precision (no TF32 / bf16 passes on accelerators).

    Contractions over n or d go through here rather than a multiply-and-sum: XLA:CPU lowers
    ``sum(hs * C[:, :, None, :], -1)`` to a slow reduction (0.85 ms against 0.06 ms for this
    dot on a (64, 1, 256, 16) chunk, 2-core CPU, jax 0.10.2), which made the readout most of the
    scan's time."""
    return jnp.einsum(spec, x, y, precision=jax.lax.Precision.HIGHEST)


def _chunk(x, i, chunk_size):
    """Chunk ``i`` of a batch-major (b, t, ...) array, time-major: (c, b, ...)."""
    return jnp.moveaxis(jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size, axis=1), 1, 0)


def _put_chunk(buf, x, i, chunk_size):
    """Writes a time-major chunk (c, b, ...) into a batch-major (b, t, ...) buffer, in place."""
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.moveaxis(x, 0, 1), i * chunk_size, axis=1)


def _chunk_states(h, u, delta, A, B, scan_impl, keep=None):
    """States of one chunk: u, delta (c, b, d); B (c, b, n); h (b, d, n) the start state;
    ``keep`` (c, b) float32, 0 where a document starts (its decay becomes 0), or None.

    Returns the decays exp(delta·A), the inputs (delta·u)·B and the states, each (c, b, d, n).
    """
    decay = jnp.exp(delta[..., None] * A)
    if keep is not None:
        decay = decay * keep[:, :, None, None]
    inp = (delta * u)[..., None] * B[:, :, None, :]
    return decay, inp, linear_scan_time_major(decay, inp, h, scan_impl)


def _keep_chunk(keep, i, chunk_size):
    return None if keep is None else _chunk(keep, i, chunk_size)


def _chunked_forward(u, delta, A, B, C, h0, keep, chunk_size, scan_impl, keep_starts):
    """Loop over chunks: u, delta (b, t, d); B, C (b, t, n); h0 (b, d, n); t a multiple of c.

    The (b, t, ·) arrays stay batch-major and are sliced chunk by chunk, and y is written into
    one buffer in place, so no time-major copy of a whole sequence is ever made.
    """

    def body(carry, i):
        h, y = carry
        B_c, C_c = _chunk(B, i, chunk_size), _chunk(C, i, chunk_size)
        _, _, hs = _chunk_states(
            h,
            _chunk(u, i, chunk_size),
            _chunk(delta, i, chunk_size),
            A,
            B_c,
            scan_impl,
            _keep_chunk(keep, i, chunk_size),
        )
        y = _put_chunk(y, _contract("cbdn,cbn->cbd", hs, C_c), i, chunk_size)
        return (hs[-1], y), h if keep_starts else None

    n_chunks = u.shape[1] // chunk_size
    (h_last, y), h_starts = jax.lax.scan(body, (h0, jnp.zeros_like(u)), jnp.arange(n_chunks))
    return y, h_last, h_starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _chunked_scan(u, delta, A, B, C, h0, keep, chunk_size, scan_impl):
    """The chunked scan without the skip term, float32: see :func:`_chunked_forward`.

    ``keep`` (b, t) float32 is 0 at document starts (None: no resets); it is a constant (its
    cotangent is zero). Zeroing a start's decay is exact for this multiplicative recurrence,
    and the backward pass below needs nothing more: the adjoint recurrence uses the same
    zeroed decays, so no gradient crosses a start, and a start's decay gradient
    g ⊙ (x - input) is zero because x = input there."""
    y, h_last, _ = _chunked_forward(u, delta, A, B, C, h0, keep, chunk_size, scan_impl, False)
    return y, h_last


def _chunked_scan_fwd(u, delta, A, B, C, h0, keep, chunk_size, scan_impl):
    y, h_last, h_starts = _chunked_forward(u, delta, A, B, C, h0, keep, chunk_size, scan_impl, True)
    return (y, h_last), (u, delta, A, B, C, keep, h_starts)


def _chunked_scan_bwd(chunk_size, scan_impl, res, cts):
    """Walks the chunks backwards: recompute the states from the chunk's start state, run the
    adjoint recurrence, then form every input's gradient with whole-chunk array ops."""
    u, delta, A, B, C, keep, h_starts = res
    g_y, g_last = cts

    def body(carry, i):
        # g_next: dL/d(state at the end of this chunk) from everything after it.
        g_next, g_A, g_u, g_delta, g_B, g_C = carry
        u_c, delta_c = _chunk(u, i, chunk_size), _chunk(delta, i, chunk_size)
        B_c, C_c = _chunk(B, i, chunk_size), _chunk(C, i, chunk_size)
        g_y_c = _chunk(g_y, i, chunk_size)
        decay, inp, hs = _chunk_states(
            h_starts[i], u_c, delta_c, A, B_c, scan_impl, _keep_chunk(keep, i, chunk_size)
        )
        # Adjoint recurrence g_k = C_k g_y_k + exp(delta_{k+1} A) g_{k+1}: the decay that
        # multiplies g_{k+1} is the next step's, and the chunk's last step sees g_next directly.
        decay_next = jnp.concatenate([decay[1:], jnp.ones_like(decay[:1])], axis=0)
        g_hs = linear_scan_time_major(
            decay_next, g_y_c[..., None] * C_c[:, :, None, :], g_next, scan_impl, reverse=True
        )
        g_du = _contract("cbdn,cbn->cbd", g_hs, B_c)  # w.r.t. delta·u
        # dL/d(decay) ⊙ decay = g_k ⊙ decay_k x_{k-1} = g_k ⊙ (x_k - input_k): no shifted copy of
        # the states is needed, and the error stays within an ulp of the state's magnitude.
        g_log_decay = g_hs * (hs - inp)
        g_A = g_A + jnp.sum(g_log_decay * delta_c[..., None], axis=(0, 1))
        g_u = _put_chunk(g_u, g_du * delta_c, i, chunk_size)
        g_delta_c = g_du * u_c + _contract("cbdn,dn->cbd", g_log_decay, A)
        g_delta = _put_chunk(g_delta, g_delta_c, i, chunk_size)
        g_B = _put_chunk(g_B, _contract("cbdn,cbd->cbn", g_hs, delta_c * u_c), i, chunk_size)
        g_C = _put_chunk(g_C, _contract("cbdn,cbd->cbn", hs, g_y_c), i, chunk_size)
        return (decay[0] * g_hs[0], g_A, g_u, g_delta, g_B, g_C), None

    zeros = jnp.zeros_like
    init = (g_last, zeros(A), zeros(u), zeros(delta), zeros(B), zeros(C))
    (g_h0, g_A, g_u, g_delta, g_B, g_C), _ = jax.lax.scan(
        body, init, jnp.arange(u.shape[1] // chunk_size), reverse=True
    )
    g_keep = None if keep is None else jnp.zeros_like(keep)
    return g_u, g_delta, g_A, g_B, g_C, g_h0, g_keep


_chunked_scan.defvjp(_chunked_scan_fwd, _chunked_scan_bwd)


# The default chunk on CPU: each chunk's (c, b, d, n) float32 arrays near this many elements
# (2 MiB), so the dozen of them a chunk's backward pass touches stay in cache. Measured fwd+bwd
# (2-core CPU, jax 0.10.2), chunk 8 / 16 / 32 / 64: (b, d, n) = (32, 80, 16) at t=128, 17.5 /
# 18.0 / 28.2 / 40.6 ms; (8, 512, 16) at t=512, 117 / 124 / 156 / 186 ms; (2, 512, 16) at
# t=4096, 288 / 266 / 244 / 261 ms; (1, 256, 16) at t=1024, all within 2% of each other.
_CPU_CHUNK_ELEMENTS = 2**19
_CHUNK_RANGE = (8, 64)
# Where the scan inside a chunk is associative (the accelerator default of linear_scan), the
# chunk loop's iterations are the sequential part: keep chunks long (not yet tuned on a GPU).
_ASSOCIATIVE_CHUNK = 64


def default_chunk_size(b: int, d: int, n: int) -> int:
    """The chunk length ``selective_scan`` uses when ``chunk_size`` is None.

    With the sequential inner scan (the CPU default): the power of two nearest
    ``2**19 / (b·d·n)``, clipped to 8..64; with the associative one (accelerators): 64.
    """
    if resolve_impl("linear_scan", None) != "sequential":
        return _ASSOCIATIVE_CHUNK
    lo, hi = _CHUNK_RANGE
    target = _CPU_CHUNK_ELEMENTS / max(b * d * n, 1)
    return int(min(max(2 ** round(math.log2(target)), lo), hi))


def _selective_scan_chunked(u, delta, A, B, C, h0, chunk_size, keep=None):
    t = u.shape[1]
    # A chunk longer than the sequence would only add padded steps.
    chunk_size = min(chunk_size, t)
    # Padding with delta = u = B = C = 0 gives decay exp(0·A) = 1 and zero input, so the padded
    # steps carry the state through unchanged and h_last stays exact.
    pad = -t % chunk_size
    if pad:
        u, delta, B, C = (jnp.pad(x, [(0, 0), (0, pad), (0, 0)]) for x in (u, delta, B, C))
        if keep is not None:
            keep = jnp.pad(keep, [(0, 0), (0, pad)], constant_values=1.0)
    y, h_last = _chunked_scan(
        u, delta, A, B, C, h0, keep, chunk_size, resolve_impl("linear_scan", None)
    )
    return y[:, :t], h_last


def _selective_scan_associative(u, delta, A, B, C, h0, keep=None):
    # Time-major from the start, so only the small (b, t, ·) arrays are ever transposed.
    u, delta, B, C = (jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C))
    if keep is not None:
        keep = jnp.moveaxis(keep, 1, 0)
    # The whole sequence as one chunk.
    _, _, hs = _chunk_states(h0, u, delta, A, B, "associative", keep)
    y = _contract("tbdn,tbn->tbd", hs, C)
    return jnp.moveaxis(y, 0, 1), hs[-1]


def selective_scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    *,
    h0: Array | None = None,
    impl: str | None = None,
    chunk_size: int | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Mamba's selective scan (S6), Gu & Dao 2023, Algorithm 2 / eq. (2a)-(2b).

    x_t = exp(delta_t A) ⊙ x_{t-1} + (delta_t u_t) ⊗ B_t;  y_t = sum_n x_t ⊙ C_t + D ⊙ u_t.
    Accumulates in float32 whatever the input dtype.

    Args:
      u: (b, t, d) input.
      delta: (b, t, d) positive step size (the caller has applied softplus).
      A: (d, n) real state matrix (diagonal per channel; negative for a stable scan).
      B: (b, t, n) input-dependent input projection.
      C: (b, t, n) input-dependent output projection.
      D: (d,) skip weight, or None for no skip term.
      h0: (b, d, n) initial state, or None for zeros.
      impl: ``"chunked"``, ``"associative"`` or ``"pallas"``; None picks the default
        (``"chunked"``).
      chunk_size: steps per chunk of the chunked path (a positive int), or None for
        :func:`default_chunk_size` (8 to 64 on CPU, sized to the cache; 64 elsewhere). With
        ``impl="pallas"``: the steps between the kernels' state checkpoints, unrolled in the
        kernels, a power of two (None: 16; above 32 taken as 32). Ignored by ``"associative"``.
      segment_ids: (b, t) integer document ids of packed rows (:mod:`effseq.ops.segments`), or
        None. The state is zero before each document start's update (its decay
        exp(delta A) is taken as 0, exact for this multiplicative recurrence; it gets zero
        gradient); ``h0`` feeds each row's first document, ``h_last`` is its last one's. Every
        impl supports packed rows (the Pallas kernels zero the decay in the kernel).

    Returns:
      ``(y, h_last)``: y (b, t, d) in ``u``'s dtype and the final state (b, d, n) in float32.

    Raises:
      ValueError: wrong ranks, dimensions that disagree, complex inputs, a bad ``chunk_size``
        (with ``impl="pallas"``: not a power of two),
        bad ``segment_ids``, an unknown ``impl``, or (under a ``sequence`` mesh axis) a length
        that does not split into equal shards.

    Sequence parallelism: under a mesh whose ``sequence`` axis n > 1 splits time
    (:mod:`effseq.ops.sequence`), each shard runs its slice from a zero state (same ``impl``
    and ``chunk_size``), summarises it as h_out = exp(A sum_t delta_t) h_in + h_from_zero (the
    product of its decays in one exponential; zero where a document starts in the slice or on
    its first step), all-gathers the n summaries, folds them to the state entering it and the
    final state, and reruns its slice from that state. Two local passes, forward and backward
    (the first one's outputs are dropped), and one all-gather of (b, d, n) states per call.
    """
    op = "selective_scan"
    impl = resolve_impl(op, impl)
    if chunk_size is not None:
        _checks.check_positive_int(op, "chunk_size", chunk_size)
    _validate(op, u, delta, A, B, C, D, h0)
    b, t, d = u.shape
    n = A.shape[1]
    keep = None
    if segment_ids is not None:
        segments.check_segment_ids(op, segment_ids, b, t)
        keep = 1.0 - segments.document_starts(segment_ids).astype(jnp.float32)
    h0 = jnp.zeros((b, d, n), jnp.float32) if h0 is None else _f32(h0)
    if t == 0:
        return jnp.zeros((b, 0, d), u.dtype), h0
    shards = sequence.shards()
    if shards > 1:
        sequence.check_length(op, t, shards)
        return _sharded(u, delta, A, B, C, D, h0, impl, chunk_size, segment_ids)
    if impl == "pallas":
        # Imported here: Pallas is only loaded when asked for.
        from effseq.ops.pallas._common import per_device
        from effseq.ops.pallas.selective import selective_scan_pallas

        def kernel(u, delta, A, B, C, D, h0, keep):
            # u, delta, B, C go in their own dtype (bfloat16 halves the kernels' reads).
            return selective_scan_pallas(u, delta, A, B, C, D, h0, chunk_size=chunk_size, keep=keep)

        # Rows over data x fsdp, channels over tensor: each device runs its block.
        return per_device(
            kernel,
            (u, delta, A, B, C, D, h0, keep),
            (0, 0, None, 0, 0, None, 0, 0),
            (2, 2, 0, None, None, 0, 1, None),
            (0, 0),
            (2, 1),
        )
    u32, delta32, A32, B32, C32 = (_f32(x) for x in (u, delta, A, B, C))
    if impl == "chunked":
        if chunk_size is None:
            chunk_size = default_chunk_size(b, d, n)
        y, h_last = _selective_scan_chunked(u32, delta32, A32, B32, C32, h0, chunk_size, keep)
    else:
        y, h_last = _selective_scan_associative(u32, delta32, A32, B32, C32, h0, keep)
    if D is not None:
        y = y + _f32(D) * u32
    return y.astype(u.dtype), h_last


def _sharded(u, delta, A, B, C, D, h0, impl, chunk_size, segment_ids):
    """:func:`selective_scan` with time split over the sequence axis: each shard's slice from
    zero, summarised by the product of its decays, folded, then rerun from the state carried
    in. ``h0`` is float32 (b, d, n)."""

    def local(u, delta, B, C, seg, A, D, h0):
        kw = dict(impl=impl, chunk_size=chunk_size, segment_ids=seg)
        _, from_zero = selective_scan(u, delta, A, B, C, **kw)
        # prod_t exp(delta_t A) = exp(A sum_t delta_t): one (b, d, n) exponential, where the
        # product would need every step's (b, d, n) decay.
        transition = jnp.exp(jnp.sum(_f32(delta), axis=1)[..., None] * _f32(A))
        edge = sequence.boundary_cut(seg)
        if seg is not None:
            # A document starting inside the slice (or on its first step) forgets the state
            # carried in, so that state does not reach the slice's end.
            transition = sequence.cut(transition, edge | sequence.any_start(seg))
        incoming, last = sequence.carry(transition, from_zero, h0)
        y, _ = selective_scan(u, delta, A, B, C, D, h0=sequence.cut(incoming, edge), **kw)
        return y, last

    time, whole = sequence.TIME, sequence.WHOLE
    specs = (time, time, time, time, time, whole, whole, whole)
    return sequence.run(local, specs, (time, whole))(u, delta, B, C, segment_ids, A, D, h0)
