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


# The fast set: one case per gate kind, each as small as still covers its checks (interpret
# mode's cost is per grid program and per traced op); the larger ones are slow-marked.
FAST = [
    # Per head: a partial last chunk (t 21 = 16 + 5), k 12 and v 20 padded to 16 and 32, the
    # value axis over two tiles of 16, exp(-20) gates next to ~1, h0 given.
    pytest.param((1, 21, 1, 12, 20), 16, "mixed", False, True, 16, id="gdn-t21-padded-two-tiles"),
]
SLOW = [
    # KDA in float32 (the fast set has it in bf16): one gate per key channel (P formed in
    # XLA), two heads, exp(-20) next to ~1.
    pytest.param(
        (1, 21, 2, 16, 16),
        16,
        "mixed",
        True,
        True,
        64,
        id="kda-t21-mixed-gates",
        marks=pytest.mark.slow,
    ),
    # Two rows and heads, realistic gates; two value tiles in the sequential kernels, one in
    # the chunk kernel.
    pytest.param(
        (2, 37, 2, 16, 32),
        16,
        "realistic",
        False,
        True,
        (16, 32),
        id="t37-c16-h0-tiles-16-32",
        marks=pytest.mark.slow,
    ),
    # Shorter than a chunk, no h0 (zeros).
    pytest.param(
        (1, 10, 2, 12, 20),
        16,
        "mixed",
        False,
        False,
        16,
        id="t10-padded-mixed-gates-no-h0-two-tiles",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("shape,chunk_size,gates,per_channel,with_h0,block_v", FAST + SLOW)
def test_matches_reference(monkeypatch, shape, chunk_size, gates, per_channel, with_h0, block_v):
    # block_v: both kernels' value tile, or (the sequential kernels', the chunk kernel's).
    seq_tile, chunk_tile = block_v if isinstance(block_v, tuple) else (block_v, block_v)
    monkeypatch.setattr(delta, "BLOCK_V", seq_tile)
    monkeypatch.setattr(delta, "BLOCK_V_CHUNKS", chunk_tile)
    args = _inputs(*shape, gates=gates, per_channel=per_channel)
    if with_h0:
        fast, reference, names = _pallas(chunk_size), _reference, NAMES
    else:
        args, names, reference = args[:5], NAMES[:5], gated_delta_rule_reference

        def fast(q, k, v, log_g, beta):
            return gated_delta_rule(q, k, v, log_g, beta, chunk_size=chunk_size, impl="pallas")

    (o, S), _ = compare_with_reference(fast, reference, args, jit=True, names=names)
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32


@pytest.mark.parametrize(
    "per_channel",
    [pytest.param(False, id="gdn", marks=pytest.mark.slow), pytest.param(True, id="kda")],
)
def test_bfloat16_inputs(per_channel):
    # bf16 q, k, v, log_g, beta (per head, the products of q / k with float32 tiles run as
    # split bf16 products, delta._dot). The fast set's KDA case: one gate per key channel (P
    # formed in XLA), two heads, a partial last chunk, exp(-20) gates next to ~1.
    args = _inputs(1, 21, 2, 16, 16, gates="mixed", per_channel=per_channel, seed=2)
    bf16 = tuple(x.astype(jnp.bfloat16) for x in args[:5]) + (args[5],)
    (o, S), grads = compare_with_reference(
        _pallas(16), _reference, bf16, dtype="bfloat16", jit=True, names=NAMES
    )
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert [g.dtype for g in grads] == [x.dtype for x in bf16]


@pytest.mark.parametrize("precision,terms,bound", [("highest", 3, 1e-6), ("default", 2, 2.0**-15)])
def test_split_bf16_products(precision, terms, bound):
    # delta._dot: a bf16 tile times a float32 one as `terms` bf16 products; against the float32
    # product (numpy, float64) the error is <= 2^-16 relative per entry of the f32 operand
    # with two terms, float32 rounding with three.
    import numpy as np

    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((64, 16)) * np.logspace(-6, 6, 16), jnp.float32)
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    scale = np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64))
    with jax.default_matmul_precision(precision):
        assert delta._split_terms() == terms
        for got in (delta._dot(a, b), delta._dot(b, a, trans_a=True, trans_b=True).T):
            assert got.dtype == jnp.float32
            assert np.max(np.abs(np.asarray(got, np.float64) - want) / scale) <= bound


def test_clear_errors():
    q = k = v = jnp.zeros((1, 8, 2, 16))
    log_g = beta = jnp.zeros((1, 8, 2))
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="impl='pallas'.*segment_ids"):
        gated_delta_rule(q, k, v, log_g, beta, impl="pallas", segment_ids=ids)
    for bad in (24, 8):
        with pytest.raises(ValueError, match="impl='pallas' needs chunk_size to be a power"):
            gated_delta_rule(q, k, v, log_g, beta, impl="pallas", chunk_size=bad)


def test_lowers_for_gpu_through_triton():
    # One program (one lowering: each clears JAX's caches and retraces): per head the forward
    # alone (one Triton call, the forward kernel) and under grad (the forward kernel saving
    # states and the backward's two: sequential state gradients, chunks in parallel), per key
    # channel under grad. 1 + 3 + 3 Triton calls.
    def loss(*args):
        o, S = _pallas(16)(*args)
        return o.sum() + S.sum()

    grad = jax.grad(loss, argnums=tuple(range(6)))

    def program(gdn, kda):
        return _pallas(16)(*gdn), grad(*gdn), grad(*kda)

    gdn, kda = _inputs(1, 40, 2, 16, 32), _inputs(1, 40, 2, 16, 32, per_channel=True)
    text = _common.lower_for_gpu(program, gdn, kda)
    assert text.count("__gpu$xla.gpu.triton") == 7
    for name, count in (("fwd", 3), ("bwd_state", 2), ("bwd_chunks", 2)):
        assert text.count(f'name = "gated_delta_rule_{name}"') == count, name


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
