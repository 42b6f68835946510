"""Whole models with the time axis sharded: a language model holding every built-in causal
mixer (packed rows, a short convolution in front of each mixer; prefill then decode) and a
classifier holding every bidirectional one, pooling each packed document, give the unsharded
logits and the gradients of every parameter, on mesh.sequence = 4 x data = 2 (8 fake CPU
devices). Slow (a minute of compiling each on a 2-core CPU): the fast suite checks each mixer
in tests/conformance/test_sharded.py and a sharded training run in tests/train/test_loop.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.models import Backbone, LanguageModel, SequenceClassifier, registry
from tests.models.test_packing import EVERY, OPTIONS
from tests.sequence.harness import compare_sharded

# Built for 8 (fake CPU) devices; skipped where fewer are visible (one GPU).
pytestmark = pytest.mark.devices(8)

V, D, T = 13, 16, 32


def _ids():
    """Row 0: documents starting on the shard edges 8 and 16 (4 shards of 8), inside shards,
    one token long on an edge, then padding; row 1: one document over every shard."""
    row0 = np.array([1] * 8 + [2] + [3] * 7 + [4] * 5 + [5] * 8 + [0] * 3, np.int32)
    row1 = np.full(T, 7, np.int32)
    return jnp.asarray(np.stack([row0, row1]))


def _tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, V, (2, T)), jnp.int32)


STEPS = 3  # tokens decoded after the packed prompt


def _lm():
    mixers = registry.names(EVERY)
    bb = Backbone(EVERY, D, len(mixers), max_len=T + STEPS, mixer_options=OPTIONS, short_conv=3)
    return LanguageModel(bb, vocab_size=V)


def _init(model, tokens):
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    return variables, variables["params"]


@pytest.mark.slow
def test_language_model_with_every_mixer_packed():
    model, tokens, ids = _lm(), _tokens(), _ids()
    variables, params = _init(model, tokens)

    def logits(p):
        return model.apply({**variables, "params": p}, tokens, segment_ids=ids)

    compare_sharded(logits, (params,), 4, data=2, names=["params"])


@pytest.mark.slow
def test_language_model_prefill_then_decode():
    """A packed prompt prefilled sharded, then decoded: the decoded logits continue each row's
    last document as the unsharded model does (each mixer alone: tests/conformance)."""
    model, tokens, ids = _lm(), _tokens(), _ids()
    variables, params = _init(model, tokens)
    more = _tokens(3)[:, :STEPS]

    def logits(p):
        v = {**variables, "params": p}
        y = model.apply(v, tokens, segment_ids=ids)
        _, cache = model.apply(v, tokens, T + STEPS, ids, method="prefill")
        decoded = []
        for i in range(STEPS):
            y_t, cache = model.apply(v, more[:, i], cache, method="decode_step")
            decoded.append(y_t)
        return y, jnp.stack(decoded, 1)

    compare_sharded(logits, (params,), 4, data=2, names=["params"])


@pytest.mark.slow
@pytest.mark.parametrize("sequence, data", [(2, 1), (8, 1), (4, 1)])
def test_language_model_unpacked(sequence, data):
    model, tokens = _lm(), _tokens(1)
    variables, params = _init(model, tokens)
    compare_sharded(
        lambda p: model.apply({**variables, "params": p}, tokens), (params,), sequence, data=data
    )


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_bidirectional_classifier_pools_each_packed_document(pooling):
    bidirectional = "s4d,sgconv,mamba,attention,mamba2"
    bb = Backbone(bidirectional, D, 5, causal=False, max_len=T, mixer_options=OPTIONS)
    model = SequenceClassifier(bb, num_classes=3, vocab_size=V, pooling=pooling)
    tokens, ids = _tokens(2), _ids()
    variables, params = _init(model, tokens)

    def logits(p):
        v = {**variables, "params": p}
        return model.apply(v, tokens, segment_ids=ids, num_segments=5)

    compare_sharded(logits, (params,), 4, data=2, names=["params"])
