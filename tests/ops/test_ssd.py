"""Mamba-2's SSD (Dao & Gu 2024): the chunked and recurrent forms and the step against the
step-by-step reference, on values, final states and every input's gradient."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops._impl import resolve_impl
from effseq.ops.ssd import ssd, ssd_reference, ssd_step
from tests.tolerances import assert_close

B_, H, P, N = 2, 4, 8, 16
NAMES = ("x", "dt", "A", "B", "C", "D", "h0")


def _inputs(t, g=2, dtype=jnp.float32, seed=0, decay="realistic"):
    """(x, dt, A, B, C, D, h0) as a Mamba-2 layer produces them, in ``dtype``."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    x = jax.random.normal(ks[0], (B_, t, H, P))
    B = jax.random.normal(ks[1], (B_, t, g, N))
    C = jax.random.normal(ks[2], (B_, t, g, N))
    D = jax.random.normal(ks[3], (H,))
    h0 = jax.random.normal(ks[4], (B_, H, P, N))
    if decay == "realistic":  # softplus(dt + dt_bias), A = -exp(A_log) with A in [-16, -1]
        dt = jax.nn.softplus(jax.random.normal(ks[5], (B_, t, H)) - 2.0)
        A = -jax.random.uniform(ks[6], (H,), minval=1.0, maxval=16.0)
    elif decay == "strong":  # dt * A = -20 per step: the naive factorisation overflows
        dt = jax.random.uniform(ks[5], (B_, t, H), minval=18.0, maxval=20.0)
        A = -jnp.ones((H,))
        x = x / 20  # keeps dt * x of order 1
    elif decay == "mixed":  # exp(-20) and ~1 side by side: decays near 1 right after tiny ones
        strong = jax.random.bernoulli(ks[5], 0.5, (B_, t, H))
        dt = jnp.where(strong, 20.0, 1e-5 * jax.random.uniform(ks[6], (B_, t, H)))
        A = -jnp.ones((H,))
        x = x / 20
    else:
        raise ValueError(decay)
    return tuple(z.astype(dtype) for z in (x, dt, A, B, C, D, h0))


def _cotangents(t, dtype, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    dy = jax.random.normal(k1, (B_, t, H, P)).astype(dtype)
    dH = jax.random.normal(k2, (B_, H, P, N))  # h_last is float32 whatever the input dtype
    return dy, dH


def _values_and_grads(fn, args, cts):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cts)


@functools.cache
def _reference(t, g, with_D, dtype, seed, decay):
    """Reference outputs and gradients on the inputs of ``_inputs`` (upcast to float32)."""
    args = tuple(z.astype(jnp.float32) for z in _inputs(t, g, dtype, seed, decay))
    if not with_D:
        args = args[:5] + args[6:]

    def ref(*a):
        if with_D:
            return ssd_reference(*a[:6], h0=a[6])
        return ssd_reference(*a[:5], h0=a[5])

    dy, dH = _cotangents(t, dtype)
    run = jax.jit(functools.partial(_values_and_grads, ref))
    return run(args, (dy.astype(jnp.float32), dH))


def _check(impl, t, chunk_size=16, g=2, with_D=True, dtype=jnp.float32, seed=0, decay="realistic"):
    """Values, final state and the gradient w.r.t. every input (D and h0 included)."""
    args = _inputs(t, g, dtype, seed, decay)
    names = NAMES if with_D else NAMES[:5] + NAMES[6:]
    if not with_D:
        args = args[:5] + args[6:]

    def fast(*a):
        if with_D:
            return ssd(*a[:6], h0=a[6], chunk_size=chunk_size, impl=impl)
        return ssd(*a[:5], h0=a[5], chunk_size=chunk_size, impl=impl)

    (y, H_last), grads = jax.jit(functools.partial(_values_and_grads, fast))(
        args, _cotangents(t, dtype)
    )
    assert y.dtype == dtype and y.shape == (B_, t, H, P)
    assert H_last.dtype == jnp.float32 and H_last.shape == (B_, H, P, N)
    (y_ref, H_ref), grads_ref = _reference(t, g, with_D, dtype, seed, decay)
    assert np.isfinite(np.asarray(y, np.float32)).all() and np.isfinite(np.asarray(H_last)).all()
    assert_close(y, y_ref, dtype, err_msg="y")
    assert_close(H_last, H_ref, dtype, err_msg="h_last")
    for name, gr, gr_ref in zip(names, grads, grads_ref, strict=True):
        assert gr.dtype == dtype, name
        assert np.isfinite(np.asarray(gr, np.float32)).all(), name
        assert_close(gr, gr_ref, dtype, "grad", err_msg=f"d/d{name}")


@pytest.mark.parametrize(
    "impl,t,chunk_size,g,with_D",
    [
        ("chunked", 1, 16, 2, True),  # one step
        ("chunked", 37, 16, 1, True),  # prime t, a partial last chunk, one group for all heads
        ("chunked", 37, 64, 4, False),  # t shorter than the chunk; a group per head; no D
        ("recurrent", 37, 16, 1, True),  # shares its reference with the case above
    ],
)
def test_matches_reference(impl, t, chunk_size, g, with_D):
    _check(impl, t, chunk_size, g, with_D)


def test_bfloat16_matches_float32_reference():
    _check("chunked", 37, 16, 2, True, jnp.bfloat16, seed=3)


@pytest.mark.parametrize(
    "impl,decay,chunk_size",
    [("chunked", "strong", 16), ("chunked", "mixed", 64), ("recurrent", "mixed", 64)],
)
def test_strong_decay_is_finite_and_exact(impl, decay, chunk_size):
    # Decays of exp(-20) per step (dt * A = -20): the chunk's running sums of dt * A reach
    # -20 c, so a decay written as exp(cumsum_t - cumsum_s) would overflow or cancel. t = 70
    # runs several chunks (or two recurrent segments), the last one partial. The decay comes
    # from a large dt, not a
    # large |A|: the gradient of dt is A times that of the log decay, a sum that cancels, so
    # A = -20 multiplied its float32 round-off twentyfold and the float32 reference itself
    # missed a float64 evaluation of the recurrence by 8.5e-5 on one small dt-gradient entry
    # (the chunked form by 3.7e-5). With A = -1 both are within the table of the float64 truth.
    _check(impl, 70, chunk_size, 2, True, seed=2, decay=decay)


def test_default_impl_is_chunked():
    assert resolve_impl("ssd", None) == "chunked"
    assert inspect.signature(ssd).parameters["chunk_size"].default == 64


@pytest.mark.parametrize("decay", ["realistic", "mixed"])
def test_step_matches_parallel(decay):
    x, dt, A, B, C, D, h0 = _inputs(37, seed=6, decay=decay)
    y, H_last = ssd(x, dt, A, B, C, D, h0=h0, chunk_size=16)
    step = jax.jit(ssd_step)
    Hs, ys = h0, []
    for i in range(x.shape[1]):
        Hs, y_t = step(Hs, x[:, i], dt[:, i], A, B[:, i], C[:, i], D)
        assert Hs.dtype == jnp.float32 and y_t.shape == (B_, H, P)
        ys.append(y_t)
    assert_close(jnp.stack(ys, axis=1), y)
    assert_close(Hs, H_last)


def test_step_dtype_without_D():
    x, dt, A, B, C, _, h0 = _inputs(1, g=1, dtype=jnp.bfloat16, seed=7)
    Hs, y_t = ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    assert y_t.dtype == jnp.bfloat16 and Hs.dtype == jnp.float32
    y_ref, H_ref = ssd_reference(
        *(z.astype(jnp.float32) for z in (x, dt, A, B, C)), h0=h0.astype(jnp.float32)
    )
    assert_close(y_t, y_ref[:, 0], jnp.bfloat16)
    assert_close(Hs, H_ref, jnp.bfloat16)


def test_split_sequence_carries_state():
    x, dt, A, B, C, D, h0 = _inputs(70, seed=8)
    run = jax.jit(
        lambda start, stop, h: ssd(
            *(z[:, start:stop] for z in (x, dt)),
            A,
            B[:, start:stop],
            C[:, start:stop],
            D,
            h0=h,
            chunk_size=16,
        ),
        static_argnums=(0, 1),
    )
    y, H_last = run(0, 70, h0)
    y1, H1 = run(0, 29, h0)  # splits mid-chunk
    y2, H2 = run(29, 70, H1)
    assert_close(jnp.concatenate([y1, y2], axis=1), y)
    assert_close(H2, H_last)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_empty_sequence_returns_h0(impl):
    x, dt, A, B, C, D, h0 = _inputs(5)
    y, H_last = ssd(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], D, h0=h0, impl=impl)
    assert y.shape == (B_, 0, H, P)
    np.testing.assert_array_equal(np.asarray(H_last), np.asarray(h0))


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("x", jnp.zeros((B_, 5, H)), "`x` must have rank 4"),
        ("dt", jnp.zeros((B_, 5, H, 1)), "`dt` must have rank 3"),
        ("A", jnp.zeros((H, 1)), "`A` must have rank 1"),
        ("B", jnp.zeros((B_, 5, N)), "`B` must have rank 4"),
        ("h0", jnp.zeros((B_, H, P)), "`h0` must have rank 4"),
        ("dt", jnp.ones((B_, 6, H)), "dimension 't'.*`dt`"),
        ("C", jnp.zeros((B_ + 1, 5, 2, N)), "dimension 'b'.*`C`"),
        ("A", -jnp.ones((H + 1,)), "dimension 'h'.*`A`"),
        ("D", jnp.ones((H - 1,)), "dimension 'h'.*`D`"),
        ("C", jnp.zeros((B_, 5, 1, N)), "dimension 'g'.*`C`"),
        ("C", jnp.zeros((B_, 5, 2, N + 1)), "dimension 'n'.*`C`"),
        ("h0", jnp.zeros((B_, H, P + 1, N)), "dimension 'p'.*`h0`"),
        ("B", jnp.zeros((B_, 5, 3, N)), "groups g = 3 of `B`"),
        ("x", jnp.zeros((B_, 5, H, P), jnp.complex64), "`x` must be real"),
        ("dt", -jnp.ones((B_, 5, H)), "`dt` must be >= 0"),
        ("A", jnp.ones((H,)), "`A` must be <= 0"),
    ],
)
def test_bad_inputs_raise(name, value, match):
    kwargs = dict(zip(NAMES, _inputs(5), strict=True))
    if name == "B" and value.ndim == 4:  # C must have the same groups, or 'g' fires first
        kwargs["C"] = value
    kwargs[name] = value
    args = [kwargs.pop(k) for k in NAMES[:6]]
    with pytest.raises(ValueError, match=match):
        ssd(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        ssd_reference(*args, **kwargs)


@pytest.mark.parametrize("chunk_size", [0, 16.0, True])
def test_bad_chunk_size_raises(chunk_size):
    x, dt, A, B, C, _, _ = _inputs(5)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive Python int"):
        ssd(x, dt, A, B, C, chunk_size=chunk_size)


def test_unknown_impl_raises():
    x, dt, A, B, C, _, _ = _inputs(5)
    with pytest.raises(ValueError, match="unknown impl='triton'"):
        ssd(x, dt, A, B, C, impl="triton")


def test_step_bad_inputs_raise():
    x, dt, A, B, C, D, h0 = _inputs(1)
    x_t, dt_t, B_t, C_t = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    with pytest.raises(ValueError, match="`h` must have rank 4"):
        ssd_step(h0[0], x_t, dt_t, A, B_t, C_t, D)
    with pytest.raises(ValueError, match="`x_t` must have rank 3"):
        ssd_step(h0, x, dt_t, A, B_t, C_t, D)
    with pytest.raises(ValueError, match="dimension 'p'.*`x_t`"):
        ssd_step(h0, x_t[..., :-1], dt_t, A, B_t, C_t, D)
    with pytest.raises(ValueError, match="dimension 'n'.*`C_t`"):
        ssd_step(h0, x_t, dt_t, A, B_t, C_t[..., :-1], D)
    with pytest.raises(ValueError, match="groups g = 3 of `B_t`"):
        ssd_step(h0, x_t, dt_t, A, B_t[:, :1].repeat(3, 1), C_t[:, :1].repeat(3, 1), D)
    with pytest.raises(ValueError, match="`A` must be <= 0"):
        ssd_step(h0, x_t, dt_t, -A, B_t, C_t, D)


def test_traced_signs_are_not_checked_and_h0_defaults_to_zero():
    # Under jit the signs of dt and A cannot be inspected; the op must still trace.
    x, dt, A, B, C, D, _ = _inputs(5, seed=5)
    y, H_last = jax.jit(lambda dt, A: ssd(x, dt, A, B, C, D, chunk_size=4))(dt, A)
    y_ref, H_ref = ssd_reference(x, dt, A, B, C, D, h0=jnp.zeros((B_, H, P, N)))
    assert_close(y, y_ref)
    assert_close(H_last, H_ref)
