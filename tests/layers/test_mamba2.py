from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers import params
from effseq.layers.mamba2 import Mamba2
from tests.layers.packing import check_packed, check_packed_prefill
from tests.layers.protocol import (
    abstract_init,
    assert_right_padding_invariant,
    causality,
    init,
    run_steps,
)
from tests.tolerances import assert_close, assert_close_rms

D_MODEL = 16
# Small heads and state; chunk 4 so that t = 13 spans four chunks, the last one partial.
SMALL = dict(d_model=D_MODEL, head_dim=8, state_size=8, chunk_size=4)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 13])
def test_parallel_equals_step_and_prefill(t):
    module = Mamba2(**SMALL)
    variables, x = init(module, t=t)
    y = jax.jit(module.apply)(variables, x)
    y_steps = jax.jit(lambda v, x: run_steps(module, v, x))(variables, x)
    assert y.shape == x.shape
    assert_close(y_steps, y, "float32", "value")
    # Prefill the first half, then step through the rest.
    s = (t + 1) // 2

    def prefill_then_step(v, x):
        y0, state = module.apply(v, x[:, :s], t, method="prefill")
        ys = []
        for i in range(s, t):
            y_t, state = module.apply(v, x[:, i], state, method="step")
            ys.append(y_t)
        return jnp.concatenate([y0, *[y_t[:, None] for y_t in ys]], 1)

    assert_close(jax.jit(prefill_then_step)(variables, x), y, "float32", "value")


def test_chunked_equals_recurrent_ssd():
    chunked = Mamba2(**SMALL, num_groups=2)
    variables, x = init(chunked, t=13)
    recurrent = Mamba2(**SMALL, num_groups=2, scan_impl="recurrent")
    assert_close(recurrent.apply(variables, x), chunked.apply(variables, x), "float32", "value")


def test_causal_and_bidirectional_dependence():
    for causal in (True, False):
        module = Mamba2(**SMALL, causal=causal)
        variables, x = init(module, t=9, b=1)
        dep = np.asarray(causality(module, variables))
        assert np.all(dep[np.tril_indices(9)])
        upper = dep[np.triu_indices(9, 1)]
        assert not np.any(upper) if causal else np.all(upper)
    state = module.apply(variables, 1, 9, method="init_state")
    with pytest.raises(ValueError, match="bidirectional layer has no recurrent form"):
        module.apply(variables, x[:, 0], state, method="step")


# causal=True is also checked by tests/conformance; here it runs with make test-slow.
@pytest.mark.parametrize("causal", [pytest.param(True, marks=pytest.mark.slow), False])
def test_right_padding_never_changes_real_outputs(causal):
    module = Mamba2(**SMALL, causal=causal)
    assert_right_padding_invariant(module, *init(module, t=7))


def test_initialization_matches_official_defaults():
    module = Mamba2(d_model=32)  # official defaults: state 128, head_dim 64, expand 2
    p = nn.unbox(abstract_init(module, t=1))["params"]
    assert module.num_heads == 1 and p["in_x"].shape == (32, 64) and p["in_B"].shape == (32, 128)
    wide = Mamba2(d_model=512, head_dim=8, state_size=4)  # 128 heads: ranges are visible
    p = jax.tree.map(np.asarray, nn.unbox(init(wide, t=1)[0]))["params"]
    A = np.exp(p["A_log"])
    assert np.all((A >= 1) & (A <= 16)) and A.min() < 2 and A.max() > 15
    np.testing.assert_array_equal(p["D"], 1.0)
    np.testing.assert_array_equal(p["norm_scale"], 1.0)
    dt = np.log1p(np.exp(p["dt_bias"]))
    assert np.all((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001))
    assert np.all(np.abs(p["conv_x"]) <= 0.5)


@pytest.mark.parametrize("causal", [True, False])
def test_parameter_count_axes_and_groups(causal):
    d, e, h, g, n, w = 24, 48, 4, 2, 8, 4
    module = Mamba2(d_model=d, head_dim=12, num_groups=g, state_size=n, causal=causal)
    variables = abstract_init(module)
    c = e + 2 * g * n
    branch = c * w + c + 3 * h
    expected = d * (2 * e + 2 * g * n + h) + e + e * d + branch * (1 if causal else 2)
    assert sum(x.size for x in jax.tree.leaves(variables)) == expected
    axes = jax.tree.leaves(params.logical_axes(variables), is_leaf=lambda a: isinstance(a, tuple))
    assert axes and all(a is not None and None not in a for a in axes)
    groups = params.groups(variables)["params"]
    assert groups["A_log"] == groups["D"] == groups["dt_bias"] == "no_decay"
    assert groups["in_x"] is None


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of head_dim = 12"):
        abstract_init(Mamba2(d_model=16, head_dim=12))
    with pytest.raises(ValueError, match="num_groups = 3 must divide"):
        abstract_init(Mamba2(d_model=16, head_dim=8, num_groups=3))


def test_bfloat16_compute_and_param_dtype():
    module = Mamba2(**SMALL, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables, x = init(module, t=9)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(variables))
    y = jax.jit(module.apply)(variables, x)
    assert y.dtype == jnp.bfloat16
    state = module.apply(variables, 2, 9, method="init_state")
    y_t, state = jax.jit(partial(module.apply, method="step"))(variables, x[:, 0], state)
    assert y_t.dtype == jnp.bfloat16 and state["ssm"].dtype == jnp.float32
    y32 = jax.jit(Mamba2(**SMALL, param_dtype=jnp.bfloat16).apply)(variables, x)
    assert_close_rms(y, y32)


# causal=True is also checked by tests/conformance; here it runs with make test-slow.
@pytest.mark.parametrize("causal", [pytest.param(True, marks=pytest.mark.slow), False])
def test_packed_equals_documents_alone(causal):
    # Two groups of B and C (their convs are masked with x's); the backward branch runs over
    # the reversed documents.
    module = Mamba2(**SMALL, num_groups=2, causal=causal)
    variables, x = init(module, t=15)
    check_packed(module, variables, x)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_prefill_then_step():
    module = Mamba2(**SMALL)
    variables, x = init(module, t=15)
    check_packed_prefill(module, variables, x)
