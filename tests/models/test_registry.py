"""register_mixer: a new mixer becomes usable by name in models, and bad ones are refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effseq.configs
from effseq.data import TaskInfo
from effseq.layers import Mixer
from effseq.models import (
    MIXERS,
    Backbone,
    LanguageModel,
    SequenceClassifier,
    build,
    register_mixer,
    registry,
)


class Decay(Mixer):
    """A minimal causal mixer: y_t = sum_s a^(t-s) W x_s, with a per-channel a in (0, 1)."""

    def setup(self):
        self.w = self.param("w", nn.initializers.lecun_normal(), (self.d_model, self.d_model))
        self.logit = self.param("logit", nn.initializers.zeros, (self.d_model,))

    def _decay(self):
        return jax.nn.sigmoid(self.logit)

    def __call__(self, x, mask=None):
        u = x @ self.w
        a = jnp.broadcast_to(self._decay(), u.shape)

        def body(h, au):
            h = au[0] * h + au[1]
            return h, h

        _, ys = jax.lax.scan(body, jnp.zeros(u[:, 0].shape), (a.swapaxes(0, 1), u.swapaxes(0, 1)))
        return ys.swapaxes(0, 1)

    def init_state(self, batch, max_len):
        return jnp.zeros((batch, self.d_model))

    def prefill(self, x, max_len):
        y = self(x)
        return y, y[:, -1]

    def step(self, x_t, state):
        state = self._decay() * state + x_t @ self.w
        return state, state


class BiDecay(Decay):
    """Decay with a non-causal form (causal=False): a backward pass added."""

    def __call__(self, x, mask=None):
        y = super().__call__(x, mask)
        if not self.causal:
            y = y + jnp.flip(super().__call__(jnp.flip(x, 1), mask), 1)
        return y


@pytest.fixture
def restore_registry():
    """Registrations are global: put MIXERS and BIDIRECTIONAL back after each test."""
    mixers, bidi = dict(MIXERS), set(registry.BIDIRECTIONAL)
    yield
    MIXERS.clear()
    MIXERS.update(mixers)
    registry.BIDIRECTIONAL.clear()
    registry.BIDIRECTIONAL.update(bidi)


def test_registered_mixer_builds_a_language_model_that_decodes(restore_registry):
    register_mixer("decay", Decay)
    assert MIXERS["decay"] is Decay
    # The old LanguageModel default max_len=2048, kept explicitly.
    model = LanguageModel(Backbone("decay,gla", 8, 2, max_len=2048), vocab_size=11)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 11)
    variables = model.init(jax.random.key(1), tokens)
    logits = model.apply(variables, tokens)
    assert logits.shape == (2, 7, 11)
    # The parallel form and token-by-token decoding through the registered mixer agree.
    cache = model.apply(variables, 2, 7, method="init_cache")
    stepped = []
    for t in range(7):
        out, cache = model.apply(variables, tokens[:, t], cache, method="decode_step")
        stepped.append(out)
    np.testing.assert_allclose(np.stack(stepped, 1), logits, rtol=1e-4, atol=1e-4)


def test_bidirectional_flag_reaches_classifiers(restore_registry):
    register_mixer("bidecay", BiDecay, bidirectional=True)
    assert "bidecay" in registry.BIDIRECTIONAL
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 11)
    changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % 11)

    def first_token_logits(bidirectional):
        # Pooling the first position: it sees the last token only through a backward pass.
        # The direction is resolved from the config's model.bidirectional (the classifier's
        # old bidirectional field: "auto" was None, "no" False) into backbone.causal.
        config = effseq.configs.get_config()
        config.model.update(mixer="bidecay", d_model=8, n_layers=1, mlp_ratio=4, pooling="first")
        config.model.bidirectional = bidirectional
        model = build.build_model(config.model, TaskInfo("toy", 11, None, 3, 6))
        assert isinstance(model, SequenceClassifier)
        assert model.backbone.causal == (bidirectional == "no")
        variables = model.init(jax.random.key(1), tokens)
        return model.apply(variables, tokens), model.apply(variables, changed)

    # "auto" picks the non-causal form because of the registration.
    before, after = first_token_logits("auto")
    assert before.shape == (2, 3)
    assert not np.allclose(before, after)
    before, after = first_token_logits("no")
    np.testing.assert_allclose(before, after)


def test_replace_and_refusals(restore_registry):
    register_mixer("decay", Decay)
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_mixer("decay", BiDecay)
    register_mixer("decay", BiDecay, replace=True)
    assert MIXERS["decay"] is BiDecay
    with pytest.raises(ValueError, match="'gla' is already registered"):
        register_mixer("gla", Decay, replace=True)
    with pytest.raises(ValueError, match="without commas"):
        register_mixer("a,b", Decay)
    with pytest.raises(ValueError, match="flax.linen.Module subclass"):
        register_mixer("plain", object)

    # The direction is the interface's causal field (no `bidirectional` field any more): a
    # class without the interface's fields is refused, whatever it declares.
    class OldStyle(nn.Module):
        d_model: int
        dtype: jnp.dtype = jnp.float32
        param_dtype: jnp.dtype = jnp.float32
        bidirectional: bool = False

        __call__ = Decay.__call__
        init_state, step, prefill = Decay.init_state, Decay.step, Decay.prefill

    with pytest.raises(ValueError, match="lacks causal, max_len of the mixer interface"):
        register_mixer("nobidi", OldStyle, bidirectional=True)

    class NoStep(Mixer):
        def __call__(self, x, mask=None):
            return x

    with pytest.raises(ValueError, match="lacks init_state, step, prefill"):
        register_mixer("nostep", NoStep)
    assert "nostep" not in MIXERS and "nobidi" not in MIXERS
    assert "nobidi" not in registry.BIDIRECTIONAL


def test_options_keyed_by_a_mixer_name_reach_only_that_mixer():
    options = {"state_size": 8, "attention": {"rotary": True}}
    rotary = Backbone(
        "gla,attention", 16, 2, max_len=16, mixer_options={"attention": options["attention"]}
    )
    att = registry.make_mixer("attention", rotary)
    gla = registry.make_mixer("gla", rotary)
    mamba = registry.make_mixer(
        "mamba", Backbone("mamba", 16, 1, max_len=16, mixer_options=options)
    )
    assert att.rotary and not hasattr(gla, "rotary") and mamba.state_size == 8
    # In a hybrid LM the attention layers get rotary positions: moving a token changes them.
    model = LanguageModel(rotary, vocab_size=11)
    plain = model.clone(backbone=rotary.replace(mixer_options=None))
    tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
    variables = model.init(jax.random.key(0), tokens)
    assert not np.allclose(model.apply(variables, tokens), plain.apply(variables, tokens))


def test_config_checks_name_their_key():
    """Config values are checked before anything is built, each error naming its key."""
    config = effseq.configs.get_config()
    assert config.model.mixer == "gla"  # causal only
    with pytest.raises(ValueError, match="'model.bidirectional'.*'gla' is causal only"):
        effseq.configs.override(config, ["model.bidirectional=yes"])
    with pytest.raises(
        ValueError, match=r"model\.mixer_options: GLA .mixer 'gla'. has no field 'no_such_field'"
    ):
        effseq.configs.override(
            effseq.configs.get_config(), ["model.mixer_options.no_such_field=3"]
        )
    with pytest.raises(ValueError, match=r"model\.mixer_options\.gla: GLA .* 'rotary'"):
        effseq.configs.override(
            effseq.configs.get_config(), ["model.mixer_options.gla={'rotary': True}"]
        )
