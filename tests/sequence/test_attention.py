"""Ring attention (the sequence-parallel form of ``attention``) equals the unsharded op: outputs
and the gradients of q, k and v, causal and not, windowed, with key masks and packed documents
whose boundaries fall inside shards, exactly on shard edges, and one-token documents at edges.

The op has no grouped-query form (keys must have as many heads as queries), so there is no GQA
case to cover."""

import contextlib
import importlib
import io
import itertools
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops import attention
from tests.sequence.harness import compare_sharded, mesh

# Built for 8 (fake CPU) devices; skipped where fewer are visible (one GPU).
pytestmark = pytest.mark.devices(8)

attention_module = importlib.import_module("effseq.ops.attention")

T = 32
# Row 0, with shard edges at multiples of 4 (8 shards) and 8 (4 shards): a boundary inside a
# shard (5), on an edge (8, 24), one-token documents on an edge (16) and just before one (23).
# Row 1 reuses id 3 for its last document, which must stay a document of its own.
SEGMENTS = jnp.array(
    [
        [1] * 5 + [2] * 3 + [3] * 8 + [4] + [5] * 6 + [6] + [7] * 8,
        [3] * 12 + [4] * 8 + [3] * 12,
    ]
)
# Row 0 hides its first 3 keys, so its first causal queries see nothing (zeros, finite
# gradients); row 1 hides the keys of its last 11 steps (right padding).
KV_MASK = jnp.ones((2, T), bool).at[0, :3].set(False).at[1, 21:].set(False)


def _qkv(t=T, b=2, h=2, dk=8, dv=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (b, t, h, dk)),
        jax.random.normal(keys[1], (b, t, h, dk)),
        jax.random.normal(keys[2], (b, t, h, dv)),
    )


def _check(n, t=T, data=1, segment_ids=None, kv_mask=None, **kw):
    def fn(q, k, v):
        return attention(q, k, v, segment_ids=segment_ids, kv_mask=kv_mask, **kw)

    batch = (0, 1, 2) if data > 1 else ()
    compare_sharded(fn, _qkv(t), n, data=data, names=["q", "k", "v"], batch=batch)


def test_causal_with_data_axis():
    # Batch-sharded inputs meet the shard_map; a key mask that leaves some queries blind.
    _check(2, t=16, data=2, kv_mask=KV_MASK[:, :16], scale=0.3)


def test_window_both_ways_with_documents(monkeypatch):
    # Key blocks of 3 inside each 8-step shard (the last one partial); a non-causal window of 5
    # reaches one shard each way, so the ring passes once to the right and once to the left.
    monkeypatch.setattr(attention_module, "_KEY_BLOCK", 3)
    _check(4, causal=False, window=5, segment_ids=SEGMENTS, kv_mask=KV_MASK)


def test_full_causal_ring_with_documents():
    _check(8, segment_ids=SEGMENTS)


def test_causal_window_over_shards():
    # A window of 6 over 4-step shards reaches two shards back: two passes of seven.
    _check(8, window=6, kv_mask=KV_MASK)


def _residual_elements(n, **kw):
    """Elements the sharded attention keeps for its backward pass, all shards together."""
    q, k, v = _qkv()
    out = io.StringIO()
    with jax.set_mesh(mesh(n)), contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(lambda *a: attention(*a, **kw), q, k, v)
    shapes = re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M)
    assert shapes, out.getvalue()
    return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)


def test_gradient_keeps_only_local_residuals():
    """The backward recomputes from q, k, v, o and the log-sum-exp: what is kept does not grow
    with the shard count, where autodiff through the ring kept every received block."""
    kw = dict(segment_ids=SEGMENTS, kv_mask=KV_MASK)
    # The same but for each shard's own index (one integer per shard).
    assert _residual_elements(8, **kw) - _residual_elements(2, **kw) == 8 - 2


def test_ring_passes():
    passes = attention_module._ring_passes
    assert passes(True, None, 8, 4) == (3, 0)
    assert passes(False, None, 8, 4) == (3, 0)
    assert passes(True, 1, 8, 4) == (0, 0)
    assert passes(True, 9, 8, 4) == (1, 0)
    assert passes(True, 10, 8, 4) == (2, 0)
    assert passes(True, 100, 8, 4) == (3, 0)
    assert passes(False, 9, 8, 4) == (1, 1)
    # Both ways would meet (2 * 2 + 1 > 4): the full ring, once round.
    assert passes(False, 10, 8, 4) == (3, 0)


def test_window_within_shard_needs_no_pass():
    q, k, v = _qkv()
    with jax.set_mesh(mesh(4)):
        jaxpr = str(jax.make_jaxpr(lambda *a: attention(*a, window=1))(q, k, v))
    assert "shard_map" in jaxpr and "ppermute" not in jaxpr


def test_decoding_calls_run_unsharded():
    """Queries against a cache (q_offset) or of another length carry no sharded time axis:
    they run as the plain op does, with the same result."""
    q, k, v = _qkv(t=16)
    cases = [((q[:, :1], k, v), dict(q_offset=9)), ((q[:, :8], k, v), {})]
    for args, kw in cases:
        expected = attention(*args, **kw)
        with jax.set_mesh(mesh(2)):
            jaxpr = str(jax.make_jaxpr(lambda *a, kw=kw: attention(*a, **kw))(*args))
            got = jax.jit(lambda *a, kw=kw: attention(*a, **kw))(*args)
        assert "shard_map" not in jaxpr
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_rejects_what_does_not_shard():
    q, k, v = _qkv(t=16)
    with jax.set_mesh(mesh(2)):
        with pytest.raises(ValueError, match="mesh.sequence = 2"):
            attention(*_qkv(t=15))
        with pytest.raises(ValueError, match="segment_ids"):
            attention(q, k, v, segment_ids=SEGMENTS)
        with pytest.raises(ValueError, match="unknown impl"):
            attention(q, k, v, impl="fused")


@pytest.mark.slow
@pytest.mark.parametrize(
    "n,causal,window,packed,masked",
    list(
        itertools.product([2, 4, 8], [True, False], [None, 3, 6, 13], [False, True], [True, False])
    ),
)
def test_matrix(n, causal, window, packed, masked):
    _check(
        n,
        causal=causal,
        window=window,
        segment_ids=SEGMENTS if packed else None,
        kv_mask=KV_MASK if masked else None,
    )


@pytest.mark.slow
@pytest.mark.parametrize("n,causal,window", [(4, True, None), (8, True, 13), (8, False, 5)])
def test_key_blocks_inside_shards(monkeypatch, n, causal, window):
    # The backward walks each ring block in key blocks of 3 (the last one partial) too.
    monkeypatch.setattr(attention_module, "_KEY_BLOCK", 3)
    _check(n, causal=causal, window=window, segment_ids=SEGMENTS, kv_mask=KV_MASK)
