"""Packed rows at model level: each document's logits and gradients equal the document run
alone (the issue's external check calls exactly ``LanguageModel.apply(variables, tokens,
segment_ids=seg)``), a packed prefill decodes the last document on, and the classifier pools
per document."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers import Mixer
from effseq.models import Backbone, LanguageModel, SequenceClassifier, registry
from tests.tolerances import assert_close

V, D = 13, 16
# Every built-in causal mixer in one stack (one compile), with a short convolution in front of
# each mixer, rotary attention, and small chunks so documents start inside chunks.
EVERY = "s4d,sgconv,mamba,gla,attention,mamba2,gdn,rglru,based"
OPTIONS = {
    "mamba": {"chunk_size": 4},
    "gla": {"chunk_size": 4},
    "attention": {"rotary": True},
    "mamba2": {"head_dim": 8, "state_size": 8, "chunk_size": 4},
    "gdn": {"num_heads": 2, "chunk_size": 4},
    "based": {"num_heads": 2, "feature_dim": 4},
}
# Document lengths of two packed rows (0 = trailing padding); the row positions differ.
DOCS = [[5, 1, 7, 2], [3, 9, 4]]
T = 16


def _lm(mixer=EVERY, **kw):
    n = len(registry.names(mixer))
    bb = Backbone(mixer, D, n, max_len=32, mixer_options=OPTIONS, short_conv=3, **kw)
    return LanguageModel(bb, vocab_size=V)


def _packed(seed=0):
    """tokens (2, T), segment_ids (2, T) with 0 padding, and each document's (row, start,
    tokens)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(DOCS), T), np.int32)
    seg = np.zeros((len(DOCS), T), np.int32)
    docs = []
    for r, lengths in enumerate(DOCS):
        start = 0
        for i, n in enumerate(lengths):
            toks = rng.integers(1, V, n)
            tokens[r, start : start + n] = toks
            seg[r, start : start + n] = i + 1
            docs.append((r, start, toks))
            start += n
        tokens[r, start:] = rng.integers(1, V, T - start)  # junk under padding
    return jnp.asarray(tokens), jnp.asarray(seg), docs


@pytest.fixture(
    scope="module",
    params=[
        # Two mixers with a conv window, a chunked scan and rotary attention in the fast suite;
        # all nine (one compile of a nine-layer stack, about 30 s more) with make test-slow.
        pytest.param("mamba2,attention", id="mamba2,attention"),
        pytest.param(EVERY, id="all-nine", marks=pytest.mark.slow),
    ],
)
def every(request):
    model = _lm(request.param)
    tokens, seg, docs = _packed()
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    return model, variables, tokens, seg, docs


def _alone(docs, extra=None):
    """Each document (followed by ``extra`` tokens) at the start of its own row, junk after it:
    a causal model's logits there are the document's own (one program for every document)."""
    rows = np.array(jax.random.randint(jax.random.key(9), (len(docs), T + 3), 1, V))
    lengths = []
    for i, (_, _, toks) in enumerate(docs):
        toks = np.concatenate([toks, extra[i]]) if extra is not None else toks
        rows[i, : len(toks)] = toks
        lengths.append(len(toks))
    return jnp.asarray(rows), np.array(lengths)


def test_each_document_equals_itself_alone(every):
    model, variables, tokens, seg, docs = every

    def loss(v, x, s, weight):
        logits = model.apply(v, x, segment_ids=s)
        return jnp.sum(jnp.sin(logits) * weight[..., None]), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, logits), grads = grad(variables, tokens, seg, (seg != 0).astype(jnp.float32))
    rows, lengths = _alone(docs)
    weight = (np.arange(rows.shape[1]) < lengths[:, None]).astype(np.float32)
    (_, own), total = grad(variables, rows, None, jnp.asarray(weight))
    for i, (r, start, toks) in enumerate(docs):
        n = len(toks)
        assert_close(logits[r, start : start + n], own[i, :n], err_msg=f"row {r} at {start}")
    # The packed loss is the sum of the documents' losses, so its gradient is their sum.
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree.leaves(grads),
        jax.tree.leaves(total),
        strict=True,
    ):
        assert_close(a, b, kind="grad", err_msg=jax.tree_util.keystr(path[0]))


def test_packed_prefill_decodes_the_last_document_on(every):
    """Prefill of a packed, right-padded prompt, then decode steps: the logits of the last
    document's continuation, as if that document had been decoded alone."""
    model, variables, tokens, seg, docs = every
    more = np.asarray(jax.random.randint(jax.random.key(5), (2, 3), 1, V))
    prefill = jax.jit(lambda v, x, s: model.apply(v, x, 32, segment_ids=s, method="prefill"))
    step = jax.jit(lambda v, x, c: model.apply(v, x, c, method="decode_step"))
    _, cache = prefill(variables, tokens, seg)
    outs = []
    for i in range(more.shape[1]):
        out, cache = step(variables, jnp.asarray(more[:, i]), cache)
        outs.append(out)
    last = [[d for d in docs if d[0] == r][-1] for r in range(2)]
    rows, lengths = _alone(last, more)
    expected = jax.jit(model.apply)(variables, rows)
    for r in range(2):
        n = len(last[r][2])
        assert_close(jnp.stack([o[r] for o in outs]), expected[r, n : n + 3], err_msg=f"row {r}")


def test_classifier_pools_each_document():
    """Per-document logits of a packed row equal each document classified alone (each at the
    start of its own row under a mask, which leaves a document's outputs as they are alone),
    for every pooling; a row with fewer documents gets zero features for the missing ones."""
    tokens, seg, docs = _packed(1)
    alone = np.zeros((len(docs), T), np.int32)
    mask = np.zeros((len(docs), T), bool)
    for i, (_, _, toks) in enumerate(docs):
        alone[i, : len(toks)], mask[i, : len(toks)] = toks, True
    bb = Backbone("mamba,attention", D, 2, causal=False, max_len=32)
    for pooling in ("mean", "last", "first"):
        model = SequenceClassifier(bb, num_classes=3, vocab_size=V, pooling=pooling)
        if pooling == "mean":  # the parameters do not depend on the pooling
            variables = jax.jit(model.init)(jax.random.key(0), tokens)
        apply = jax.jit(model.apply, static_argnames="num_segments")
        packed = apply(variables, tokens, segment_ids=seg, num_segments=4)
        own = apply(variables, jnp.asarray(alone), jnp.asarray(mask))
        assert packed.shape == (2, 4, 3)
        counts = {0: 0, 1: 0}
        for i, (r, _, _) in enumerate(docs):
            assert_close(packed[r, counts[r]], own[i], err_msg=f"{pooling} row {r}")
            counts[r] += 1
        bias_only = jnp.zeros(3)  # zero features through the head (no bias)
        assert_close(packed[1, 3], bias_only, err_msg=f"{pooling}: missing document")
    with pytest.raises(ValueError, match="num_segments"):
        model.apply(variables, tokens, segment_ids=seg)


class _Unpacked(Mixer):
    """A mixer written before packing: no segment_ids keyword."""

    def setup(self):
        pass

    def __call__(self, x, mask=None):
        return x

    def init_state(self, batch, max_len):
        return ()

    def step(self, x_t, state):
        return x_t, state

    def prefill(self, x, max_len):
        return x, ()


def test_a_mixer_without_segment_ids_is_refused_only_for_packed_input():
    registry.register_mixer("unpacked_test", _Unpacked, replace=True)
    try:
        model = _lm("unpacked_test")
        tokens, seg, _ = _packed()
        variables = model.init(jax.random.key(0), tokens)
        assert model.apply(variables, tokens).shape == (2, T, V)
        with pytest.raises(ValueError, match="unpacked_test.*segment_ids"):
            model.apply(variables, tokens, segment_ids=seg)
    finally:
        registry.MIXERS.pop("unpacked_test", None)
        registry.BIDIRECTIONAL.discard("unpacked_test")
