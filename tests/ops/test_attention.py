import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops import attention, attention_reference
from tests.ops.compare import compare_with_reference

IMPLS = ["xla", "blockwise"]
# (t, s, causal, window): t = 1, a prime t, windows, a cache longer than the queries.
CONFIGS = [
    (1, 1, True, None),
    (37, 37, True, None),
    (37, 37, False, None),
    (37, 37, True, 8),
    (37, 37, False, 5),
    (5, 37, True, None),
    (5, 37, True, 3),
]


def _qkv(t, s, dtype, b=2, h=2, dk=8, dv=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k[0], (b, t, h, dk)).astype(dtype),
        jax.random.normal(k[1], (b, s, h, dk)).astype(dtype),
        jax.random.normal(k[2], (b, s, h, dv)).astype(dtype),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("t,s,causal,window", CONFIGS)
def test_matches_reference(impl, dtype, t, s, causal, window):
    q, k, v = _qkv(t, s, dtype)
    out, _ = compare_with_reference(
        lambda q, k, v: attention(q, k, v, causal=causal, window=window, impl=impl),
        functools.partial(attention_reference, causal=causal, window=window),
        (q, k, v),
        dtype,
        jit=True,
        names=["q", "k", "v"],
    )
    assert out.shape == (2, t, 2, 4) and out.dtype == q.dtype


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_without_jit_and_custom_scale(impl):
    q, k, v = _qkv(11, 11, "float32")
    compare_with_reference(
        lambda q, k, v: attention(q, k, v, scale=0.3, impl=impl),
        functools.partial(attention_reference, scale=0.3),
        (q, k, v),
    )


def test_blockwise_crosses_several_key_blocks():
    # Longer than one key block of the blockwise path, and not a multiple of it.
    q, k, v = _qkv(1100, 1100, "float32", b=1, h=1)
    fast = attention(q, k, v, window=700, impl="blockwise")
    dense = attention(q, k, v, window=700, impl="xla")
    np.testing.assert_allclose(fast, dense, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [None, 4])
def test_causal_gradient_is_exactly_zero_for_the_future(impl, window):
    t, probe = 13, 6
    q, k, v = _qkv(t, t, "float32")

    def out_at_probe(q, k, v):
        return attention(q, k, v, window=window, impl=impl)[:, probe].sum()

    grads = jax.grad(out_at_probe, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.asarray(g)[:, probe + 1 :] == 0)
    assert np.any(np.asarray(grads[1])[:, probe] != 0)
    if window is not None:  # keys older than the window are invisible too
        assert np.all(np.asarray(grads[1])[:, : probe - window + 1] == 0)


@pytest.mark.parametrize(
    "shapes,kwargs,match",
    [
        (((2, 5, 2, 8), (2, 5, 2, 8), (2, 5, 2)), {}, r"`v` must have rank 4 \(b, s, h, v\)"),
        (((2, 5, 2, 8), (2, 5, 2, 6), (2, 5, 2, 4)), {}, r"dimension 'k' must agree"),
        (((2, 5, 2, 8), (2, 5, 3, 8), (2, 5, 3, 4)), {}, r"dimension 'h' must agree"),
        (((2, 5, 2, 8), (2, 5, 2, 8), (2, 6, 2, 4)), {}, r"dimension 's' must agree"),
        (((2, 6, 2, 8), (2, 5, 2, 8), (2, 5, 2, 4)), {}, r"at least as many keys as queries"),
        (((2, 5, 2, 8), (2, 5, 2, 8), (2, 5, 2, 4)), {"window": 0}, r"`window` must be a posit"),
    ],
)
def test_rejects_bad_input(shapes, kwargs, match):
    q, k, v = (jnp.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_rejects_complex_queries():
    q = jnp.zeros((1, 3, 1, 4), jnp.complex64)
    with pytest.raises(ValueError, match=r"`q` must be real"):
        attention(q, q.real, q.real)
