"""gated_linear_attention(impl="pallas") (effseq.ops.pallas.gla) against the reference scan.

The kernel runs in Pallas's interpret mode on a CPU (values, gradients through the custom VJP)
and is cross-lowered for the cuda platform through Triton (``lower_for_gpu``), which applies
Triton's block-shape and op rules without a GPU. Shapes are tiny: interpret mode is slow.
"""

import jax
import jax.numpy as jnp
import pytest

from effseq.ops.gla import gated_linear_attention, gated_linear_attention_reference
from effseq.ops.pallas import _common
from effseq.ops.pallas import gla as pallas_gla
from tests.ops.compare import compare_with_reference
from tests.tolerances import assert_close

NAMES = ("q", "k", "v", "log_g", "h0")


def _inputs(b, t, h, dk, dv, *, gates="realistic", seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    shape = (b, t, h, dk)
    if gates == "realistic":  # the GLA layer: logsigmoid(x W) / 16
        log_g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], shape)) / 16
    else:  # "mixed": exp(-20) and ~1 side by side, decays of ~1 right after tiny ones
        k1, k2 = jax.random.split(ks[3])
        tiny = -1e-4 * jax.random.uniform(k1, shape)
        log_g = jnp.where(jax.random.bernoulli(k2, 0.5, shape), -20.0, tiny)
    return (
        jax.random.normal(ks[0], shape),
        jax.random.normal(ks[1], shape),
        jax.random.normal(ks[2], (b, t, h, dv)),
        log_g,
        jax.random.normal(ks[4], (b, h, dk, dv)),
    )


def _pallas(chunk_size, scale=None):
    def fast(q, k, v, log_g, h0=None):
        return gated_linear_attention(
            q, k, v, log_g, h0=h0, scale=scale, chunk_size=chunk_size, impl="pallas"
        )

    return fast


def _reference(scale=None):
    def ref(q, k, v, log_g, h0=None):
        return gated_linear_attention_reference(q, k, v, log_g, h0=h0, scale=scale)

    return ref


# The fast set (CPU time, interpret mode) keeps one case of each kind: values, states and every
# gradient with padded t, k, v, mixed gates, two sub-chunks per chunk, two value tiles and a
# scale here; bfloat16, strong gates, errors and the cuda lowering (forward and grad) below.
slow = pytest.mark.slow


@pytest.mark.parametrize(
    "shape,chunk_size,gates,block_v,scale",
    [
        pytest.param((2, 40, 2, 16, 32), 16, "realistic", None, None, marks=slow),  # 3 chunks
        # 2 sub-chunks per chunk; k, v padded to 16, 32; v in two tiles of 16; a scale.
        ((1, 37, 2, 12, 20), 32, "mixed", 16, 0.3),
        pytest.param((1, 5, 2, 16, 16), 64, "mixed", None, None, marks=slow),  # one chunk of 16
        pytest.param((1, 70, 1, 48, 16), 64, "realistic", None, None, marks=slow),  # 4 sub-chunks
    ],
    ids=[
        "t40-c16",
        "t37-c32-padded-dims-mixed-gates-value-tiles-scale",
        "t5-c64-mixed-gates",
        "t70-c64-k48",
    ],
)
def test_matches_reference(shape, chunk_size, gates, block_v, scale, monkeypatch):
    if block_v is not None:
        monkeypatch.setattr(pallas_gla, "_BLOCK_V", block_v)
    args = _inputs(*shape, gates=gates)
    (o, S), _ = compare_with_reference(
        _pallas(chunk_size, scale), _reference(scale), args, jit=True, names=NAMES
    )
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32


@pytest.mark.slow
def test_without_h0_value_tiles_and_scale(monkeypatch):
    # No h0 (zeros, whose gradient is not asked for), the value axis split over two tiles,
    # a scale that is not the default.
    monkeypatch.setattr(pallas_gla, "_BLOCK_V", 16)
    args = _inputs(1, 20, 2, 16, 32, seed=1)[:4]
    compare_with_reference(_pallas(16, 0.3), _reference(0.3), args, jit=True, names=NAMES[:4])


@pytest.mark.slow
def test_xla_backward(monkeypatch):
    # The fallback backward (recompute through the XLA chunked path's VJP) agrees too.
    monkeypatch.setattr(pallas_gla, "BACKWARD", "xla")
    args = _inputs(1, 37, 2, 16, 16, seed=4)
    compare_with_reference(_pallas(32), _reference(), args, jit=True, names=NAMES)


def test_bfloat16_inputs():
    args = _inputs(1, 37, 2, 16, 16, seed=2)
    bf16 = tuple(x.astype(jnp.bfloat16) for x in args[:4]) + (args[4],)
    (o, S), grads = compare_with_reference(
        _pallas(32), _reference(), bf16, dtype="bfloat16", jit=True, names=NAMES
    )
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert [g.dtype for g in grads] == [x.dtype for x in bf16]


def test_strong_gates_values():
    # exp(-20) per step on every channel: every naive factor exp(-Lambda) would overflow.
    q, k, v, _, h0 = _inputs(1, 40, 2, 16, 16, seed=3)
    log_g = jnp.full(q.shape, -20.0)
    o, S = jax.jit(_pallas(32))(q, k, v, log_g, h0)
    o_ref, S_ref = _reference()(q, k, v, log_g, h0)
    assert_close(o, o_ref, err_msg="output")
    assert_close(S, S_ref, err_msg="state")


def test_errors():
    q, k, v, log_g, h0 = _inputs(1, 8, 2, 16, 16)
    with pytest.raises(ValueError, match="impl='pallas'.*segment_ids.*impl='chunked'"):
        gated_linear_attention(
            q, k, v, log_g, impl="pallas", segment_ids=jnp.zeros((1, 8), jnp.int32)
        )
    for bad in (24, 8):
        with pytest.raises(ValueError, match="impl='pallas' needs chunk_size to be a power of"):
            gated_linear_attention(q, k, v, log_g, chunk_size=bad, impl="pallas")


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=slow), jnp.bfloat16])
def test_lowers_for_gpu(dtype):
    q, k, v, log_g, h0 = _inputs(1, 40, 2, 32, 64)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    fast = _pallas(64)

    def loss(q, k, v, log_g, h0):
        o, S = fast(q, k, v, log_g, h0)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    args = (q, k, v, log_g, h0)
    text = _common.lower_for_gpu(fast, *args)
    assert "__gpu$xla.gpu.triton" in text and "gla_chunk_fwd" in text
    text = _common.lower_for_gpu(jax.grad(loss, argnums=range(5)), *args)
    # The forward kernel (writing the chunk states) and the backward kernel.
    assert text.count("__gpu$xla.gpu.triton") == 2 and "gla_chunk_bwd" in text


@pytest.mark.slow
def test_longer_sequence_default_gpu_chunk():
    # 5 chunks of 64 (4 sub-chunks each), k 64 in two key blocks, v 128 in two value tiles.
    args = _inputs(1, 300, 2, 64, 128, gates="mixed", seed=6)
    compare_with_reference(_pallas(64), _reference(), args, jit=True, names=NAMES)


@pytest.mark.slow
def test_sequence_sharded():
    # impl="pallas" on each local slice of the sequence-sharded path (2 shards of 24 steps).
    from tests.sequence.harness import compare_sharded

    args = _inputs(2, 48, 2, 16, 16, gates="mixed", seed=5)
    compare_sharded(_pallas(16), args, 2, names=NAMES)
