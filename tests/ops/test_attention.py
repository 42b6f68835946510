import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq import ops
from effseq.ops import attention, attention_reference
from tests.ops.compare import compare_with_reference
from tests.ops.test_packed_ops import Docs, T, check_vjp, packed_ids
from tests.tolerances import assert_close

# The package exports the function under the module's name, so reach the module directly.
attention_module = importlib.import_module("effseq.ops.attention")
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


@pytest.fixture(autouse=True)
def small_key_blocks(monkeypatch):
    # Blocks of 8 keys, so the short sequences here cross several blocks of the blockwise path
    # (its running max, rescaling and their gradients), partial last blocks included.
    monkeypatch.setattr(attention_module, "_KEY_BLOCK", 8)


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
@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_matches_reference(impl, causal):
    # Row 0 hides its last 6 keys (padding), row 1 hides the first 2 too, so some causal
    # queries see no key at all: their output is zero and their gradients finite.
    q, k, v = _qkv(11, 11, "float32")
    kv_mask = jnp.arange(11)[None] < jnp.array([[5], [11]])
    kv_mask = kv_mask.at[1, :2].set(False)
    out, _ = compare_with_reference(
        lambda q, k, v: attention(q, k, v, causal=causal, kv_mask=kv_mask, impl=impl),
        functools.partial(attention_reference, causal=causal, kv_mask=kv_mask),
        (q, k, v),
        jit=True,
        names=["q", "k", "v"],
    )
    if causal:
        np.testing.assert_array_equal(np.asarray(out[1, :2]), 0.0)
    # Hidden keys' values never reach the output.
    v2 = jnp.where(kv_mask[..., None, None], v, 100.0)
    assert_close(attention(q, k, v2, causal=causal, kv_mask=kv_mask, impl=impl), out)


def test_key_mask_must_be_bool_and_match_the_keys():
    q, k, v = _qkv(5, 5, "float32")
    with pytest.raises(ValueError, match="`kv_mask` must be bool"):
        attention(q, k, v, kv_mask=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="kv_mask"):
        attention(q, k, v, kv_mask=jnp.ones((2, 4), bool))


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_without_jit_and_custom_scale(impl):
    q, k, v = _qkv(11, 11, "float32")
    compare_with_reference(
        lambda q, k, v: attention(q, k, v, scale=0.3, impl=impl),
        functools.partial(attention_reference, scale=0.3),
        (q, k, v),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [None, 3])
def test_query_offset_into_a_fixed_size_cache(impl, window):
    # Decoding: one query at position 9 of a 16-slot cache; slots 10.. hold junk and must be
    # hidden by causality. A traced offset (under jit) must work too.
    q, k, v = _qkv(1, 16, "float32")
    k, v = k.at[:, 10:].set(1e3), v.at[:, 10:].set(1e3)
    fast = jax.jit(lambda q, k, v, pos: attention(q, k, v, window=window, q_offset=pos, impl=impl))
    out = fast(q, k, v, jnp.int32(9))
    expected = attention_reference(q, k[:, :10], v[:, :10], window=window)
    assert_close(out, expected)
    compare_with_reference(
        lambda q, k, v: attention(q, k, v, window=window, q_offset=9, impl=impl),
        functools.partial(attention_reference, window=window, q_offset=9),
        (q, k, v),
    )


def test_blockwise_with_a_fully_hidden_first_block():
    # With a cache of 40 keys and a window of 4, the first key blocks hold nothing a query may
    # see: the running max stays -inf there and must not turn into nan (values and gradients).
    q, k, v = _qkv(3, 40, "float32")
    compare_with_reference(
        lambda q, k, v: attention(q, k, v, window=4, impl="blockwise"),
        functools.partial(attention_reference, window=4),
        (q, k, v),
    )


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


# ---------------------------------------------------------------- packed rows: attention


def _packed_qkv(t=T, b=2, h=2, dk=8, dv=4):
    k = jax.random.split(jax.random.key(4), 3)
    return (
        jax.random.normal(k[0], (b, t, h, dk)),
        jax.random.normal(k[1], (b, t, h, dk)),
        jax.random.normal(k[2], (b, t, h, dv)),
    )


def _packed_kv_mask(t=T):
    """Keys hidden: all of row 0's third document (6..15), so with causal=False its queries see
    nothing at all, and single keys elsewhere."""
    m = np.ones((2, t), bool)
    m[0, 6:16] = False
    m[1, [3, 20]] = False
    return jnp.asarray(m)


def _set_blocks(monkeypatch, q_block, k_block):
    import importlib

    attention_module = importlib.import_module("effseq.ops.attention")
    monkeypatch.setattr(attention_module, "_QUERY_BLOCK", q_block)
    monkeypatch.setattr(attention_module, "_KEY_BLOCK", k_block)


ATTN_CASES = [
    # impl, causal, window, masked keys, (query block, key block)
    ("xla", True, None, False, (8, 8)),
    ("xla", False, 5, True, (8, 8)),
    ("blockwise", True, None, False, (8, 8)),
    ("blockwise", True, 4, True, (16, 8)),
    ("blockwise", False, None, True, (8, 16)),
    ("blockwise", False, None, False, (512, 512)),
]


@pytest.mark.parametrize("impl,causal,window,masked,blocks", ATTN_CASES)
def test_attention_packed_equals_documents_alone(monkeypatch, impl, causal, window, masked, blocks):
    _set_blocks(monkeypatch, *blocks)
    seg = packed_ids()
    docs = Docs()
    kv = _packed_kv_mask() if masked else jnp.ones((2, T), bool)

    def packed(q, k, v):
        return ops.attention(
            q, k, v, causal=causal, window=window, kv_mask=kv, impl=impl, segment_ids=seg
        )

    def alone(q, k, v):
        # The padding after each document is hidden by kv_mask.
        kv_docs = docs.rows(kv, False)
        o = ops.attention(
            *(docs.rows(x) for x in (q, k, v)), causal=causal, window=window, kv_mask=kv_docs
        )
        return docs.packed(o)

    check_vjp(packed, alone, _packed_qkv(), ["q", "k", "v"])


@pytest.mark.parametrize("impl,causal", [("xla", False), ("blockwise", True)])
def test_attention_packed_matches_reference(monkeypatch, impl, causal):
    _set_blocks(monkeypatch, 8, 8)
    seg = packed_ids()
    kv = _packed_kv_mask()
    check_vjp(
        lambda q, k, v: ops.attention(
            q, k, v, causal=causal, kv_mask=kv, impl=impl, segment_ids=seg
        ),
        lambda q, k, v: ops.attention_reference(
            q, k, v, causal=causal, kv_mask=kv, segment_ids=seg
        ),
        _packed_qkv(),
        ["q", "k", "v"],
    )


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_attention_rows_seeing_no_key_are_zero_and_finite(monkeypatch, impl):
    _set_blocks(monkeypatch, 8, 8)
    seg = packed_ids()
    q, k, v = _packed_qkv()

    def f(q, k, v):
        return ops.attention(
            q, k, v, causal=False, kv_mask=_packed_kv_mask(), impl=impl, segment_ids=seg
        )

    o = jax.jit(f)(q, k, v)
    assert np.all(np.asarray(o)[0, 6:16] == 0)
    grads = jax.jit(jax.grad(lambda *a: f(*a).sum() ** 2, (0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0])[0, 6:16] == 0)


def test_attention_rejects_bad_segment_ids():
    q, k, v = _packed_qkv()
    with pytest.raises(ValueError, match="segment_ids"):
        ops.attention(q, k, v, segment_ids=packed_ids()[:, :5])
    with pytest.raises(ValueError, match="segment_ids"):
        ops.attention(q[:, :5], k, v, segment_ids=packed_ids()[:, :5])
    with pytest.raises(ValueError, match="segment_ids"):
        ops.attention_reference(q, k, v, segment_ids=packed_ids().astype(jnp.float32))
