import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.convert import mixer_params
from effseq.layers import params
from effseq.layers.based import Based, taylor_features
from tests.layers.packing import (
    assert_packed_equals_alone,
    assert_prefill_continues_last_document,
    layout,
)
from tests.layers.protocol import abstract_init, assert_causal, init, run_steps
from tests.tolerances import assert_close, assert_close_rms

FIXTURES = sorted((pathlib.Path(__file__).parents[1] / "convert" / "fixtures").glob("based-*.npz"))
# Small shapes: 2 heads of feature width 4 (21 features), value width 8.
SMALL = dict(d_model=16, num_heads=2, feature_dim=4)


def _module(**kw):
    return Based(**{**SMALL, **kw})


def _reference(p, x, eps=1e-6):
    """The layer's maths written out quadratically in float64 numpy: weights 1 + s + s^2 / 2
    with s = q.k / sqrt(f), causal, normalised by their sum plus eps."""
    x = np.asarray(x, np.float64)
    q, k, v = (
        np.einsum("btd,dhx->bthx", x, np.asarray(p[w], np.float64)) for w in "wq wk wv".split()
    )
    s = np.einsum("bthf,bshf->bhts", q, k) / math.sqrt(q.shape[-1])
    w = np.tril(1 + s + s * s / 2)
    o = np.einsum("bhts,bshv->bthv", w, v) / (w.sum(-1).transpose(0, 2, 1)[..., None] + eps)
    return np.einsum("bthv,hvd->btd", o, np.asarray(p["wo"], np.float64))


@pytest.mark.parametrize("t", [1, 37])
def test_parallel_equals_step_and_the_quadratic_form(t):
    # chunk_size 16: t = 37 spans three chunks, the last one partial.
    module = _module(chunk_size=16)
    variables, x = init(module, t=t)
    y = jax.jit(module.apply)(variables, x)
    y_steps = jax.jit(lambda v, x: run_steps(module, v, x))(variables, x)
    assert y.shape == x.shape
    assert_close(y_steps, y, "float32", "value")
    p = jax.tree.map(np.asarray, nn.unbox(variables))["params"]
    assert_close(y, _reference(p, x), "float32", "value")


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_prefill_then_step():
    module = _module(chunk_size=4)
    variables, x = init(module, t=11)
    y = jax.jit(module.apply)(variables, x)

    @jax.jit
    def decode(variables, x):
        y0, state = module.apply(variables, x[:, :6], 11, method="prefill")
        ys = [y0]
        for i in range(6, 11):
            y_t, state = module.apply(variables, x[:, i], state, method="step")
            ys.append(y_t[:, None])
        return jnp.concatenate(ys, axis=1), state

    y_dec, state = decode(variables, x)
    assert_close(y_dec, y, "float32", "value")
    assert state.shape == (2, 2, 1 + 4 + 16, 8 + 1) and state.dtype == jnp.float32
    init_state = module.apply(variables, 2, 11, method="init_state")
    assert init_state.shape == state.shape and not np.any(np.asarray(init_state))
    # The state's last value column counts the normaliser: its constant feature is the
    # number of tokens read.
    np.testing.assert_allclose(np.asarray(state[:, :, 0, -1]), 11.0)


def test_causal():
    module = _module(chunk_size=4)
    assert_causal(module, init(module, t=11, b=1)[0], t=11)


def test_causal_only():
    with pytest.raises(ValueError, match="Based is causal only"):
        abstract_init(_module(causal=False))


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_padding_never_changes_real_outputs():
    module = _module(chunk_size=4)
    variables, x = init(module, t=13)
    apply = jax.jit(module.apply)
    mask = jnp.arange(13)[None].repeat(2, 0) < jnp.array([[7], [13]])
    noise = jax.random.normal(jax.random.key(5), x.shape) * 10
    padded = apply(variables, jnp.where(mask[..., None], x, noise), mask)
    assert_close(padded, apply(variables, x, mask), "float32", "value")
    assert_close(padded[0, :7], apply(variables, x, jnp.ones_like(mask))[0, :7], "float32", "value")
    # A row of padding only reads nothing: 0 / (0 + eps) = 0, not NaN.
    empty = apply(variables, x, jnp.zeros_like(mask))
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


def test_feature_map_is_the_taylor_series():
    for f in (1, 4, 16):
        q, k = np.random.default_rng(f).standard_normal((2, 3, 5, f)).astype(np.float32)
        phi_q, phi_k = (np.asarray(jax.jit(taylor_features)(u)) for u in (q, k))
        assert phi_q.shape == (3, 5, 1 + f + f * f)
        s = np.sum(q * k, axis=-1) / math.sqrt(f)  # the paper's 1/sqrt(f)
        assert_close(np.sum(phi_q * phi_k, axis=-1), 1 + s + s * s / 2, "float32", "value")


def test_defaults_and_parameter_count():
    defaults = Based(d_model=192)
    assert (defaults.num_heads, defaults.feature_dim, defaults.eps) == (12, 16, 1e-6)
    d, h, f = 24, 3, 5
    variables = abstract_init(Based(d_model=d, num_heads=h, feature_dim=f))
    assert sum(x.size for x in jax.tree.leaves(variables)) == 2 * d * h * f + d * d + d * d


def test_axes_and_no_ssm_tags():
    variables = abstract_init(_module())
    axes = jax.tree.leaves(params.logical_axes(variables), is_leaf=lambda a: isinstance(a, tuple))
    assert len(axes) == 4 and all(a is not None and None not in a for a in axes)
    assert not any(jax.tree.leaves(params.ssm_mask(variables)))


def test_bad_options():
    with pytest.raises(ValueError, match="d_model = 20 must be a multiple of num_heads = 3"):
        abstract_init(Based(d_model=20, num_heads=3))
    with pytest.raises(ValueError, match="feature_dim must be a positive int"):
        abstract_init(_module(feature_dim=0))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        abstract_init(_module(eps=-1.0))


def test_bfloat16_compute_and_param_dtype():
    module = _module(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables, x = init(module, t=9)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(variables))
    y = jax.jit(module.apply)(variables, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))
    state = module.apply(variables, 2, 9, method="init_state")
    step = jax.jit(lambda v, x, s: module.apply(v, x, s, method="step"))
    y_t, state = step(variables, x[:, 0], state)
    assert y_t.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    y32 = jax.jit(_module(param_dtype=jnp.bfloat16).apply)(variables, x)
    assert y32.dtype == jnp.float32
    assert_close_rms(y, y32)


def _fixture(path):
    z = np.load(path)
    state = {k[len("state/") :]: z[k] for k in z.files if k.startswith("state/")}
    return json.loads(str(z["options"])), state, z["x"], z["y"]


def test_converter_errors_name_the_key():
    options, state, _, _ = _fixture(FIXTURES[0])
    missing = {k: v for k, v in state.items() if k != "k_proj.weight"}
    with pytest.raises(ValueError, match="no key 'k_proj.weight'"):
        mixer_params("based", missing, **options)
    wrong = {**state, "o_proj.weight": state["o_proj.weight"][:, :-1]}
    with pytest.raises(ValueError, match=r"state_dict\['o_proj.weight'\] has shape"):
        mixer_params("based", wrong, **options)
    extra = {**state, "feature_map.scale": np.ones(1, np.float32)}
    with pytest.raises(ValueError, match="'feature_map.scale'"):
        mixer_params("based", extra, **options)
    bad = {**options, "feature_dim": options["feature_dim"] * 2}
    with pytest.raises(ValueError, match="d_model \\(hidden_size\\) = num_heads \\* feature_dim"):
        mixer_params("based", state, **bad)


# Packed rows (segment_ids): documents starting inside a chunk (4), at a chunk boundary, of
# length 1, and trailing padding; t = 19 is not a multiple of the chunk.
PACKED_ROWS = [[3, 1, 4, 11], [8, 6, 2]]


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_documents_equal_each_document_alone():
    module = _module(chunk_size=4)
    variables, x = init(module, t=19)
    seg, docs = layout(PACKED_ROWS, 19)
    assert_packed_equals_alone(module, variables, x, seg, docs)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_prefill_continues_the_last_document():
    module = _module(chunk_size=4)
    variables, x = init(module, t=19)
    seg, docs = layout(PACKED_ROWS, 19)
    cont = jax.random.normal(jax.random.key(5), (2, 3, SMALL["d_model"]))
    assert_prefill_continues_last_document(module, variables, x, seg, docs, cont, max_len=32)
