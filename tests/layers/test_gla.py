import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers import params
from effseq.layers.gla import GLA
from tests.layers.packing import (
    assert_packed_equals_alone,
    assert_prefill_continues_last_document,
    layout,
)
from tests.layers.protocol import abstract_init, init, run_steps
from tests.tolerances import assert_close

D_MODEL = 32


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 37])
def test_parallel_equals_step(t):
    # chunk_size 16: t = 37 spans three chunks, the last one partial.
    module = GLA(d_model=D_MODEL, chunk_size=16)
    variables, x = init(module, t=t)
    y = jax.jit(module.apply)(variables, x)
    y_steps = jax.jit(lambda v, x: run_steps(module, v, x))(variables, x)
    assert y.shape == x.shape
    assert_close(y_steps, y, "float32", "value")


def test_causal_by_gradient():
    module = GLA(d_model=D_MODEL, chunk_size=4)
    variables, x = init(module, t=11, b=1)
    jac = jax.jacrev(lambda x: module.apply(variables, x[None])[0])(x[0])  # (t, d, t, d)
    jac = np.asarray(jnp.abs(jac).sum(axis=(1, 3)))
    assert np.all(jac[np.triu_indices(11, 1)] == 0.0)
    assert np.all(jac[np.tril_indices(11)] > 0)


def test_causal_only():
    # The one check of the mixer interface: GLA has no bidirectional form.
    module = GLA(d_model=D_MODEL, causal=False)
    with pytest.raises(ValueError, match="GLA is causal only"):
        init(module)


def test_initialization_and_gate():
    module = GLA(d_model=D_MODEL, num_heads=4)
    variables, x = init(module)
    p = jax.tree.map(np.asarray, nn.unbox(variables))["params"]
    # Key width expand_k * d = 16 and value width expand_v * d = 32, split over 4 heads.
    assert p["wq"].shape == p["wk"].shape == (D_MODEL, 4, 4)
    assert p["wv"].shape == p["wr"].shape == (D_MODEL, 4, 8)
    assert p["gate_down"].shape == (D_MODEL, 16)
    np.testing.assert_array_equal(p["gate_bias"], 0.0)
    np.testing.assert_array_equal(p["norm_scale"], 1.0)
    np.testing.assert_array_equal(p["norm_bias"], 0.0)
    # log_g = logsigmoid(logits) / 16: with the low-rank path zeroed only the bias remains.
    bias = jax.random.normal(jax.random.key(2), p["gate_bias"].shape)
    gated = nn.unbox(variables)
    gated["params"] = {**gated["params"], "gate_down": jnp.zeros((D_MODEL, 16)), "gate_bias": bias}
    log_g = module.apply(gated, x, method="log_gate")
    assert log_g.shape == (2, 5, 4, 4) and log_g.dtype == jnp.float32
    expected = jnp.broadcast_to(jax.nn.log_sigmoid(bias) / 16, log_g.shape)
    assert_close(log_g, expected, "float32", "value")
    # At initialization every gate is in (0, 1] and near 1 (tau = 16 keeps memory long).
    g = np.exp(np.asarray(module.apply(variables, x, method="log_gate")))
    assert np.all((g > 0.5) & (g <= 1.0))


def test_parameter_count():
    d, h, r = 24, 3, 16
    module = GLA(d_model=d, num_heads=h, expand_k=0.5, expand_v=1.0, gate_low_rank=r)
    variables = abstract_init(module)
    K, V = d // 2, d
    expected = 2 * d * K + d * V + (d * r + r * K + K) + 2 * (V // h) + (d * V + V) + V * d
    assert sum(x.size for x in jax.tree.leaves(variables)) == expected


def test_axes_and_no_ssm_tags():
    variables = abstract_init(GLA(d_model=D_MODEL))
    axes = jax.tree.leaves(params.logical_axes(variables), is_leaf=lambda a: isinstance(a, tuple))
    assert axes and all(a is not None and None not in a for a in axes)
    assert not any(jax.tree.leaves(params.ssm_mask(variables)))


def test_head_dims_must_divide():
    with pytest.raises(ValueError, match="num_heads"):
        abstract_init(GLA(d_model=20, num_heads=4))  # key width 10 over 4 heads


def test_bfloat16_compute_and_param_dtype():
    module = GLA(d_model=D_MODEL, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables, x = init(module, t=9)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(variables))
    y = module.apply(variables, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))
    state = module.apply(variables, 2, 9, method="init_state")
    y_t, state = module.apply(variables, x[:, 0], state, method="step")
    assert y_t.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    y32 = GLA(d_model=D_MODEL, param_dtype=jnp.bfloat16).apply(variables, x)
    assert y32.dtype == jnp.float32


# Packed rows (segment_ids): documents starting inside a chunk (4), at a chunk boundary, of
# length 1, and trailing padding; t = 19 is not a multiple of the chunk.
PACKED_ROWS = [[3, 1, 4, 11], [8, 6, 2]]


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_documents_equal_each_document_alone():
    module = GLA(d_model=D_MODEL, chunk_size=4)
    variables, x = init(module, t=19)
    seg, docs = layout(PACKED_ROWS, 19)
    assert_packed_equals_alone(module, variables, x, seg, docs)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_prefill_continues_the_last_document():
    module = GLA(d_model=D_MODEL, chunk_size=4)
    variables, x = init(module, t=19)
    seg, docs = layout(PACKED_ROWS, 19)
    cont = jax.random.normal(jax.random.key(5), (2, 3, D_MODEL))
    assert_prefill_continues_last_document(module, variables, x, seg, docs, cont, max_len=32)
