import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effseq import ops, sharding
from effseq.ops import (
    bidirectional_conv,
    bidirectional_conv_reference,
    causal_conv,
    causal_conv_reference,
    causal_conv_step,
    next_fast_len,
)
from tests.ops.compare import compare_with_reference
from tests.ops.test_packed_ops import Docs, T, check_vjp, packed_ids
from tests.tolerances import assert_close

# (t, l): t = 1, a prime t, kernels shorter than, equal to and longer than t. "direct" sums
# shifted inputs up to 16 taps and calls an XLA convolution beyond: (64, 10) and (16, 4) (the
# bidirectional kernels fitted to 16 taps) take the first path, (37, 37) and longer the second.
SHAPES = [(1, 1), (1, 5), (16, 4), (37, 37), (37, 100), (64, 10), (100, 250)]
IMPLS = ["fft", "direct"]
DTYPES = ["float32", "bfloat16"]
# Every shape under jit; eager (op-by-op) dispatch once, at the prime length.
CASES = [(i, d, s, True) for i in IMPLS for d in DTYPES for s in SHAPES] + [
    (i, d, (37, 37), False) for i in IMPLS for d in DTYPES
]


def _inputs(t, l, dtype, h=3, b=2, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    u = jax.random.normal(k1, (b, t, h)).astype(dtype)
    k = (jax.random.normal(k2, (h, l)) / np.sqrt(l)).astype(dtype)
    kb = (jax.random.normal(k3, (h, l)) / np.sqrt(l)).astype(dtype)
    return u, k, kb


@pytest.mark.parametrize("impl,dtype,shape,jit", CASES)
def test_causal_conv_matches_reference(impl, dtype, shape, jit):
    u, k, _ = _inputs(*shape, dtype)
    out, _ = compare_with_reference(
        lambda u, k: causal_conv(u, k, impl=impl),
        causal_conv_reference,
        (u, k),
        dtype,
        jit=jit,
        names=["u", "k"],
    )
    assert out.dtype == u.dtype and out.shape == u.shape


@pytest.mark.parametrize("impl,dtype,shape,jit", CASES)
def test_bidirectional_conv_matches_reference(impl, dtype, shape, jit):
    u, k, kb = _inputs(*shape, dtype)
    out, _ = compare_with_reference(
        lambda u, k, kb: bidirectional_conv(u, k, kb, impl=impl),
        bidirectional_conv_reference,
        (u, k, kb),
        dtype,
        jit=jit,
        names=["u", "k_fwd", "k_bwd"],
    )
    assert out.dtype == u.dtype and out.shape == u.shape


def test_bidirectional_counts_the_present_once():
    # A delta input at position p: the output at p is k_fwd[0] alone; at p - 1 - s it is k_bwd[s].
    t, p = 9, 4
    u = jnp.zeros((1, t, 1)).at[0, p, 0].set(1.0)
    kf = jnp.arange(1.0, t + 1)[None]
    kb = -jnp.arange(1.0, t + 1)[None]
    y = np.asarray(bidirectional_conv(u, kf, kb, impl="fft"))[0, :, 0]
    expected = np.zeros(t)
    expected[p:] = np.arange(1.0, t - p + 1)
    expected[:p] = -np.arange(p, 0, -1)
    assert_close(y, expected)


def _future_jacobian(impl, t=23, l=23):
    u, k, _ = _inputs(t, l, "float32")
    jac = jax.jacrev(lambda u: causal_conv(u, k, impl=impl)[0, :, 0])(u)[:, 0, :, 0]  # (t, t)
    return np.asarray(jac)


# Kernel lengths on both sides of the shifted-sum / XLA-convolution switch at 16 taps.
@pytest.mark.parametrize("l", [4, 16, 17, 23])
def test_direct_conv_is_exactly_causal(l):
    jac = _future_jacobian("direct", l=l)
    assert np.all(np.triu(jac, 1) == 0)
    # Lags 0..l-1 are all non-zero (the random kernel has no zero tap), later lags exactly 0.
    lag = np.arange(23)[:, None] - np.arange(23)[None, :]
    assert np.all(jac[(lag >= 0) & (lag < l)] != 0)
    assert np.all(jac[lag >= l] == 0)


def test_fft_conv_is_causal_up_to_roundoff():
    # An FFT mixes every position through its rounding errors, so the anticausal part of the
    # Jacobian is float32 roundoff rather than exactly zero: a few ulps of the largest entry.
    jac = _future_jacobian("fft")
    scale = np.abs(np.tril(jac)).max()
    assert np.abs(np.triu(jac, 1)).max() <= 16 * np.finfo(np.float32).eps * scale


# (mesh sizes (data, fsdp, tensor), u's spec, the kernels' spec). Channels sharded over all 8
# devices, and batch and channels sharded together, as the fsdp_tp preset does.
CHANNELS = ("fsdp", "tensor")
SHARDED = [
    ((1, 8, 1), P(None, None, CHANNELS), P(CHANNELS, None)),
    ((2, 2, 2), P("data", None, CHANNELS), P(CHANNELS, None)),
]
SHARDED_OPS = {
    "causal": lambda u, k, kb: causal_conv(u, k, impl="fft"),
    "bidirectional": lambda u, k, kb: bidirectional_conv(u, k, kb, impl="fft"),
}


@pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: the fake CPU devices of tests/conftest.py (one GPU has 1)",
)
@pytest.mark.parametrize("op", list(SHARDED_OPS))
@pytest.mark.parametrize("mesh_shape,u_spec,k_spec", SHARDED)
def test_fft_conv_with_sharded_channels_matches_unsharded(op, mesh_shape, u_spec, k_spec):
    # With the FFT operand in rank 3, XLA:CPU failed at run time (fft_thunk.cc RET_CHECK
    # IsMonotonicWithDim0Major) on the jitted forward of exactly these placements.
    fn = SHARDED_OPS[op]
    u, k, kb = _inputs(16, 16, "float32", h=16)
    cotangent = jax.random.normal(jax.random.key(1), u.shape)

    def grads(u, k, kb):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2))(u, k, kb)

    mesh = sharding.make_mesh(*mesh_shape)
    placed = [
        jax.device_put(x, NamedSharding(mesh, spec))
        for x, spec in [(u, u_spec), (k, k_spec), (kb, k_spec)]
    ]
    assert placed[0].sharding.shard_shape(u.shape)[2] < u.shape[2]  # channels really are split
    assert_close(jax.jit(fn)(*placed), jax.jit(fn)(u, k, kb))
    expected = jax.jit(grads)(u, k, kb)
    for name, got, want in zip(["u", "k", "kb"], jax.jit(grads)(*placed), expected, strict=True):
        assert_close(got, want, kind="grad", err_msg=f"d/d{name}")


def test_next_fast_len_is_the_smallest_7_smooth_size():
    def smooth(m):
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 1100):
        m = next_fast_len(n)
        assert m >= n and smooth(m), n
        assert not any(smooth(x) for x in range(n, m)), n


@pytest.mark.parametrize(
    "args,match",
    [
        ((jnp.zeros((4, 3)), jnp.zeros((3, 5))), r"`u` must have rank 3 \(b, t, h\)"),
        ((jnp.zeros((2, 4, 3)), jnp.zeros((3, 5, 1))), r"`k` must have rank 2"),
        ((jnp.zeros((2, 4, 3)), jnp.zeros((4, 5))), r"dimension 'h' must agree.*`u` \(2, 4, 3\)"),
        ((jnp.zeros((2, 4, 3), jnp.complex64), jnp.zeros((3, 5))), r"`u` must be real"),
        ((jnp.zeros((2, 4, 3), jnp.int32), jnp.zeros((3, 5))), r"`u` must be a floating"),
    ],
)
def test_causal_conv_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        causal_conv(*args)


def test_bad_impl_lists_choices():
    with pytest.raises(ValueError, match="unknown impl='fast'; choose one of fft, direct"):
        causal_conv(jnp.zeros((1, 4, 2)), jnp.zeros((2, 3)), impl="fast")


def test_bidirectional_rejects_mismatched_backward_kernel():
    with pytest.raises(ValueError, match="`k_bwd`"):
        bidirectional_conv(jnp.zeros((1, 4, 2)), jnp.zeros((2, 3)), jnp.zeros((3, 3)))


@pytest.mark.parametrize("l", [2, 4, 7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_causal_conv_step_walks_the_convolution(l, dtype):
    # Token by token from a zero window equals the whole-sequence convolution, also for
    # sequences shorter than the kernel (t = 3 < 4, 7).
    t, b, h = 9, 2, 5
    ku, kk = jax.random.split(jax.random.key(l))
    u = jax.random.normal(ku, (b, t, h)).astype(dtype)
    k = jax.random.normal(kk, (h, l)).astype(dtype)
    want = causal_conv_reference(u.astype(jnp.float32), k.astype(jnp.float32))
    window = jnp.zeros((b, l - 1, h), jnp.float32)
    outs = []
    for i in range(t):
        y, window = causal_conv_step(window, u[:, i], k)
        assert y.dtype == dtype and window.dtype == jnp.float32
        outs.append(y)
    assert_close(jnp.stack(outs, 1), want, dtype=jnp.dtype(dtype).name)
    np.testing.assert_array_equal(np.asarray(window), np.asarray(u[:, t - l + 1 :], np.float32))


def test_causal_conv_step_rejects_a_window_of_the_wrong_length():
    with pytest.raises(ValueError, match="`window` holds 2 inputs; a kernel of 4 taps needs 3"):
        causal_conv_step(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3)), jnp.zeros((3, 4)))


# ------------------------------------------------ packed rows: causal / bidirectional conv


def _conv_inputs(l_fwd, l_bwd=None, t=T, h=3):
    k = jax.random.split(jax.random.key(2), 3)
    u = jax.random.normal(k[0], (2, t, h))
    kf = jax.random.normal(k[1], (h, l_fwd)) / np.sqrt(l_fwd)
    kb = None if l_bwd is None else jax.random.normal(k[2], (h, l_bwd)) / np.sqrt(l_bwd)
    return u, kf, kb


def _set_conv_block(monkeypatch, block):
    """The masked Toeplitz form in one block (64 > t = 37) or in blocks of 8 (documents start
    inside blocks and on a block boundary, and reach back over several blocks)."""
    from effseq.ops import fftconv

    monkeypatch.setattr(fftconv, "_CONV_BLOCK", block)


# (impl, kernel length, block): the short-conv tap path, and the masked Toeplitz form for long
# kernels whatever impl says (kernels shorter than, equal to and longer than t).
CONV_CASES = [("direct", 4, 64), ("fft", 4, 8), ("fft", T, 8), ("direct", 50, 64)]


@pytest.mark.parametrize("impl,l,block", CONV_CASES)
def test_causal_conv_packed_equals_documents_alone(monkeypatch, impl, l, block):
    _set_conv_block(monkeypatch, block)
    u, kf, _ = _conv_inputs(l)
    seg = packed_ids()
    docs = Docs()

    def packed(u, k):
        return ops.causal_conv(u, k, impl=impl, segment_ids=seg)

    def alone(u, k):
        # Zeros after each document add nothing to a causal convolution.
        return docs.packed(ops.causal_conv(docs.rows(u), k, impl="direct"))

    check_vjp(packed, alone, (u, kf), ["u", "k"])


@pytest.mark.parametrize("impl,l,block", CONV_CASES)
def test_bidirectional_conv_packed_equals_documents_alone(monkeypatch, impl, l, block):
    _set_conv_block(monkeypatch, block)
    u, kf, kb = _conv_inputs(l, max(l - 1, 3))
    seg = packed_ids()
    docs = Docs()

    def packed(u, kf, kb):
        return ops.bidirectional_conv(u, kf, kb, impl=impl, segment_ids=seg)

    def alone(u, kf, kb):
        # Zeros after each document add nothing to either half.
        return docs.packed(ops.bidirectional_conv(docs.rows(u), kf, kb, impl="direct"))

    check_vjp(packed, alone, (u, kf, kb), ["u", "k_fwd", "k_bwd"])


@pytest.mark.parametrize("impl,l", [("direct", 4), ("fft", T)])
def test_convs_packed_match_reference(monkeypatch, impl, l):
    _set_conv_block(monkeypatch, 8)
    u, kf, kb = _conv_inputs(l, l)
    seg = packed_ids()
    check_vjp(
        lambda u, k: ops.causal_conv(u, k, impl=impl, segment_ids=seg),
        lambda u, k: ops.causal_conv_reference(u, k, segment_ids=seg),
        (u, kf),
        ["u", "k"],
    )
    check_vjp(
        lambda u, kf, kb: ops.bidirectional_conv(u, kf, kb, impl=impl, segment_ids=seg),
        lambda u, kf, kb: ops.bidirectional_conv_reference(u, kf, kb, segment_ids=seg),
        (u, kf, kb),
        ["u", "k_fwd", "k_bwd"],
    )


def test_packed_conv_with_one_document_is_the_plain_conv():
    u, kf, kb = _conv_inputs(T, T)
    seg = jnp.ones((2, T), jnp.int32)
    packed = jax.jit(lambda u, kf, kb: ops.bidirectional_conv(u, kf, kb, segment_ids=seg))
    assert_close(packed(u, kf, kb), ops.bidirectional_conv(u, kf, kb))


def test_convs_reject_bad_segment_ids():
    u, kf, kb = _conv_inputs(4, 4)
    bad = packed_ids()[:, :-1]
    for call in (
        lambda: ops.causal_conv(u, kf, segment_ids=bad),
        lambda: ops.causal_conv_reference(u, kf, segment_ids=bad),
        lambda: ops.bidirectional_conv(u, kf, kb, segment_ids=bad),
        lambda: ops.bidirectional_conv_reference(u, kf, kb, segment_ids=bad),
    ):
        with pytest.raises(ValueError, match="segment_ids"):
            call()
