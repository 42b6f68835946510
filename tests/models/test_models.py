import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers import params
from effseq.models import MIXERS, Backbone, LanguageModel, SequenceClassifier, registry
from tests.tolerances import assert_close

V, D, T = 11, 16, 9
# Exactly causal convolutions, so causality can be checked as exact equality.
DIRECT = {"conv_impl": "direct"}
# Heads that divide D = 16, and small states (the defaults are sized for d_model >= 64).
OPTIONS = {
    "s4d": DIRECT,
    "sgconv": DIRECT,
    "mamba2": {"head_dim": 8, "state_size": 8},
    "gdn": {"num_heads": 2},
    "based": {"num_heads": 2, "feature_dim": 4},
}
# The four newer mixers in one hybrid: their decoding states go through the stack's cache.
NEWER = "mamba2,gdn,rglru,based"
CAUSAL = ["s4d", "sgconv", "mamba", "gla", "attention", "gla,attention", NEWER]
BIDIRECTIONAL = sorted(registry.BIDIRECTIONAL)
# The newer mixers' prefill and causality are checked layer by layer (tests/layers); at model
# level the fast suite decodes them (the stack's cache) and the rest runs with `make test-slow`.
CAUSAL_FAST = [m if m != NEWER else pytest.param(m, marks=pytest.mark.slow) for m in CAUSAL]
NEWER_NAMES = set(NEWER.split(","))
# Every mixer's step, prefill and padded forms are checked layer by layer in every form by
# tests/conformance; at model level the fast suite decodes the hybrids (the stack's cache
# across different mixers) and checks the classifier's padding with two mixers, one of each
# kind; each single mixer here runs with `make test-slow`.
HYBRIDS = ("gla,attention", NEWER)
MODEL_LEVEL = ("mamba", "attention")


def _slow_unless(mixer, keep):
    return pytest.param(mixer, marks=[] if mixer in keep else [pytest.mark.slow])


def _options(mixer):
    """OPTIONS for every mixer of a pattern, keyed by name (each reaches its mixer only)."""
    names = registry.names(mixer)
    if len(names) == 1:
        return OPTIONS.get(mixer)
    return {n: OPTIONS[n] for n in names if n in OPTIONS} or None


def _lm(mixer, n_layers=None, options=None, tie_embeddings=True, **kw):
    options = options or _options(mixer)
    n_layers = n_layers or max(2, len(registry.names(mixer)))
    backbone = Backbone(mixer, D, n_layers, max_len=16, mixer_options=options, **kw)
    return LanguageModel(backbone, vocab_size=V, tie_embeddings=tie_embeddings)


def _tokens(seed=0, t=T):
    return jax.random.randint(jax.random.key(seed), (2, t), 0, V)


def _decoded(model, variables, tokens, prompt=0):
    """Logits (b, t, V) from decoding token by token, after prefilling ``prompt`` tokens in
    parallel when ``prompt`` > 0, into a cache of 16 positions. Each form is jitted once (one
    compile per form, not op-by-op dispatch per token): the values are the same."""
    if prompt:
        prefill = jax.jit(lambda v, x: model.apply(v, x, 16, method="prefill"))
        first, cache = prefill(variables, tokens[:, :prompt])
        steps = [first]
    else:
        cache = model.apply(variables, tokens.shape[0], 16, method="init_cache")
        steps = []
    step = jax.jit(lambda v, x, c: model.apply(v, x, c, method="decode_step"))
    for i in range(prompt, tokens.shape[1]):
        out, cache = step(variables, tokens[:, i], cache)
        steps.append(out[:, None])
    return jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize("mixer", [_slow_unless(m, HYBRIDS) for m in CAUSAL])
def test_decoding_equals_the_parallel_forward(mixer):
    model = _lm(mixer)
    tokens = _tokens()
    variables = model.init(jax.random.key(1), tokens)
    logits = model.apply(variables, tokens)
    assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
    assert_close(_decoded(model, variables, tokens), logits)


PRIMER = {"rotary": True, "dconv": True, "window": 4}


@pytest.mark.parametrize(
    "mixer,options",
    [pytest.param(m, None, marks=[] if m == "gla,attention" else pytest.mark.slow) for m in CAUSAL]
    + [("attention", PRIMER)],
)
def test_prefill_then_decoding_equals_the_parallel_forward(mixer, options):
    # A 3-token prompt is shorter than Mamba's and Primer's conv windows (width 4), so the
    # window's zero padding is exercised too.
    model = _lm(mixer, options=options)
    tokens = _tokens(seed=3)
    variables = model.init(jax.random.key(1), tokens)
    assert_close(_decoded(model, variables, tokens, prompt=3), model.apply(variables, tokens))


def test_prefill_longer_than_the_cache_is_an_error():
    model = _lm("attention")
    variables = model.init(jax.random.key(1), _tokens())
    with pytest.raises(ValueError, match="prompt length 20 exceeds max_len=16"):
        model.apply(variables, _tokens(t=20), 16, method="prefill")


@pytest.mark.parametrize("mixer", CAUSAL_FAST)
def test_logits_do_not_depend_on_later_tokens(mixer):
    model = _lm(mixer)
    tokens = _tokens()
    variables = model.init(jax.random.key(1), tokens)
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % V)
    a, b = model.apply(variables, tokens), model.apply(variables, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :5]), np.asarray(b[:, :5]))
    assert np.any(np.asarray(a[:, 5:]) != np.asarray(b[:, 5:]))


@pytest.mark.parametrize(
    "mixer, bidirectional, pooling",
    [
        pytest.param(m, bi, pool, marks=[] if m in MODEL_LEVEL else [pytest.mark.slow])
        for pool in ("mean", "last")
        for bi in (False, True)
        for m in MIXERS
    ],
)
def test_padded_tokens_never_change_the_classifier(mixer, bidirectional, pooling):
    if bidirectional and mixer not in BIDIRECTIONAL:
        # The direction is the backbone's: a causal-only mixer is refused when it is built.
        with pytest.raises(ValueError, match=f"mixer '{mixer}' is causal only"):
            Backbone(mixer, D, 2, causal=False, max_len=12)
        return
    backbone = Backbone(
        mixer, D, 2, causal=not bidirectional, max_len=12, mixer_options=OPTIONS.get(mixer)
    )
    clf = SequenceClassifier(backbone, num_classes=3, vocab_size=V, pooling=pooling)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 1, V)
    mask = jnp.arange(12)[None] < jnp.array([[7], [12]])
    variables = clf.init(jax.random.key(1), tokens, mask=mask)
    apply = jax.jit(clf.apply)  # one compile for both inputs
    a = apply(variables, tokens, mask=mask)
    b = apply(variables, jnp.where(mask, tokens, 5), mask=mask)
    assert a.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mixer", [_slow_unless(m, MODEL_LEVEL) for m in MIXERS])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_length_never_changes_the_classifier(mixer, bidirectional):
    # The same 7 real tokens right-padded to 9 and to 16: no mixer may read the padding, not
    # even through a norm's bias, a gate or a step size that runs over it.
    if bidirectional and mixer not in BIDIRECTIONAL:
        pytest.skip(f"{mixer} is causal only (checked above)")
    backbone = Backbone(
        mixer, D, 2, causal=not bidirectional, max_len=16, mixer_options=OPTIONS.get(mixer)
    )
    clf = SequenceClassifier(backbone, num_classes=3, vocab_size=V)
    real = jax.random.randint(jax.random.key(0), (2, 7), 1, V)

    def padded(t):
        tokens = jnp.pad(real, ((0, 0), (0, t - 7)), constant_values=3)
        return tokens, jnp.arange(t)[None].repeat(2, 0) < 7

    variables = clf.init(jax.random.key(1), *padded(9))
    a = clf.apply(variables, *padded(9))
    b = clf.apply(variables, *padded(16))
    assert_close(b, a)


def test_dual_encoder_and_continuous_inputs():
    # S4D has a bidirectional form, which the old classifier default (auto) picked.
    backbone = Backbone("s4d", D, 2, causal=False, max_len=1024)
    clf = SequenceClassifier(backbone, num_classes=2, dual=True)
    x1, x2 = (jax.random.normal(jax.random.key(i), (3, 10)) for i in (0, 1))
    variables = clf.init(jax.random.key(2), x1, inputs2=x2)
    a = clf.apply(variables, x1, inputs2=x2)
    b = clf.apply(variables, x1, inputs2=x2[::-1])
    assert a.shape == (3, 2) and np.any(np.asarray(a) != np.asarray(b))
    with pytest.raises(ValueError, match="needs `inputs2`"):
        clf.apply(variables, x1)


def test_unknown_mixer_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown mixer 'rwkv'.*known: s4d, sgconv, mamba"):
        _lm("gla,rwkv").init(jax.random.key(0), _tokens())
    with pytest.raises(ValueError, match="multiple of the pattern length 2"):
        _lm("gla,attention", n_layers=3).init(jax.random.key(0), _tokens())


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_every_parameter_has_axes_and_groups_follow_the_mixer(mixer):
    model = _lm(mixer)
    variables = model.init(jax.random.key(1), _tokens())

    def leaves(tree):
        return jax.tree.leaves(tree, is_leaf=lambda x: x is None or isinstance(x, tuple))

    axes = leaves(params.logical_axes(variables))
    assert axes and all(a is not None and None not in a for a in axes)
    # The scanned stack adds the layer axis in front of every stacked parameter.
    assert all(a[0] == "layers" for a in leaves(params.logical_axes(variables["params"]["stack"])))
    # Each recipe's groups: S4D's A, B (and log_dt) and SGConv's kernels train at the SSM
    # learning rate; Mamba's and Mamba-2's A_log, D and dt_bias, GDN's A_log and dt_bias and
    # the RG-LRU's gates and a_param at the base rate without weight decay.
    named = {g for g in jax.tree.leaves(params.groups(variables)) if g is not None}
    tagged = any(jax.tree.leaves(params.ssm_mask(variables)))
    assert tagged == (mixer in ("s4d", "sgconv"))
    assert ("no_decay" in named) == (mixer in ("mamba", "mamba2", "gdn", "rglru"))


def test_compile_time_is_flat_in_depth():
    salts = iter(range(1, 100))

    def compile_seconds(n_layers):
        model = _lm("gla", n_layers=n_layers)
        tokens = _tokens()
        variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
        # A constant no other compile has: the suite's persistent compilation cache
        # (tests/conftest.py) must not turn this compile into a lookup.
        salt = float(next(salts)) + 0.5

        def apply(v, x):
            return model.apply(v, x) * salt

        start = time.perf_counter()
        jax.jit(apply).lower(variables, tokens).compile()
        return time.perf_counter() - start

    compile_seconds(2)  # warm the tracing caches
    assert compile_seconds(8) < 4 * compile_seconds(2)


def test_untied_head_and_bfloat16():
    model = _lm("gla", tie_embeddings=False, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(1), _tokens())
    assert "head" in variables["params"]
    assert nn.unbox(variables)["params"]["head"].shape == (D, V)
    assert model.apply(variables, _tokens()).dtype == jnp.float32


def test_remat_changes_memory_not_results():
    tokens = _tokens()
    plain, remat = _lm("gla,attention"), _lm("gla,attention", remat=True)
    variables = plain.init(jax.random.key(1), tokens)
    np.testing.assert_array_equal(
        np.asarray(plain.apply(variables, tokens)), np.asarray(remat.apply(variables, tokens))
    )
    grads = [jax.grad(lambda v, m=m: m.apply(v, tokens).sum())(variables) for m in (plain, remat)]
    for a, b in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
        assert_close(a, b, kind="grad")


# The short convolution sits in the residual block, the same for every mixer: the fast suite
# runs it before a mixer with a state of its own (GLA) and one with its own convolution (Mamba).
@pytest.mark.parametrize(
    "mixer",
    ["gla", "mamba", pytest.param("attention", marks=pytest.mark.slow),
     pytest.param("s4d", marks=pytest.mark.slow)],
)  # fmt: skip
def test_short_conv_decoding_prefill_and_causality(mixer):
    # Zoology's short convolution in front of every mixer: its window joins the decoding
    # state, a prompt shorter than the window (3 < 4 taps) leaves zeros in front.
    model = _lm(mixer, short_conv=4)
    tokens = _tokens(seed=5)
    variables = model.init(jax.random.key(1), tokens)
    kernel = nn.unbox(variables)["params"]["stack"]["layers"][f"0_{mixer}"]["short_conv"]
    assert kernel.shape == (2, D, 4)  # (layers, d, taps)
    logits = model.apply(variables, tokens)
    assert_close(_decoded(model, variables, tokens), logits)
    assert_close(_decoded(model, variables, tokens, prompt=3), logits)
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % V)
    later = model.apply(variables, changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :5]), np.asarray(later[:, :5]))


def test_short_conv_never_reads_padding_and_rejects_one_tap():
    backbone = Backbone("s4d", D, 2, causal=False, max_len=12, short_conv=3)
    clf = SequenceClassifier(backbone, num_classes=3, vocab_size=V)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 1, V)
    mask = jnp.arange(12)[None] < jnp.array([[7], [12]])
    variables = clf.init(jax.random.key(1), tokens, mask=mask)
    a = clf.apply(variables, tokens, mask=mask)
    b = clf.apply(variables, jnp.where(mask, tokens, 5), mask=mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="short_conv must be 0 .none. or the number of taps"):
        _lm("gla", short_conv=1).init(jax.random.key(1), _tokens())
