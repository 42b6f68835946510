import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops import linear_scan, linear_scan_reference
from tests.ops.compare import compare_with_reference
from tests.tolerances import assert_close


def _ab(t, dtype="float32", complex_=False, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    a = jax.random.uniform(k[0], (2, t, 3), minval=0.5, maxval=1.0)
    b = jax.random.normal(k[1], (2, t, 3))
    h0 = jax.random.normal(k[2], (2, 3))
    if complex_:
        a = a * jnp.exp(1j * jax.random.uniform(k[3], a.shape, maxval=np.pi))
        b = b + 1j * b[::-1]
        h0 = h0.astype(jnp.complex64)
    return a.astype(dtype) if not complex_ else a, b.astype(dtype) if not complex_ else b, h0


@pytest.mark.parametrize("impl", ["sequential", "associative"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("t", [1, 37, 64])
def test_matches_reference(impl, dtype, t):
    a, b, h0 = _ab(t, dtype)
    compare_with_reference(
        lambda a, b, h0: linear_scan(a, b, h0, impl=impl),
        linear_scan_reference,
        (a, b, h0),
        dtype,
        jit=True,
        names=["a", "b", "h0"],
    )


@pytest.mark.parametrize("impl", ["sequential", "associative"])
def test_complex_and_reverse(impl):
    a, b, h0 = _ab(37, complex_=True)
    h, h_last = linear_scan(a, b, h0, impl=impl)
    h_ref, h_last_ref = linear_scan_reference(a, b, h0)
    assert h.dtype == jnp.complex64
    assert_close(h, h_ref)
    assert_close(h_last, h_last_ref)
    # Reversing time is the reverse-time scan of the flipped sequence.
    hr, hr_last = linear_scan(a, b, h0, reverse=True, impl=impl)
    h_flip, h_flip_last = linear_scan_reference(a[:, ::-1], b[:, ::-1], h0)
    assert_close(hr, h_flip[:, ::-1])
    assert_close(hr_last, h_flip_last)


def test_rejects_bad_input():
    a, b, h0 = _ab(5)
    with pytest.raises(ValueError, match=r"`a` and `b` must have the same shape"):
        linear_scan(a, b[:, :4])
    with pytest.raises(ValueError, match=r"`h0` must have shape \(2, 3\)"):
        linear_scan(a, b, h0[:, :2])
    with pytest.raises(ValueError, match=r"unknown impl='parallel'"):
        linear_scan(a, b, impl="parallel")
