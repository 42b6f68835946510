import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops import sgconv_kernel, sgconv_kernel_reference, sgconv_length
from tests.tolerances import assert_close

# (scales, kernel_dim, length): shorter than, equal to, and longer than d * 2**(s - 1).
CASES = [(1, 4, 1), (1, 4, 9), (3, 8, 32), (5, 8, 100), (5, 8, 128), (5, 8, 200), (7, 3, 97)]


def _sub_kernels(s, d, h=3, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (s, h, d)).astype(dtype)


@pytest.mark.parametrize("s,d,length", CASES)
@pytest.mark.parametrize("decay", [2.0, 1.5])
@pytest.mark.parametrize("jit", [True, False])
def test_kernel_matches_reference(s, d, length, decay, jit):
    w = _sub_kernels(s, d)
    fn = lambda w: sgconv_kernel(w, length, decay)
    K = (jax.jit(fn) if jit else fn)(w)
    assert K.shape == (3, length) and K.dtype == jnp.float32
    assert_close(K, sgconv_kernel_reference(w, length, decay))


@pytest.mark.parametrize("s,d,length", CASES)
def test_gradient_is_the_adjoint(s, d, length):
    # The kernel is linear in the sub-kernels, so its VJP is the adjoint map:
    # <g, K(w')> = <vjp(g), w'> for every w', with K(w') taken from the NumPy reference.
    w = _sub_kernels(s, d)
    _, vjp = jax.vjp(lambda w: sgconv_kernel(w, length), w)
    g = jax.random.normal(jax.random.key(1), (3, length))
    (grad,) = vjp(g)
    for seed in (2, 3):
        w2 = _sub_kernels(s, d, seed=seed)
        lhs = np.sum(np.asarray(g) * sgconv_kernel_reference(w2, length))
        rhs = np.sum(np.asarray(grad) * np.asarray(w2))
        assert_close(lhs, rhs)


def test_bfloat16_sub_kernels_are_upcast():
    w = _sub_kernels(4, 8, dtype=jnp.bfloat16)
    K = sgconv_kernel(w, 64)
    assert K.dtype == jnp.float32
    assert_close(K, sgconv_kernel_reference(w.astype(jnp.float32), 64))


def test_scales_are_stretched_and_damped():
    # Constant sub-kernels make the layout visible: scale i spans d * 2**max(0, i-1) taps of
    # value decay**-i.
    s, d = 4, 2
    K = np.asarray(sgconv_kernel(jnp.ones((s, 1, d)), sgconv_length(s, d), decay=2.0))[0]
    expected = np.concatenate([np.full(d * 2 ** max(0, i - 1), 2.0**-i) for i in range(s)])
    np.testing.assert_array_equal(K, expected)
    assert sgconv_length(s, d) == d * 2 ** (s - 1)


def test_upsampling_interpolates_linearly():
    # A ramp stays a ramp (clamped at the ends) when upsampled with half-pixel centres.
    d = 4
    w = jnp.zeros((3, 1, d)).at[2, 0].set(jnp.arange(d, dtype=jnp.float32))
    K = np.asarray(sgconv_kernel(w, sgconv_length(3, d), decay=1.0))[0, 2 * d :]
    x = np.clip((np.arange(2 * d) + 0.5) / 2 - 0.5, 0, d - 1)
    assert_close(K, x)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"`sub_kernels` must have rank 3 \(s, h, d\)"):
        sgconv_kernel(jnp.zeros((3, 4)), 16)
    with pytest.raises(ValueError, match=r"`sub_kernels` must be real"):
        sgconv_kernel(jnp.zeros((2, 3, 4), jnp.complex64), 16)
    with pytest.raises(ValueError, match=r"`length` must be a positive Python int"):
        sgconv_kernel(jnp.zeros((2, 3, 4)), 0)
