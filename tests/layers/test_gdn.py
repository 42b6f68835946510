from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq import ops
from effseq.layers import params
from effseq.layers.gdn import GatedDeltaNet
from tests.layers.packing import check_packed, check_packed_prefill
from tests.layers.protocol import (
    abstract_init,
    assert_causal,
    assert_right_padding_invariant,
    init,
    run_steps,
)
from tests.tolerances import assert_close, assert_close_rms

D_MODEL = 16
SMALL = dict(d_model=D_MODEL, num_heads=2, chunk_size=4)  # head_dim 0.75 * 16 / 2 = 6


# gate="head" is also checked by tests/conformance; here it runs with make test-slow.
@pytest.mark.parametrize("gate", [pytest.param("head", marks=pytest.mark.slow), "channel"])
@pytest.mark.parametrize("t", [1, 13])
def test_parallel_equals_step_and_prefill(t, gate):
    module = GatedDeltaNet(**SMALL, gate=gate)
    variables, x = init(module, t=t)
    y = jax.jit(module.apply)(variables, x)
    y_steps = jax.jit(lambda v, x: run_steps(module, v, x))(variables, x)
    assert y.shape == x.shape
    assert_close(y_steps, y, "float32", "value")
    s = (t + 1) // 2

    def prefill_then_step(v, x):
        y0, state = module.apply(v, x[:, :s], t, method="prefill")
        ys = [y0]
        for i in range(s, t):
            y_t, state = module.apply(v, x[:, i], state, method="step")
            ys.append(y_t[:, None])
        return jnp.concatenate(ys, 1)

    assert_close(jax.jit(prefill_then_step)(variables, x), y, "float32", "value")


def test_causal_and_causal_only():
    module = GatedDeltaNet(**SMALL)
    assert_causal(module, init(module, t=9, b=1)[0])
    with pytest.raises(ValueError, match="GatedDeltaNet is causal only"):
        abstract_init(GatedDeltaNet(**SMALL, causal=False))


# gate="head" is also checked by tests/conformance; here it runs with make test-slow.
@pytest.mark.parametrize("gate", [pytest.param("head", marks=pytest.mark.slow), "channel"])
def test_right_padding_never_changes_real_outputs(gate):
    module = GatedDeltaNet(**SMALL, gate=gate)
    assert_right_padding_invariant(module, *init(module, t=7))


def test_gates_and_the_layer_against_its_equations():
    # The whole layer written out in numpy-style jnp from the module docstring, through the
    # op's reference loop: the chunked op, the conv layout and the norms all checked at once.
    module = GatedDeltaNet(**SMALL)
    variables, x = init(module, t=6, b=1)
    p = nn.unbox(variables)["params"]
    log_g, beta = module.apply(variables, x, method="gates")
    a = jnp.einsum("btd,dh->bth", x, p["wa"]) + p["dt_bias"]
    assert_close(log_g, -jnp.exp(p["A_log"]) * jax.nn.softplus(a), "float32", "value")
    assert_close(beta, jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, p["wb"])), "float32", "value")

    def branch(w, conv):  # projection, causal conv (tap s = s steps back), SiLU
        u = jnp.einsum("btd,dhk->bthk", x, w)
        out = sum(
            conv[..., s] * jnp.pad(u, ((0, 0), (s, 0), (0, 0), (0, 0)))[:, : u.shape[1]]
            for s in range(conv.shape[-1])
        )
        return jax.nn.silu(out)

    def l2(z):
        return z / jnp.sqrt(jnp.sum(z * z, -1, keepdims=True) + 1e-6)

    q, k = l2(branch(p["wq"], p["conv_q"])), l2(branch(p["wk"], p["conv_k"]))
    v = branch(p["wv"], p["conv_v"])
    o, _ = ops.gated_delta_rule_reference(q, k, v, log_g, beta)
    o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + 1e-5) * p["norm_scale"]
    o = o * jax.nn.silu(jnp.einsum("btd,dhv->bthv", x, p["wg"]))
    expected = jnp.einsum("bthv,hvd->btd", o, p["wo"])
    assert_close(jax.jit(module.apply)(variables, x), expected, "float32", "value")


def test_initialization_parameter_count_and_axes():
    d, h = 64, 4
    module = GatedDeltaNet(d_model=d, num_heads=h)  # head_dim 12, value width 24
    assert (module.head_k, module.head_v) == (12, 24)
    variables = abstract_init(module)
    dk, dv, w = 12, 24, 4
    expected = d * h * (2 * dk + 2 * dv) + h * (2 * dk + dv) * w + 2 * d * h + 2 * h + dv
    expected += h * dv * d
    assert sum(x.size for x in jax.tree.leaves(variables)) == expected
    axes = jax.tree.leaves(params.logical_axes(variables), is_leaf=lambda a: isinstance(a, tuple))
    assert axes and all(a is not None and None not in a for a in axes)
    groups = params.groups(variables)["params"]
    assert groups["A_log"] == groups["dt_bias"] == "no_decay"
    p = jax.tree.map(
        np.asarray, nn.unbox(init(GatedDeltaNet(d_model=512, num_heads=128, head_dim=2), t=1)[0])
    )
    A = np.exp(p["params"]["A_log"])
    assert np.all((A > 0) & (A <= 16)) and A.max() > 15
    dt = np.log1p(np.exp(p["params"]["dt_bias"]))
    assert np.all((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001))
    with pytest.raises(ValueError, match="not an integer; set head_dim"):
        abstract_init(GatedDeltaNet(d_model=20, num_heads=6))
    with pytest.raises(ValueError, match="gate must be one of"):
        abstract_init(GatedDeltaNet(**SMALL, gate="key"))


def test_bfloat16_compute_and_param_dtype():
    module = GatedDeltaNet(**SMALL, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables, x = init(module, t=9)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(variables))
    y = jax.jit(module.apply)(variables, x)
    assert y.dtype == jnp.bfloat16
    state = module.apply(variables, 2, 9, method="init_state")
    y_t, state = jax.jit(partial(module.apply, method="step"))(variables, x[:, 0], state)
    assert y_t.dtype == jnp.bfloat16 and state["S"].dtype == jnp.float32
    y32 = jax.jit(GatedDeltaNet(**SMALL, param_dtype=jnp.bfloat16).apply)(variables, x)
    assert_close_rms(y, y32)


# gate="head" is also checked by tests/conformance; here it runs with make test-slow.
@pytest.mark.parametrize("gate", [pytest.param("head", marks=pytest.mark.slow), "channel"])
def test_packed_equals_documents_alone(gate):
    module = GatedDeltaNet(**SMALL, gate=gate)
    variables, x = init(module, t=15)
    check_packed(module, variables, x)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_prefill_then_step():
    module = GatedDeltaNet(**SMALL)
    variables, x = init(module, t=15)
    check_packed_prefill(module, variables, x)
