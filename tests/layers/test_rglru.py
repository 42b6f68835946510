import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.convert import mixer_params
from effseq.layers import params
from effseq.layers.rglru import RGLRU, sqrt_bounded_grad
from tests.layers.packing import check_packed, check_packed_prefill
from tests.layers.protocol import abstract_init, assert_causal, init, run_steps
from tests.tolerances import assert_close

D_MODEL = 16


def _module(**kw):
    return RGLRU(d_model=D_MODEL, num_heads=2, **kw)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 13])
def test_parallel_equals_step(t):
    module = _module()
    variables, x = init(module, t=t)
    y = jax.jit(module.apply)(variables, x)
    y_steps = jax.jit(lambda v, x: run_steps(module, v, x))(variables, x)
    assert y.shape == x.shape
    assert_close(y_steps, y, "float32", "value")


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_prefill_then_step():
    module = _module(lru_width=24, conv_width=3)
    variables, x = init(module, t=11)

    @jax.jit
    def continued(variables, x):
        out = []
        # A 1-token prompt is shorter than the conv window (2 inputs): zeros in front, as
        # init_state has them.
        for prompt in (1, 6):
            y0, state = module.apply(variables, x[:, :prompt], 11, method="prefill")

            def body(state, x_t):
                y_t, state = module.apply(variables, x_t, state, method="step")
                return state, y_t

            state, ys = jax.lax.scan(body, state, jnp.moveaxis(x[:, prompt:], 1, 0))
            out.append((jnp.concatenate([y0, jnp.moveaxis(ys, 0, 1)], 1), state))
        return out

    expected = jax.jit(module.apply)(variables, x)
    for y, state in continued(variables, x):
        assert_close(y, expected, "float32", "value")
        assert int(state["index"]) == 11
        assert state["rnn"].dtype == state["conv"].dtype == jnp.float32


def test_causal():
    module = RGLRU(d_model=8, num_heads=2)
    assert_causal(module, init(module, t=11, b=1)[0], t=11)


def test_causal_only_and_bad_heads():
    with pytest.raises(ValueError, match="RGLRU is causal only"):
        init(_module(causal=False))
    with pytest.raises(ValueError, match="num_heads = 3 must be a positive divisor"):
        abstract_init(RGLRU(d_model=16, num_heads=3))


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_right_padding_never_changes_real_outputs():
    module = _module()
    variables, x = init(module, t=7)
    apply = jax.jit(module.apply)
    noise = 3.0 * jax.random.normal(jax.random.key(2), (2, 6, D_MODEL))
    padded = jnp.concatenate([x, noise], 1)
    # Row 0 has 7 real tokens, row 1 has 4; padding with large noise must change neither.
    mask = jnp.arange(13)[None] < jnp.array([[7], [4]])
    y = apply(variables, padded, mask)
    y_ref = apply(variables, jnp.concatenate([x[:1], jnp.pad(x[1:, :4], ((0, 0), (0, 3), (0, 0)))]))
    assert_close(y[0, :7], y_ref[0], "float32", "value")
    assert_close(y[1, :4], y_ref[1, :4], "float32", "value")


def test_initialization():
    module = RGLRU(d_model=64, num_heads=4)
    variables, _ = init(module)
    p = jax.tree.map(np.asarray, nn.unbox(variables))["params"]
    # The base decay a0 = exp(-softplus(a_param)), uniform on the ring 0.9 <= |a0| <= 0.999.
    a0 = np.exp(-np.logaddexp(0.0, p["a_param"]))
    assert np.all((a0 >= 0.9) & (a0 <= 0.999))
    for name in p:
        if name.endswith("_bias"):
            np.testing.assert_array_equal(p[name], 0.0)
    # Normal with the official variances: 1/d (x, y), 1/e (out), 1/(e/h) (gates), 0.01/4 (conv).
    assert abs(p["linear_x"].std() - 64**-0.5) < 0.15 * 64**-0.5
    assert abs(p["input_gate"].std() - 16**-0.5) < 0.15 * 16**-0.5
    assert abs(p["conv_kernel"].std() - 0.05) < 0.015


def test_parameter_count_axes_and_groups():
    d, e, h, w = 24, 32, 4, 3
    variables = abstract_init(RGLRU(d_model=d, num_heads=h, lru_width=e, conv_width=w))
    expected = 2 * (d * e + e) + (e * d + d) + (e * w + e) + 2 * (e * e // h + e) + e
    assert sum(x.size for x in jax.tree.leaves(variables)) == expected
    axes = jax.tree.leaves(params.logical_axes(variables), is_leaf=lambda a: isinstance(a, tuple))
    assert axes and all(a is not None and None not in a for a in axes)
    assert not any(jax.tree.leaves(params.ssm_mask(variables)))
    groups = params.groups(variables)["params"]
    no_decay = {k for k, g in groups.items() if g == "no_decay"}
    assert no_decay == {"a_param", "input_gate", "input_gate_bias", "a_gate", "a_gate_bias"}


def test_bfloat16_compute_and_param_dtype():
    module = _module(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables, x = init(module, t=9)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(variables))
    y = jax.jit(module.apply)(variables, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))
    state = module.apply(variables, 2, 9, method="init_state")
    y_t, state = jax.jit(partial(module.apply, method="step"))(variables, x[:, 0], state)
    assert y_t.dtype == jnp.bfloat16
    assert state["rnn"].dtype == state["conv"].dtype == jnp.float32
    assert (
        jax.eval_shape(_module(param_dtype=jnp.bfloat16).apply, variables, x).dtype == jnp.float32
    )


def test_sqrt_gradient_is_bounded():
    g = jax.grad(lambda x: sqrt_bounded_grad(x).sum())(jnp.array([0.0, 1e-9, 0.25]))
    np.testing.assert_allclose(np.asarray(g), [1000.0, 1000.0, 1.0], rtol=1e-6)


def _official_numpy(sd: dict, x: np.ndarray, num_heads: int) -> np.ndarray:
    """The official RecurrentBlock's equations in float64 numpy, from its state dict, with
    segment_pos = arange(t): the first token is reset (no state, no sqrt(1 - a^2))."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape

    def linear(name, v):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def block_diag(name, v):
        vb = v.reshape(b, t, num_heads, -1)
        out = np.einsum("bthi,hij->bthj", vb, sd[f"rg_lru.{name}.w"]) + sd[f"rg_lru.{name}.b"]
        return out.reshape(b, t, -1)

    y = linear("linear_y", x)
    y = 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    u = linear("linear_x", x)
    w = sd["conv_1d.w"]  # (width, e): row width - 1 - s on the input s steps back
    conv = np.zeros_like(u)
    for s in range(w.shape[0]):
        conv[:, s:] += u[:, : t - s] * w[w.shape[0] - 1 - s]
    u = conv + sd["conv_1d.b"]
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    gate_x, gate_a = sigmoid(block_diag("input_gate", u)), sigmoid(block_diag("a_gate", u))
    log_a = -8.0 * gate_a * np.logaddexp(0.0, sd["rg_lru.a_param"])
    a = np.exp(log_a)
    h = np.zeros((b, u.shape[-1]))
    hs = []
    for i in range(t):
        scale = 1.0 if i == 0 else np.sqrt(1 - a[:, i] ** 2)
        h = (0.0 if i == 0 else a[:, i] * h) + scale * gate_x[:, i] * u[:, i]
        hs.append(h)
    return linear("linear_out", np.stack(hs, 1) * y)


def _official_state(d, e, h, w, seed) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {
        "linear_x.weight": (e, d),
        "linear_x.bias": (e,),
        "linear_y.weight": (e, d),
        "linear_y.bias": (e,),
        "linear_out.weight": (d, e),
        "linear_out.bias": (d,),
        "conv_1d.w": (w, e),
        "conv_1d.b": (e,),
        "rg_lru.a_param": (e,),
        "rg_lru.input_gate.w": (h, e // h, e // h),
        "rg_lru.input_gate.b": (h, e // h),
        "rg_lru.a_gate.w": (h, e // h, e // h),
        "rg_lru.a_gate.b": (h, e // h),
    }
    sd = {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    # a0 in [0.9, 0.999]: the first output must not carry the sqrt(1 - a^2) ~ 0.1 factor.
    a0 = rng.uniform(0.9, 0.999, e)
    sd["rg_lru.a_param"] = np.log(np.expm1(-np.log(a0))).astype(np.float32)
    return sd


def test_first_token_rule_against_the_official_equations():
    options = dict(d_model=8, num_heads=2, lru_width=12, conv_width=3)
    sd = _official_state(8, 12, 2, 3, seed=0)
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    module = RGLRU(**options)
    p = mixer_params("rglru", sd, **options)
    y = jax.jit(module.apply)({"params": p}, x)
    assert_close(y, _official_numpy(sd, x, 2), "float32", "value")
    # The first output does not depend on a at all (neither a * h_{-1} nor sqrt(1 - a^2)).
    first = lambda a: module.apply({"params": {**p, "a_param": a}}, x)[:, 0]
    grad = jax.jit(jax.jacrev(first))(p["a_param"])
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_converter_errors_name_the_key():
    sd = _official_state(8, 8, 2, 4, seed=0)
    options = dict(d_model=8, num_heads=2)
    missing = {k: v for k, v in sd.items() if k != "rg_lru.a_gate.b"}
    with pytest.raises(ValueError, match=r"no key 'rg_lru.a_gate.b'"):
        mixer_params("rglru", missing, **options)
    wrong = {**sd, "conv_1d.w": np.zeros((3, 8), np.float32)}
    with pytest.raises(ValueError, match=r"state_dict\['conv_1d.w'\] has shape \(3, 8\)"):
        mixer_params("rglru", wrong, **options)
    with pytest.raises(ValueError, match=r"'rg_lru.input_gate.w'.*\(2, 4, 4\)"):
        mixer_params("rglru", sd, d_model=8, num_heads=4)  # blocks of 2, not 4
    with pytest.raises(ValueError, match=r"keys 'extra' have no place"):
        mixer_params("rglru", {**sd, "extra": np.zeros(1, np.float32)}, **options)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_equals_documents_alone():
    module = _module(conv_width=4)
    variables, x = init(module, t=15)
    check_packed(module, variables, x)


def test_packed_prefill_then_step_and_index():
    module = _module(conv_width=4)
    variables, x = init(module, t=15)
    state = check_packed_prefill(module, variables, x)
    # The prefill's position counter is per row: the last document's length (2 and 7 tokens).
    np.testing.assert_array_equal(np.asarray(state["index"]), [2, 7])
    # A row of padding only: nothing seen, so the next token is a first token.
    x = jax.random.normal(jax.random.key(2), (1, 4, D_MODEL))
    prefill = partial(module.apply, method="prefill", segment_ids=jnp.zeros((1, 4), jnp.int32))
    _, state = jax.jit(prefill, static_argnums=2)(variables, x, 4)
    np.testing.assert_array_equal(np.asarray(state["index"]), [0])
    assert not np.any(np.asarray(state["rnn"])) and not np.any(np.asarray(state["conv"]))


def test_first_token_rule_at_every_document_start():
    # At a document start the recurrence restarts as at position 0: h = i * u, neither decayed
    # nor scaled by sqrt(1 - a^2). Documents of 1, 3 and 2 tokens with identical inputs give
    # identical outputs at each start, equal to position 0's.
    module = _module(conv_width=2)
    variables, _ = init(module, t=6)
    x_t = jax.random.normal(jax.random.key(4), (1, 1, D_MODEL))
    x = jnp.concatenate(
        [x_t, x_t, jax.random.normal(jax.random.key(5), (1, 2, D_MODEL)), x_t, x_t * 0.5], 1
    )
    ids = jnp.asarray([[1, 2, 2, 2, 3, 3]])
    y = jax.jit(partial(module.apply, segment_ids=ids))(variables, x)
    for start in (1, 4):
        assert_close(y[:, start], y[:, 0], "float32", "value")
    # Without the reset the second start differs (its state and the sqrt(1 - a^2) scale).
    y_one = jax.jit(module.apply)(variables, x)
    assert not np.allclose(np.asarray(y_one[:, 4]), np.asarray(y[:, 0]), rtol=1e-3, atol=1e-3)
