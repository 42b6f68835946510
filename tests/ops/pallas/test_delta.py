"""gated_delta_rule(impl="pallas") (effseq.ops.pallas.delta) against the reference scan.

The kernel runs in Pallas's interpret mode on a CPU (values, gradients through the custom VJP)
and is cross-lowered for the cuda platform through Triton (``lower_for_gpu``), which applies
Triton's block-shape and op rules without a GPU. Shapes are tiny: interpret mode is slow.
"""

import jax
import jax.numpy as jnp
import pytest

from effseq.ops.delta_rule import gated_delta_rule, gated_delta_rule_reference
from effseq.ops.pallas import _common, delta
from tests.ops.compare import compare_with_reference

NAMES = ("q", "k", "v", "log_g", "beta", "h0")


def _inputs(b, t, h, dk, dv, *, gates="realistic", per_channel=False, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = jax.random.normal(ks[1], (b, t, h, dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # as the layer gives them
    v = jax.random.normal(ks[2], (b, t, h, dv))
    shape = (b, t, h, dk) if per_channel else (b, t, h)
    if gates == "realistic":
        log_g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], shape)) / 4
    else:  # "mixed": exp(-20) and ~1 side by side, decays of ~1 right after tiny ones
        k1, k2 = jax.random.split(ks[3])
        tiny = -1e-4 * jax.random.uniform(k1, shape)
        log_g = jnp.where(jax.random.bernoulli(k2, 0.5, shape), -20.0, tiny)
    beta = jax.random.uniform(ks[4], (b, t, h))
    h0 = jax.random.normal(ks[5], (b, h, dk, dv))
    return q, k, v, log_g, beta, h0


def _pallas(chunk_size):
    def fast(q, k, v, log_g, beta, h0):
        return gated_delta_rule(q, k, v, log_g, beta, h0=h0, chunk_size=chunk_size, impl="pallas")

    return fast


def _reference(q, k, v, log_g, beta, h0):
    return gated_delta_rule_reference(q, k, v, log_g, beta, h0=h0)


@pytest.mark.parametrize(
    "shape,chunk_size,gates,per_channel,with_h0,block_v",
    [
        # A partial last chunk (t 37 = 2 chunks of 16 + 5), h0 given, one value tile.
        ((2, 37, 2, 16, 32), 16, "realistic", False, True, 64),
        # Shorter than a chunk; k 12 and v 20 padded to 16 and 32; exp(-20) gates next to ~1;
        # no h0 (zeros); the value axis over two tiles of 16.
        ((1, 10, 2, 12, 20), 16, "mixed", False, False, 16),
        # KDA: one gate per key channel (P formed in XLA), exp(-20) next to ~1, t 21 = 16 + 5.
        ((1, 21, 2, 16, 16), 16, "mixed", True, True, 64),
    ],
    ids=["t37-c16-h0", "t10-padded-mixed-gates-no-h0-two-tiles", "kda-t21-mixed-gates"],
)
def test_matches_reference(monkeypatch, shape, chunk_size, gates, per_channel, with_h0, block_v):
    monkeypatch.setattr(delta, "BLOCK_V", block_v)
    args = _inputs(*shape, gates=gates, per_channel=per_channel)
    if with_h0:
        fast, reference, names = _pallas(chunk_size), _reference, NAMES
    else:
        args, names, reference = args[:5], NAMES[:5], gated_delta_rule_reference

        def fast(q, k, v, log_g, beta):
            return gated_delta_rule(q, k, v, log_g, beta, chunk_size=chunk_size, impl="pallas")

    (o, S), _ = compare_with_reference(fast, reference, args, jit=True, names=names)
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32


def test_bfloat16_inputs():
    args = _inputs(1, 37, 2, 16, 16, seed=2)
    bf16 = tuple(x.astype(jnp.bfloat16) for x in args[:5]) + (args[5],)
    (o, S), grads = compare_with_reference(
        _pallas(16), _reference, bf16, dtype="bfloat16", jit=True, names=NAMES
    )
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert [g.dtype for g in grads] == [x.dtype for x in bf16]


def test_clear_errors():
    q, k, v, log_g, beta, _ = _inputs(1, 8, 2, 16, 16)
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="impl='pallas'.*segment_ids"):
        gated_delta_rule(q, k, v, log_g, beta, impl="pallas", segment_ids=ids)
    for bad in (24, 8):
        with pytest.raises(ValueError, match="impl='pallas' needs chunk_size to be a power"):
            gated_delta_rule(q, k, v, log_g, beta, impl="pallas", chunk_size=bad)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_lowers_for_gpu_through_triton(per_channel):
    # The forward kernel, then it and the backward's two (sequential state gradients, chunks in
    # parallel) appear as Triton calls.
    args = _inputs(1, 40, 2, 16, 32, per_channel=per_channel)
    fast = _pallas(16)
    text = _common.lower_for_gpu(fast, *args)
    assert text.count("__gpu$xla.gpu.triton") == 1 and "gated_delta_rule_fwd" in text

    def loss(*args):
        o, S = fast(*args)
        return o.sum() + S.sum()

    text = _common.lower_for_gpu(jax.grad(loss, argnums=tuple(range(6))), *args)
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert "gated_delta_rule_bwd_state" in text and "gated_delta_rule_bwd_chunks" in text


@pytest.mark.slow
def test_xla_recompute_backward(monkeypatch):
    # The first version's backward (recompute through the XLA chunked path), kept as a switch.
    monkeypatch.setattr(delta, "BACKWARD", "xla")
    compare_with_reference(_pallas(16), _reference, _inputs(2, 37, 2, 16, 32), jit=True)


@pytest.mark.slow
@pytest.mark.devices(2)
def test_sequence_sharded():
    # Time split over mesh.sequence = 2: the op's _sharded runs the kernel on each local slice
    # (with k extra value columns for the slice's transition) and equals the unsharded kernel.
    from tests.sequence.harness import compare_sharded

    compare_sharded(_pallas(16), _inputs(1, 32, 2, 16, 16), 2, names=NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_default_chunk(per_channel):
    # The op's default chunk of 64 with t 70 (one full chunk, one padded), k 32, v 16.
    def fast(q, k, v, log_g, beta, h0):
        return gated_delta_rule(q, k, v, log_g, beta, h0=h0, impl="pallas")

    args = _inputs(1, 70, 2, 32, 16, per_channel=per_channel, seed=3)
    compare_with_reference(fast, _reference, args, jit=True, names=NAMES)
