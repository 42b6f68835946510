import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers import params
from effseq.layers.attention import Attention
from tests.layers.packing import (
    assert_packed_equals_alone,
    assert_prefill_continues_last_document,
    layout,
)
from tests.layers.protocol import run_steps
from tests.tolerances import assert_close, assert_close_rms

D = 16


CONFIGS = [
    dict(),
    dict(rotary=True),
    dict(window=4),
    dict(dconv=True, rotary=True, window=5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "plain")
@pytest.mark.parametrize("t", [1, 13])
def test_step_equals_parallel(config, t):
    layer = Attention(d_model=D, num_heads=2, **config)
    x = jax.random.normal(jax.random.key(0), (2, t, D))
    variables = layer.init(jax.random.key(1), x)
    if config.get("dconv"):  # move the convolutions off their identity start
        variables = jax.tree.map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), variables
        )
    assert_close(run_steps(layer, variables, x), layer.apply(variables, x))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "plain")
def test_causal_by_gradient(config):
    layer = Attention(d_model=D, num_heads=2, **config)
    x = jax.random.normal(jax.random.key(0), (1, 11, D))
    variables = layer.init(jax.random.key(1), x)
    g = jax.grad(lambda x: layer.apply(variables, x)[0, 5].sum())(x)
    assert np.all(np.asarray(g)[0, 6:] == 0) and np.any(np.asarray(g)[0, :6] != 0)


def test_bidirectional_sees_the_future_and_has_no_step():
    layer = Attention(d_model=D, num_heads=2, causal=False)
    x = jax.random.normal(jax.random.key(0), (1, 7, D))
    variables = layer.init(jax.random.key(1), x)
    g = jax.grad(lambda x: layer.apply(variables, x)[0, 2].sum())(x)
    assert np.any(np.asarray(g)[0, 3:] != 0)
    state = layer.apply(variables, 1, 7, method="init_state")
    with pytest.raises(ValueError, match="bidirectional layer has no recurrent form"):
        layer.apply(variables, x[:, 0], state, method="step")


def test_parameters_axes_count_and_dtypes():
    layer = Attention(d_model=D, num_heads=2, dconv=True, param_dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(1), jnp.ones((1, 3, D)))
    leaves = jax.tree.leaves(nn.unbox(variables))
    assert sum(x.size for x in leaves) == 4 * D * D + 3 * D * 3  # q, k, v, out; 3 dconvs
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert None not in jax.tree.leaves(params.logical_axes(variables), is_leaf=lambda x: x is None)
    assert not any(jax.tree.leaves(params.ssm_mask(variables)))


def test_bfloat16_compute():
    layer = Attention(d_model=D, num_heads=2, dtype=jnp.bfloat16, rotary=True)
    x = jax.random.normal(jax.random.key(0), (2, 9, D)).astype(jnp.bfloat16)
    variables = layer.init(jax.random.key(1), x)
    y = layer.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    ref = Attention(d_model=D, num_heads=2, rotary=True).apply(variables, x.astype(jnp.float32))
    assert_close_rms(y, ref)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by num_heads=4"):
        Attention(d_model=10, num_heads=4).init(jax.random.key(0), jnp.ones((1, 2, 10)))


# Packed rows (segment_ids): a length-1 document, documents longer than the sliding windows,
# trailing padding.
PACKED_ROWS = [[3, 1, 4, 7], [8, 6, 2]]
PACKED_CONFIGS = [dict(), dict(dconv=True, rotary=True, window=4), dict(causal=False, rotary=True)]


def _packed_layer(config):
    layer = Attention(d_model=D, num_heads=2, **config)
    x = jax.random.normal(jax.random.key(0), (2, 17, D))
    variables = layer.init(jax.random.key(1), x)
    if config.get("dconv"):  # move the convolutions off their identity start
        variables = jax.tree.map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), variables
        )
    return layer, variables, x


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("config", PACKED_CONFIGS, ids=lambda c: ",".join(c) or "plain")
def test_packed_documents_equal_each_document_alone(config):
    # No weight crosses a document, rotary positions and Primer's taps restart at each start.
    layer, variables, x = _packed_layer(config)
    seg, docs = layout(PACKED_ROWS, 17)
    assert_packed_equals_alone(layer, variables, x, seg, docs)


def test_packed_prefill_caches_the_last_document():
    # Each row's cache index is its own (b,); step then masks the cache per row, window included.
    layer, variables, x = _packed_layer(PACKED_CONFIGS[1])
    seg, docs = layout(PACKED_ROWS, 17)
    cont = jax.random.normal(jax.random.key(5), (2, 3, D))
    state = assert_prefill_continues_last_document(layer, variables, x, seg, docs, cont, 24)
    # The cache holds the last document alone: what its own prefill holds (keys rotated from
    # position 0, zeros after it, the conv window), and each row's index is its length.
    for r in range(2):
        _, s, e = max(d for d in docs if d[0] == r)
        _, alone = layer.apply(variables, x[r : r + 1, s:e], 24, method="prefill")
        assert int(state["index"][r]) == e - s
        for name in set(alone) - {"index"}:
            assert_close(state[name][r], alone[name][0], err_msg=name)
