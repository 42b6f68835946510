import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq import ops
from effseq.ops import (
    causal_conv,
    s4d_discretize,
    s4d_final_state,
    s4d_final_state_reference,
    s4d_kernel,
    s4d_kernel_reference,
    s4d_step,
)
from tests.ops.compare import compare_with_reference
from tests.ops.test_packed_ops import STARTS, Docs, T, bounds, check_vjp, packed_ids
from tests.tolerances import assert_close

H, N = 4, 8


def _ssm(init="lin", seed=0, h=H, n=N):
    """log_dt log-uniform in [1e-3, 1e-1]; A from S4D-Lin or S4D-Inv; random B, C."""
    k = jax.random.split(jax.random.key(seed), 5)
    log_dt = jax.random.uniform(k[0], (h,), minval=np.log(1e-3), maxval=np.log(1e-1))
    idx = jnp.arange(n)
    imag = jnp.pi * idx if init == "lin" else n / jnp.pi * (n / (2 * idx + 1) - 1)
    A = jnp.broadcast_to(-0.5 + 1j * imag, (h, n)).astype(jnp.complex64)
    B = (jax.random.normal(k[1], (h, n)) + 1j * jax.random.normal(k[2], (h, n))).astype(
        jnp.complex64
    )
    C = (jax.random.normal(k[3], (h, n)) + 1j * jax.random.normal(k[4], (h, n))).astype(
        jnp.complex64
    ) * 0.5
    return log_dt, A, B, C


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_discretize_matches_formula(discretization):
    log_dt, A, B, _ = _ssm()
    dA, dB = s4d_discretize(log_dt, A, B, discretization)
    dt = np.exp(np.asarray(log_dt, np.float64))[:, None]
    A64, B64 = np.asarray(A, np.complex128), np.asarray(B, np.complex128)
    if discretization == "zoh":
        dA_ref = np.exp(dt * A64)
        dB_ref = (dA_ref - 1) / A64 * B64
    else:
        dA_ref = (1 + dt * A64 / 2) / (1 - dt * A64 / 2)
        dB_ref = dt * B64 / (1 - dt * A64 / 2)
    assert_close(dA, dA_ref)
    # dB ~ dt B is as small as dt; compare it relative to that scale, where a cancellation in
    # dA - 1 would show as an error of 1e-4 and more.
    assert_close(dB / (dt * B64), dB_ref / (dt * B64))


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", ["lin", "inv"])
@pytest.mark.parametrize("length,jit", [(1, True), (37, True), (1000, True), (37, False)])
def test_kernel_matches_vandermonde(discretization, init, length, jit):
    params = _ssm(init)
    out, _ = compare_with_reference(
        lambda *p: s4d_kernel(*p, length, discretization),
        lambda *p: s4d_kernel_reference(*p, length, discretization),
        params,
        jit=jit,
        names=["log_dt", "A", "B", "C"],
    )
    assert out.shape == (H, length) and out.dtype == jnp.float32


def test_kernel_accepts_bfloat16_step_sizes():
    log_dt, A, B, C = _ssm()
    K = s4d_kernel(log_dt.astype(jnp.bfloat16), A, B, C, 64)
    K_ref = s4d_kernel_reference(log_dt.astype(jnp.bfloat16).astype(jnp.float32), A, B, C, 64)
    assert K.dtype == jnp.float32
    assert_close(K, K_ref)


def test_kernel_never_forms_the_table_of_powers():
    # The direct product needs an (h, n, l) complex64 table; the split needs O(h n sqrt(l)).
    h, n, length = 16, 32, 4096
    params = _ssm(h=h, n=n)
    fast = jax.jit(lambda *p: s4d_kernel(*p, length)).lower(*params).compile()
    table_bytes = h * n * length * 8
    assert fast.memory_analysis().temp_size_in_bytes < table_bytes / 8


def _recurrence(u, log_dt, A, B, C, discretization):
    dA, dB = s4d_discretize(log_dt, A, B, discretization)
    x0 = jnp.zeros((u.shape[0], A.shape[0], A.shape[1]), jnp.complex64)

    def step(x, u_t):
        x, y_t = s4d_step(x, u_t, dA, dB, C)
        return x, y_t

    _, y = jax.lax.scan(step, x0, jnp.moveaxis(u, 1, 0))
    return jnp.moveaxis(y, 0, 1)


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("t", [1, 37, 256])
def test_convolution_equals_recurrence(discretization, t):
    log_dt, A, B, C = _ssm()
    u = jax.random.normal(jax.random.key(3), (2, t, H))
    y_conv = causal_conv(u, s4d_kernel(log_dt, A, B, C, t, discretization))
    y_rec = jax.jit(_recurrence, static_argnums=5)(u, log_dt, A, B, C, discretization)
    assert_close(y_conv, y_rec)


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_kernel_gradients_equal_the_recurrences(discretization):
    # An independent path for the kernel's gradients: the same loss through the step-by-step
    # recurrence instead of the Vandermonde kernel and the convolution.
    params = _ssm()
    u = jax.random.normal(jax.random.key(4), (2, 37, H))
    ct = jax.random.normal(jax.random.key(5), (2, 37, H))

    def conv_loss(u, *p):
        return jnp.sum(ct * causal_conv(u, s4d_kernel(*p, 37, discretization), impl="direct"))

    def rec_loss(u, *p):
        return jnp.sum(ct * _recurrence(u, *p, discretization))

    grads = jax.jit(jax.grad(conv_loss, argnums=range(5)))(u, *params)
    grads_ref = jax.jit(jax.grad(rec_loss, argnums=range(5)))(u, *params)
    for name, g, g_ref in zip(["u", "log_dt", "A", "B", "C"], grads, grads_ref, strict=True):
        assert_close(g, g_ref, kind="grad", err_msg=name)


def test_step_output_dtype_follows_input():
    log_dt, A, B, C = _ssm()
    dA, dB = s4d_discretize(log_dt, A, B)
    x = jnp.zeros((2, H, N), jnp.complex64)
    x, y = s4d_step(x, jnp.ones((2, H), jnp.bfloat16), dA, dB, C)
    assert y.dtype == jnp.bfloat16 and x.dtype == jnp.complex64 and y.shape == (2, H)


def test_discretize_rejects_bad_input():
    log_dt, A, B, _ = _ssm()
    with pytest.raises(ValueError, match=r"`A` must be complex"):
        s4d_discretize(log_dt, A.real, B)
    with pytest.raises(ValueError, match=r"`log_dt` must be real"):
        s4d_discretize(log_dt.astype(jnp.complex64), A, B)
    with pytest.raises(ValueError, match=r"`log_dt` must have rank 1 \(h,\)"):
        s4d_discretize(log_dt[None], A, B)
    with pytest.raises(ValueError, match=r"dimension 'n' must agree.*`B` \(4, 3\)"):
        s4d_discretize(log_dt, A, B[:, :3])
    with pytest.raises(ValueError, match=r"unknown discretization='euler'"):
        s4d_discretize(log_dt, A, B, "euler")


def test_kernel_rejects_bad_length_and_shapes():
    log_dt, A, B, C = _ssm()
    with pytest.raises(ValueError, match=r"`length` must be a positive Python int, got 0"):
        s4d_kernel(log_dt, A, B, C, 0)
    with pytest.raises(ValueError, match=r"dimension 'h' must agree.*`C` \(3, 8\)"):
        s4d_kernel(log_dt, A, B, C[:3], 16)


def test_step_rejects_bad_input():
    log_dt, A, B, C = _ssm()
    dA, dB = s4d_discretize(log_dt, A, B)
    x = jnp.zeros((2, H, N), jnp.complex64)
    with pytest.raises(ValueError, match=r"`x` must be complex"):
        s4d_step(x.real, jnp.ones((2, H)), dA, dB, C)
    with pytest.raises(ValueError, match=r"dimension 'b' must agree.*`u_t` \(3, 4\)"):
        s4d_step(x, jnp.ones((3, H)), dA, dB, C)
    with pytest.raises(ValueError, match=r"`u_t` must have rank 2 \(b, h\)"):
        s4d_step(x, jnp.ones((2, 5, H)), dA, dB, C)


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("t,jit", [(1, True), (37, True), (100, False)])
def test_final_state_matches_the_recurrence(discretization, t, jit):
    log_dt, A, B, _ = _ssm()
    u = jax.random.normal(jax.random.key(6), (2, t, H))

    def fast(u, log_dt, A, B):
        return s4d_final_state(u, log_dt, A, B, discretization)

    def reference(u, log_dt, A, B):
        return s4d_final_state_reference(u, log_dt, A, B, discretization)

    compare_with_reference(
        fast, reference, (u, log_dt, A, B), jit=jit, names="u log_dt A B".split()
    )


def test_final_state_is_what_the_steps_leave():
    log_dt, A, B, C = _ssm()
    dA, dB = s4d_discretize(log_dt, A, B)
    u = jax.random.normal(jax.random.key(8), (2, 37, H))
    x = jnp.zeros((2, H, N), jnp.complex64)
    for s in range(37):
        x, _ = s4d_step(x, u[:, s], dA, dB, C)
    assert_close(s4d_final_state(u, log_dt, A, B), x)


def test_final_state_rejects_bad_input():
    log_dt, A, B, _ = _ssm()
    with pytest.raises(ValueError, match="`u`.*rank 3"):
        s4d_final_state(jnp.zeros((2, H)), log_dt, A, B)
    with pytest.raises(ValueError, match="h"):
        s4d_final_state(jnp.zeros((2, 5, H + 1)), log_dt, A, B)


# ---------------------------------------------------------------- packed rows: s4d_scan


def _s4d_params(h=3, n=4, t=T):
    k = jax.random.split(jax.random.key(5), 6)
    log_dt = jnp.log(jnp.linspace(0.05, 0.3, h))
    A = jax.lax.complex(-0.5 * jnp.ones((h, n)), jnp.pi * jnp.arange(n)[None].repeat(h, 0))
    B = jax.lax.complex(jax.random.normal(k[0], (h, n)), jax.random.normal(k[1], (h, n)))
    C = jax.lax.complex(jax.random.normal(k[2], (h, n)), jax.random.normal(k[3], (h, n)))
    u = jax.random.normal(k[4], (2, t, h))
    h0 = jax.lax.complex(*jax.random.normal(k[5], (2, 2, h, n)))
    return log_dt, A, B, C, u, h0


S4D_NAMES = ["log_dt", "A", "B", "C", "u", "h0"]


def _h0_term(dA, C, h0, powers):
    """2 Re(sum_n C dA**p h0) for powers p (l,): (1, l, h), h0 (1, h, n)."""
    x = h0[:, None] * dA[None, None] ** powers[None, :, None, None]
    return 2 * jnp.einsum("hn,blhn->blh", C, x).real


@pytest.mark.parametrize(
    "reverse,t,starts",
    [
        (False, T, STARTS),
        (True, T, STARTS),
        # Longer than one rematerialised segment (64) and not a multiple of it; documents
        # across the segment boundary, one starting on it, one of length 1 at the end.
        (False, 100, ([0, 3, 64, 65, 99], [0, 50])),
        (True, 100, ([0, 3, 64, 65, 99], [0, 50])),
    ],
)
def test_s4d_scan_packed_equals_kernel_path_per_document(reverse, t, starts):
    """The reference is the S4D layer's FFT path (s4d_kernel + causal_conv, or the future half
    of bidirectional_conv) on each document alone, plus h0's decay in the document it feeds."""
    T = t  # noqa: N806
    seg = packed_ids(t, starts)
    docs = Docs(t, starts)
    rows = bounds(starts, t)

    def packed(log_dt, A, B, C, u, h0):
        dA, dB = ops.s4d_discretize(log_dt, A, B)
        return ops.s4d_scan(u, dA, dB, C, segment_ids=seg, h0=h0, reverse=reverse)

    def alone(log_dt, A, B, C, u, h0):
        dA, dB = ops.s4d_discretize(log_dt, A, B)
        K = ops.s4d_kernel(log_dt, A, B, C, T)
        u_docs = docs.rows(u)
        if reverse:
            y = ops.bidirectional_conv(u_docs, jnp.zeros_like(K), K, impl="fft")
        else:
            y = ops.causal_conv(u_docs, K, impl="fft")
        y = docs.packed(y)
        fixes, states = [], []
        for r, row in enumerate(rows):
            # h0 feeds the first document scanned; the final state is the last one's.
            (s, e), (s_last, e_last) = (row[-1], row[0]) if reverse else (row[0], row[-1])
            p = jnp.arange(e - s, dtype=jnp.float32)
            p = jnp.flip(p) if reverse else p + 1
            fixes.append(jnp.pad(_h0_term(dA, C, h0[r : r + 1], p), [(0, 0), (s, T - e), (0, 0)]))
            u_last = u[r : r + 1, s_last:e_last]
            state = ops.s4d_final_state(jnp.flip(u_last, 1) if reverse else u_last, log_dt, A, B)
            if len(row) == 1:
                state = state + dA ** (e - s) * h0[r : r + 1]
            states.append(state)
        return y + jnp.concatenate(fixes, 0), jnp.concatenate(states, 0)

    check_vjp(packed, alone, _s4d_params(t=t), S4D_NAMES)


def test_s4d_scan_unpacked_matches_the_convolution():
    log_dt, A, B, C, u, _ = _s4d_params()
    dA, dB = ops.s4d_discretize(log_dt, A, B)
    y, x = jax.jit(ops.s4d_scan)(u, dA, dB, C)
    assert_close(y, ops.causal_conv(u, ops.s4d_kernel(log_dt, A, B, C, T)))
    assert_close(x, ops.s4d_final_state(u, log_dt, A, B))


def test_s4d_scan_rejects_bad_segment_ids():
    log_dt, A, B, C, u, _ = _s4d_params()
    dA, dB = ops.s4d_discretize(log_dt, A, B)
    with pytest.raises(ValueError, match="segment_ids"):
        ops.s4d_scan(u, dA, dB, C, segment_ids=packed_ids()[:1])
