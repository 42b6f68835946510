"""Dropout under the scanned stack: one mask per layer, driven only by the 'dropout' rng."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers.attention import Attention
from effseq.models import Backbone, LanguageModel, SequenceClassifier, Stack

RATE = 0.5


def _mixers_output_ones(next_fun, args, kwargs, context):
    """Replaces every attention mixer's output by ones (after running it, so its parameters exist):
    a block then adds exactly its dropout mask / keep_prob to the residual stream."""
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Attention) and context.method_name == "__call__":
        return jnp.ones_like(out)
    return out


def _stack(n_layers, pattern):
    backbone = Backbone(
        pattern,
        d_model=8,
        n_layers=n_layers,
        causal=True,
        max_len=16,
        norm="layernorm",
        prenorm=True,
        mlp="none",
        mlp_ratio=4,
        dropout=RATE,
        mixer_options=None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    return Stack(backbone)


def test_every_layer_draws_its_own_mask():
    """With zero input and every mixer returning ones, the stack's output is the sum of the
    layers' masks / keep_prob, each entry in {0, 2} for rate 1/2. Four layers as two scan
    iterations of a two-block pattern: masks shared across the scan (no rng split) or inside
    the group would pair layers up and leave only 0, 2 or 4 kept; independent masks give the
    binomial spread 0..4."""
    n_layers = 4
    stack = _stack(n_layers, "attention,attention")
    x = jnp.zeros((4, 16, 8))
    with nn.intercept_methods(_mixers_output_ones):
        variables = jax.jit(stack.init)(jax.random.key(0), x)
        rngs = {"dropout": jax.random.key(1)}
        out = jax.jit(stack.apply, static_argnums=(3,))(variables, x, None, False, rngs=rngs)
    kept = np.asarray(out) * (1 - RATE)  # number of layers that kept each entry
    np.testing.assert_allclose(kept, np.round(kept), atol=1e-5)
    counts = np.bincount(np.round(kept).astype(int).ravel(), minlength=n_layers + 1)
    assert counts.size == n_layers + 1
    # Independent masks: P(k layers keep) = C(L, k) / 2**L, on 512 entries.
    expected = np.array([math.comb(n_layers, k) for k in range(n_layers + 1)]) / 2**n_layers
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.08)


@pytest.fixture(scope="module")
def language_model():
    backbone = Backbone("attention", 16, 2, max_len=2048, dropout=0.3)  # the old LM default
    model = LanguageModel(backbone, vocab_size=13)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 13)
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    return apply, variables, tokens


def test_same_rng_same_output_different_rng_different_output(language_model):
    apply, variables, tokens = language_model

    def run(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return np.asarray(apply(variables, tokens, deterministic=False, rngs=rngs))

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    deterministic = np.asarray(apply(variables, tokens, deterministic=True))
    assert np.abs(a - deterministic).max() > 1e-3


def test_deterministic_ignores_the_rng(language_model):
    apply, variables, tokens = language_model
    plain = np.asarray(apply(variables, tokens))
    for seed in (3, 4):
        with_rng = apply(
            variables, tokens, deterministic=True, rngs={"dropout": jax.random.key(seed)}
        )
        np.testing.assert_array_equal(np.asarray(with_rng), plain)


def test_training_mode_without_a_dropout_rng_is_an_error(language_model):
    apply, variables, tokens = language_model
    with pytest.raises(Exception, match="dropout"):
        apply(variables, tokens, deterministic=False)


def test_classifier_dropout_follows_the_rng():
    # causal=False: the old classifier's auto direction for attention (it has the form).
    backbone = Backbone("attention", 8, 2, causal=False, max_len=1024, dropout=0.5)
    model = SequenceClassifier(backbone, num_classes=3, vocab_size=11)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 11)
    mask = jnp.arange(7)[None] < jnp.array([[7], [4]])
    variables = jax.jit(model.init)(jax.random.key(1), tokens, mask=mask)
    apply = jax.jit(model.apply, static_argnames="deterministic")

    def run(seed, deterministic=False):
        rngs = {"dropout": jax.random.key(seed)}
        return np.asarray(apply(variables, tokens, mask, deterministic=deterministic, rngs=rngs))

    np.testing.assert_array_equal(run(1), run(1))
    assert np.abs(run(1) - run(2)).max() > 1e-4
    np.testing.assert_array_equal(run(1, True), run(2, True))
    np.testing.assert_array_equal(run(1, True), np.asarray(apply(variables, tokens, mask)))
