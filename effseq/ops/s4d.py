"""Diagonal state space models (S4D): discretization, convolution kernel, recurrent step.

Gu, Gupta, Goel & Re 2022, "On the Parameterization and Initialization of Diagonal State Space
Models". A layer has h independent channels, each a diagonal SSM of n complex modes. The modes
come in conjugate pairs, so n complex modes stand for 2n real states and every output is
2 * Re(...) of the sum over the n stored modes.

Shapes: log_dt (h,) real; A, B, C (h, n) complex; kernels K (h, l) real.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from effseq.ops import _checks, segments, sequence
from effseq.ops._chunking import segmented_scan
from effseq.typing import Array

DISCRETIZATIONS = ("zoh", "bilinear")


def _validate_ssm(op: str, log_dt: Array, A: Array, B: Array, C: Array | None = None) -> None:
    _checks.check_rank(op, "log_dt", log_dt, 1, "(h,)")
    _checks.check_real(op, "log_dt", log_dt)
    dims = [("log_dt", log_dt, 0, "h")]
    for name, x in (("A", A), ("B", B), ("C", C)):
        if x is None:
            continue
        _checks.check_rank(op, name, x, 2, "(h, n)")
        _checks.check_complex(op, name, x)
        dims += [(name, x, 0, "h"), (name, x, 1, "n")]
    _checks.check_dims(op, dims)


def _log_dA(log_dt: Array, A: Array, discretization: str) -> Array:
    """log(dA), exactly dt*A for ZOH so powers dA**l = exp(l * dt * A) lose no accuracy."""
    dtA = jnp.exp(log_dt.astype(jnp.float32))[:, None] * A.astype(jnp.complex64)
    if discretization == "zoh":
        return dtA
    # log((1 + x) / (1 - x)) = 2 atanh(x), without the cancellation of the ratio near 1.
    return 2 * jnp.arctanh(dtA / 2)


def s4d_discretize(
    log_dt: Array, A: Array, B: Array, discretization: str = "zoh"
) -> tuple[Array, Array]:
    """Discretizes x' = A x + B u with step dt = exp(log_dt) (S4D paper, sec. 3 / eq. 3).

    ZOH: dA = exp(dt A), dB = (dA - 1) / A * B.
    Bilinear: dA = (1 + dt A / 2) / (1 - dt A / 2), dB = dt B / (1 - dt A / 2).

    Args:
      log_dt: (h,) real log step sizes.
      A: (h, n) complex state matrix diagonal (Re A < 0 for stability).
      B: (h, n) complex input matrix.
      discretization: ``"zoh"`` or ``"bilinear"``.

    Returns:
      ``(dA, dB)``, both (h, n) complex64.
    """
    op = "s4d_discretize"
    _validate_ssm(op, log_dt, A, B)
    if discretization not in DISCRETIZATIONS:
        raise ValueError(
            f"{op}: unknown discretization={discretization!r}; choose one of "
            f"{', '.join(DISCRETIZATIONS)}"
        )
    dt = jnp.exp(log_dt.astype(jnp.float32))[:, None]
    A = A.astype(jnp.complex64)
    B = B.astype(jnp.complex64)
    if discretization == "zoh":
        dA = jnp.exp(dt * A)
        # expm1, not dA - 1: for |dt A| ~ 1e-3 the subtraction loses ~3 of float32's 7 digits.
        dB = jnp.expm1(dt * A) / A * B
    else:
        denom = 1 - dt * A / 2
        dA = (1 + dt * A / 2) / denom
        dB = dt * B / denom
    return dA, dB


def _fine_size(length: int) -> int:
    """Power of two near sqrt(length): balances the two factor tables of the Vandermonde split."""
    return 1 << max(0, math.ceil(math.log2(max(1, length)) / 2))


def s4d_kernel(
    log_dt: Array, A: Array, B: Array, C: Array, length: int, discretization: str = "zoh"
) -> Array:
    """The SSM convolution kernel K[h, l] = 2 Re(sum_n C dB dA**l) for l < length.

    (S4D paper, eq. 5: the kernel is a Vandermonde matrix-vector product.) Writing l = q c + r
    with a fine size c near sqrt(length) splits dA**l = dA**(q c) * dA**r, so the kernel is one
    batched real matmul of a (h, length/c, n) coarse table by a (h, n, c) fine table. That is
    O(h n sqrt(length)) exponentials and memory instead of the direct product's O(h n length);
    the (h, n, length) table of powers is never formed.

    Args:
      log_dt: (h,) real; A, B, C: (h, n) complex; length: kernel length l (Python int).
      discretization: ``"zoh"`` or ``"bilinear"``.

    Returns:
      K (h, length) float32.
    """
    op = "s4d_kernel"
    _validate_ssm(op, log_dt, A, B, C)
    _checks.check_positive_int(op, "length", length)
    dA, dB = s4d_discretize(log_dt, A, B, discretization)
    W = C.astype(jnp.complex64) * dB  # (h, n)
    log_dA = _log_dA(log_dt, A, discretization)  # (h, n)

    c = _fine_size(length)
    q = -(-length // c)
    fine = jnp.exp(log_dA[..., None] * jnp.arange(c, dtype=jnp.float32))  # (h, n, c)
    coarse = W[..., None] * jnp.exp(
        log_dA[..., None] * (c * jnp.arange(q, dtype=jnp.float32))
    )  # (h, n, q)
    # 2 Re(sum_n coarse * fine) as real matmuls: Re(a b) = Re a Re b - Im a Im b. HIGHEST
    # keeps them float32 on accelerators (no TF32 / single bf16 pass).
    mm = functools.partial(jnp.einsum, "hnq,hnr->hqr", precision=jax.lax.Precision.HIGHEST)
    K = mm(coarse.real, fine.real) - mm(coarse.imag, fine.imag)
    return 2 * K.reshape(K.shape[0], q * c)[:, :length]


def s4d_kernel_reference(
    log_dt: Array, A: Array, B: Array, C: Array, length: int, discretization: str = "zoh"
) -> Array:
    """Slow reference for :func:`s4d_kernel`: the direct Vandermonde product.

    Forms the whole (h, n, length) table dA**l = exp(l log dA). This is also the baseline
    that effseq/benchmarks/ops.py times against.
    """
    dA, dB = s4d_discretize(log_dt, A, B, discretization)
    W = C.astype(jnp.complex64) * dB
    powers = jnp.exp(
        _log_dA(log_dt, A, discretization)[..., None] * jnp.arange(length, dtype=jnp.float32)
    )
    return 2 * jnp.einsum("hn,hnl->hl", W, powers).real


def s4d_final_state(
    u: Array, log_dt: Array, A: Array, B: Array, discretization: str = "zoh"
) -> Array:
    """The state after reading u from the zero state: x = sum_s dA**(t-1-s) dB u_s.

    What :func:`s4d_step` leaves after t tokens, computed in parallel (for a prompt's prefill).
    The powers of dA are split like :func:`s4d_kernel`'s: lag l = q c + r, so the sum is a
    contraction over r with a (h, n, c) fine table, then over q with a (h, n, t/c) coarse one;
    O(b t h n) work and no (h, n, t) table.

    Args:
      u: (b, t, h) real input.
      log_dt: (h,) real; A, B: (h, n) complex; discretization: ``"zoh"`` or ``"bilinear"``.

    Returns:
      x (b, h, n) complex64.
    """
    op = "s4d_final_state"
    _validate_ssm(op, log_dt, A, B)
    _checks.check_rank(op, "u", u, 3, "(b, t, h)")
    _checks.check_real(op, "u", u)
    _checks.check_dims(op, [("u", u, 2, "h"), ("log_dt", log_dt, 0, "h")])
    _, dB = s4d_discretize(log_dt, A, B, discretization)
    log_dA = _log_dA(log_dt, A, discretization)
    b, t, h = u.shape
    c = _fine_size(t)
    q = -(-t // c)
    # Reversed in time, u_rev[l] = u[t-1-l] multiplies dA**l; zero padding adds nothing.
    u_rev = jnp.flip(u.astype(jnp.float32), 1)
    u_rev = jnp.pad(u_rev, ((0, 0), (0, q * c - t), (0, 0))).reshape(b, q, c, h)
    fine = jnp.exp(log_dA[..., None] * jnp.arange(c, dtype=jnp.float32))  # (h, n, c)
    coarse = jnp.exp(log_dA[..., None] * (c * jnp.arange(q, dtype=jnp.float32)))  # (h, n, q)
    hi = jax.lax.Precision.HIGHEST
    inner = jnp.einsum("bqch,hnc->bqhn", u_rev, fine.real, precision=hi) + 1j * jnp.einsum(
        "bqch,hnc->bqhn", u_rev, fine.imag, precision=hi
    )
    return dB * jnp.einsum("bqhn,hnq->bhn", inner, coarse, precision=hi)


def s4d_final_state_reference(
    u: Array, log_dt: Array, A: Array, B: Array, discretization: str = "zoh"
) -> Array:
    """Slow reference for :func:`s4d_final_state`: a Python loop of the recurrence."""
    dA, dB = s4d_discretize(log_dt, A, B, discretization)
    x = jnp.zeros((u.shape[0], *dA.shape), jnp.complex64)
    for s in range(u.shape[1]):
        x = dA * x + dB * u[:, s].astype(jnp.float32)[..., None]
    return x


def s4d_step(x: Array, u_t: Array, dA: Array, dB: Array, C: Array) -> tuple[Array, Array]:
    """One recurrent step: x <- dA x + dB u_t, y_t = 2 Re(sum_n C x).

    Args:
      x: (b, h, n) complex state.
      u_t: (b, h) real input at this step.
      dA, dB: (h, n) complex, from :func:`s4d_discretize`.
      C: (h, n) complex.

    Returns:
      ``(x, y_t)``: the new state (b, h, n) complex64 and y_t (b, h) in u_t's dtype.
    """
    op = "s4d_step"
    _checks.check_rank(op, "x", x, 3, "(b, h, n)")
    _checks.check_complex(op, "x", x)
    _checks.check_rank(op, "u_t", u_t, 2, "(b, h)")
    _checks.check_real(op, "u_t", u_t)
    for name, p in (("dA", dA), ("dB", dB), ("C", C)):
        _checks.check_rank(op, name, p, 2, "(h, n)")
        _checks.check_complex(op, name, p)
    _checks.check_dims(
        op,
        [
            ("x", x, 0, "b"),
            ("u_t", u_t, 0, "b"),
            ("x", x, 1, "h"),
            ("u_t", u_t, 1, "h"),
            ("dA", dA, 0, "h"),
            ("dB", dB, 0, "h"),
            ("C", C, 0, "h"),
            ("x", x, 2, "n"),
            ("dA", dA, 1, "n"),
            ("dB", dB, 1, "n"),
            ("C", C, 1, "n"),
        ],
    )
    x = dA * x.astype(jnp.complex64) + dB * u_t.astype(jnp.float32)[..., None]
    y = 2 * jnp.einsum("hn,bhn->bh", C.astype(jnp.complex64), x).real
    return x, y.astype(u_t.dtype)


def s4d_scan(
    u: Array,
    dA: Array,
    dB: Array,
    C: Array,
    *,
    segment_ids: Array | None = None,
    h0: Array | None = None,
    reverse: bool = False,
) -> tuple[Array, Array]:
    """The S4D recurrence over a whole sequence, with document resets: the form of packed rows.

    Forward: x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(sum_n C x_t), the recurrent twin of
    ``causal_conv(u, s4d_kernel(...))``. With ``reverse`` the recurrence runs from the end,
    x_t = dA x_{t+1} + dB u_t, and y_t = 2 Re(sum_n C x_{t+1}) reads the state *before* u_t
    enters, i.e. the future half of :func:`effseq.ops.bidirectional_conv` (kernel from lag 1),
    so a bidirectional S4D layer is s4d_scan(fwd SSM) + s4d_scan(bwd SSM, reverse=True) + D u.

    An FFT cannot reset per document; this runs token by token (``effseq.ops._chunking.
    segmented_scan``: segments of 64 tokens rematerialised in the backward pass, one (b, h, n)
    state kept per segment), reading C inside the loop so no (b, t, h, n) state sequence is
    ever stored. O(b t h n) work.

    Args:
      u: (b, t, h) real input.
      dA, dB: (h, n) complex, from :func:`s4d_discretize`.
      C: (h, n) complex.
      segment_ids: (b, t) integer document ids of packed rows (:mod:`effseq.ops.segments`), or
        None. The state is zero before each document start's update (forward) or wherever
        t + 1 starts a document (``reverse``, :func:`~effseq.ops.segments.document_ends`).
      h0: (b, h, n) complex initial state (the first document scanned: each row's first, its
        last with ``reverse``), or None for zeros.
      reverse: run backwards in time, as described above.

    Returns:
      ``(y, x_last)``: y (b, t, h) float32 and the final state (b, h, n) complex64 (the one at
      t = 0 with ``reverse``, which includes u_0).

    Sequence parallelism: under a mesh whose ``sequence`` axis n > 1 splits time
    (:mod:`effseq.ops.sequence`), each shard runs its slice from a zero state and summarises
    it as x_out = dA**(t/n) x_in + x_from_zero (dA's power by binary exponentiation in
    float-float, within an ulp or two of exact; zero where a document boundary cuts the slice
    or its edge), all-gathers the n summaries, folds them
    (from the last shard to the first with ``reverse``) and reruns its slice from the state
    carried in. Two local passes (forward and backward) and one all-gather of (b, h, n) states
    per call.
    """
    op = "s4d_scan"
    _checks.check_rank(op, "u", u, 3, "(b, t, h)")
    _checks.check_real(op, "u", u)
    for name, p in (("dA", dA), ("dB", dB), ("C", C)):
        _checks.check_rank(op, name, p, 2, "(h, n)")
        _checks.check_complex(op, name, p)
    dims = [("u", u, 2, "h"), ("dA", dA, 0, "h"), ("dB", dB, 0, "h"), ("C", C, 0, "h")]
    dims += [("dA", dA, 1, "n"), ("dB", dB, 1, "n"), ("C", C, 1, "n")]
    if h0 is not None:
        _checks.check_rank(op, "h0", h0, 3, "(b, h, n)")
        dims += [("u", u, 0, "b"), ("h0", h0, 0, "b"), ("h0", h0, 1, "h"), ("h0", h0, 2, "n")]
    _checks.check_dims(op, dims)
    b, t, h = u.shape
    n = dA.shape[1]
    x0 = jnp.zeros((b, h, n), jnp.complex64) if h0 is None else h0.astype(jnp.complex64)
    if t == 0:
        return jnp.zeros((b, 0, h), jnp.float32), x0
    if segment_ids is not None:
        segments.check_segment_ids(op, segment_ids, b, t)
    shards = sequence.shards()
    if shards > 1:
        sequence.check_length(op, t, shards)
        return _scan_sharded(u, dA, dB, C, segment_ids, x0, reverse)
    if segment_ids is None:
        reset = jnp.zeros((b, t), jnp.float32)
    else:
        flags = segments.document_ends if reverse else segments.document_starts
        reset = flags(segment_ids).astype(jnp.float32)
    uf = u.astype(jnp.float32)
    if reverse:
        uf, reset = jnp.flip(uf, 1), jnp.flip(reset, 1)
    dA, dB, C = (p.astype(jnp.complex64) for p in (dA, dB, C))
    # segmented_scan pads time with zeros: live = 0 there makes the padded steps identities.
    live = jnp.ones((b, t), jnp.float32)
    # 2 Re(sum_n C x) as real dots; HIGHEST keeps them float32 on accelerators.
    mm = functools.partial(jnp.einsum, "bhn,hn->bh", precision=jax.lax.Precision.HIGHEST)

    def step(x, xs):
        u_t, reset_t, live_t = xs
        x_in = jnp.where(reset_t[:, None, None] > 0, jnp.zeros_like(x), x)
        x_new = dA * x_in + dB * u_t[..., None]
        read = x_in if reverse else x_new
        y_t = 2 * (mm(read.real, C.real) - mm(read.imag, C.imag))
        return jnp.where(live_t[:, None, None] > 0, x_new, x), y_t

    y, x_last = segmented_scan(step, x0, (uf, reset, live))
    return (jnp.flip(y, 1) if reverse else y), x_last


# dA**l for the carried state. Plain repeated squaring doubles the relative error at every
# squaring, so dA**l is off by about l ulps (measured against float64 at S4D-Lin/LegS modes,
# dt in [1e-3, 1e-1], n = 32: up to 1e-4 of a unit state summed over the modes at l = 512, ten
# times the scan's own drift); the squarings here run in float-float (a value as the unrounded
# sum hi + lo of two float32s), so the power is within an ulp or two of the float32 dA's exact
# power. The error-free products cut each factor into halves of at most 12 significant bits by
# masking the mantissa (rather than Veltkamp's 4097 x - ... split), so every partial product is
# exact in float32 and stays exact whether or not the compiler fuses multiply-adds.


def _split(x: Array) -> tuple[Array, Array]:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, x - hi


def _two_prod(a: Array, b: Array) -> tuple[Array, Array]:
    """(p, e) with p + e = a b exactly (Dekker)."""
    p = a * b
    a1, a2 = _split(a)
    b1, b2 = _split(b)
    return p, ((a1 * b1 - p) + a1 * b2 + a2 * b1) + a2 * b2


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """(s, e) with s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _ff_normal(hi: Array, lo: Array) -> tuple[Array, Array]:
    s = hi + lo
    return s, lo - (s - hi)


def _ff_mul(a, b):
    p, e = _two_prod(a[0], b[0])
    return _ff_normal(p, e + (a[0] * b[1] + a[1] * b[0]))


def _ff_add(a, b):
    s, e = _two_sum(a[0], b[0])
    return _ff_normal(s, e + (a[1] + b[1]))


def _ff_cmul(z, w):
    """Complex product of (re, im) pairs of float-float numbers."""
    (zr, zi), (wr, wi) = z, w
    neg = _ff_mul(zi, wi)
    re = _ff_add(_ff_mul(zr, wr), (-neg[0], -neg[1]))
    return re, _ff_add(_ff_mul(zr, wi), _ff_mul(zi, wr))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _power(z: Array, l: int) -> Array:
    """z**l for complex64 z and a static int l >= 0, by float-float binary exponentiation."""
    zero = jnp.zeros_like(z.real)
    base = ((z.real, zero), (z.imag, zero))
    result = None
    while l:
        if l & 1:
            result = base if result is None else _ff_cmul(result, base)
        l >>= 1
        if l:
            base = _ff_cmul(base, base)
    if result is None:
        return jnp.ones_like(z)
    (rh, rl), (ih, il) = result
    return jax.lax.complex(rh + rl, ih + il)


@_power.defjvp
def _power_jvp(l, primals, tangents):
    (z,), (dz,) = primals, tangents
    if l == 0:
        return _power(z, 0), jnp.zeros_like(dz)
    return _power(z, l), l * _power(z, l - 1) * dz


def _scan_sharded(u, dA, dB, C, segment_ids, x0, reverse):
    """:func:`s4d_scan` with time split over the sequence axis: each shard's slice from zero,
    summarised by dA to the power of its length, folded, then rerun from the state carried in
    (from the right neighbour with ``reverse``). ``x0`` is complex64 (b, h, n)."""

    def local(u, seg, dA, dB, C, x0):
        _, from_zero = s4d_scan(u, dA, dB, C, segment_ids=seg, reverse=reverse)
        transition = _power(dA.astype(jnp.complex64), u.shape[1])
        transition = jnp.broadcast_to(transition, from_zero.shape)
        edge = sequence.boundary_cut(seg, reverse=reverse)
        if seg is not None:
            # A boundary inside the slice (or at the edge the state comes in by) forgets the
            # state carried in, so it does not reach the slice's other end.
            transition = sequence.cut(transition, edge | sequence.any_start(seg))
        incoming, last = sequence.carry(transition, from_zero, x0, reverse=reverse)
        y, _ = s4d_scan(
            u, dA, dB, C, segment_ids=seg, h0=sequence.cut(incoming, edge), reverse=reverse
        )
        return y, last

    time, whole = sequence.TIME, sequence.WHOLE
    specs = (time, time, whole, whole, whole, whole)
    return sequence.run(local, specs, (time, whole))(u, segment_ids, dA, dB, C, x0)
