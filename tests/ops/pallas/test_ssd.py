"""``ssd(..., impl="pallas")``: the Pallas kernel of Mamba-2's SSD (interpret mode on a CPU)
against the step-by-step reference on values, final states and every input's gradient, its
errors, its sequence-sharded form, and its lowering for a GPU through Triton."""

import functools

import jax
import jax.numpy as jnp
import pytest

from effseq.ops.pallas._common import lower_for_gpu
from effseq.ops.ssd import ssd, ssd_reference
from tests.ops.compare import compare_with_reference
from tests.sequence.harness import compare_sharded
from tests.tolerances import assert_close

TRITON_CALL = "__gpu$xla.gpu.triton"


def _inputs(t, *, b=2, h=2, p=16, n=16, g=1, dtype=jnp.float32, seed=0, decay="realistic"):
    """(x, dt, A, B, C, D, h0) as a Mamba-2 layer produces them; x, B, C in ``dtype``."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    x = jax.random.normal(ks[0], (b, t, h, p))
    if decay == "realistic":  # softplus(dt + bias), A = -exp(A_log) in [-16, -1]
        dt = jax.nn.softplus(jax.random.normal(ks[5], (b, t, h)) - 2.0)
        A = -jax.random.uniform(ks[6], (h,), minval=1.0, maxval=16.0)
    else:  # mixed: dt A = -20 and ~0 side by side (decays near 1 right after tiny ones)
        strong = jax.random.bernoulli(ks[5], 0.5, (b, t, h))
        dt = jnp.where(strong, 20.0, 1e-5 * jax.random.uniform(ks[6], (b, t, h)))
        A = -jnp.ones((h,))
        x = x / 20
    B = jax.random.normal(ks[1], (b, t, g, n))
    C = jax.random.normal(ks[2], (b, t, g, n))
    D = jax.random.normal(ks[3], (h,))
    h0 = jax.random.normal(ks[4], (b, h, p, n))
    x, B, C = (z.astype(dtype) for z in (x, B, C))
    return x, dt, A, B, C, D, h0


def _fns(chunk_size, with_D=True, with_h0=True):
    """(pallas, reference) taking the positional inputs that are present."""

    def wrap(op, **kw):
        def fn(x, dt, A, B, C, *rest):
            rest = list(rest)
            D = rest.pop(0) if with_D else None
            h0 = rest.pop(0) if with_h0 else None
            return op(x, dt, A, B, C, D, h0=h0, **kw)

        return fn

    return wrap(ssd, chunk_size=chunk_size, impl="pallas"), wrap(ssd_reference)


def _check(t, chunk_size, *, with_D=True, with_h0=True, dtype="float32", plain=False, **shape):
    """Values, h_last and every input's gradient against the reference; the values come from
    the training form (under jax.vjp), and with ``plain`` also from a call without gradients
    (the fused inference kernel)."""
    x, dt, A, B, C, D, h0 = _inputs(t, dtype=jnp.dtype(dtype), **shape)
    args, names = [x, dt, A, B, C], ["x", "dt", "A", "B", "C"]
    if with_D:
        args, names = [*args, D], [*names, "D"]
    if with_h0:
        args, names = [*args, h0], [*names, "h0"]
    fast, ref = _fns(chunk_size, with_D, with_h0)
    (y, H), _ = compare_with_reference(fast, ref, args, dtype, jit=True, names=names)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert H.dtype == jnp.float32 and H.shape == h0.shape
    if plain:
        y_ref, H_ref = ref(*args)
        y, H = jax.jit(fast)(*args)
        assert_close(y, y_ref, dtype, err_msg="y without gradients")
        assert_close(H, H_ref, dtype, err_msg="h_last without gradients")


# The fast set: one float32 case and one bfloat16 case between them cover values (both
# forward forms), h_last and every input's gradient, padding of t, p and n, groups, with and
# without D and h0, and strong decays; the slow set repeats them on other shapes.


def test_matches_reference():
    # 3 chunks, the last partial (t 37 -> 48); p = 8 padded to 16, n = 20 to 32; 4 heads on
    # 2 groups; D and h0; dt A = -20 beside ~0 (the in-kernel segment sums must not be
    # differences of running sums); values also from the fused inference kernel.
    _check(37, 16, h=4, p=8, n=20, g=2, decay="mixed", seed=2, plain=True)


def test_bfloat16_matches_float32_reference():
    # t shorter than one chunk (one chunk of 16); no D, no h0.
    _check(5, 64, with_D=False, with_h0=False, dtype="bfloat16", g=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "t,chunk_size,shape,with_D",
    [
        # 3 chunks, the last partial; p = 8 padded to 16; both heads on one group.
        (37, 16, dict(p=8, g=1), True),
        # t shorter than one chunk; n = 20 padded to 32; 4 heads on 2 groups; no D, no h0.
        (5, 64, dict(h=4, n=20, g=2), False),
    ],
)
def test_matches_reference_more_shapes(t, chunk_size, shape, with_D):
    _check(t, chunk_size, with_D=with_D, with_h0=with_D, plain=True, **shape)


@pytest.mark.slow
def test_bfloat16_several_chunks():
    _check(37, 16, dtype="bfloat16", g=1)


def test_mixed_input_dtypes_keep_x_dtype():
    x, dt, A, B, C, D, h0 = _inputs(5, dtype=jnp.bfloat16)
    fast = functools.partial(ssd, chunk_size=16, impl="pallas")
    y, H = jax.eval_shape(fast, x, dt, A, B.astype(jnp.float32), C, D, h0=h0)
    assert y.dtype == jnp.bfloat16 and H.dtype == jnp.float32


@pytest.mark.slow
def test_strong_decay_is_exact():
    # dt A = -20 beside ~0: the in-kernel segment sums must not be differences of running sums.
    _check(40, 16, decay="mixed", g=2, seed=2, plain=True)


@pytest.mark.slow
@pytest.mark.devices(2)
def test_sequence_sharded_matches_unsharded():
    x, dt, A, B, C, D, h0 = _inputs(32, b=1, p=8, g=1, seed=4)
    fast, _ = _fns(16)
    compare_sharded(fast, (x, dt, A, B, C, D, h0), 2)


def test_segment_ids_raise():
    x, dt, A, B, C, D, h0 = _inputs(5, dtype=jnp.bfloat16)  # shapes seen before: no compiles
    ids = jnp.zeros(x.shape[:2], jnp.int32)
    with pytest.raises(ValueError, match=r"ssd: impl='pallas'.*segment_ids.*impl='chunked'"):
        ssd(x, dt, A, B, C, D, impl="pallas", segment_ids=ids)


@pytest.mark.parametrize("chunk_size", [24, 8])
def test_bad_chunk_size_raises(chunk_size):
    x, dt, A, B, C, D, h0 = _inputs(5, dtype=jnp.bfloat16)  # shapes seen before: no compiles
    with pytest.raises(ValueError, match="impl='pallas' needs chunk_size to be a power of two"):
        ssd(x, dt, A, B, C, D, impl="pallas", chunk_size=chunk_size)


@pytest.mark.parametrize(
    "dtype,with_D",
    [("bfloat16", True), pytest.param("float32", False, marks=pytest.mark.slow)],
)
def test_lowers_for_gpu_through_triton(dtype, with_D):
    x, dt, A, B, C, D, h0 = _inputs(37, h=4, p=8, n=20, g=2, dtype=jnp.dtype(dtype))
    args = (x, dt, A, B, C, D, h0) if with_D else (x, dt, A, B, C, h0)
    fast, _ = _fns(16, with_D)
    text = lower_for_gpu(fast, *args)
    assert text.count(TRITON_CALL) == 1 and "ssd_fused_chunk_fwd" in text

    def loss(*a):
        y, H = fast(*a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(H)

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    text = lower_for_gpu(grad, *args)
    # Four kernels: the training forward's two (states, then chunks) and the backward's two.
    assert text.count(TRITON_CALL) == 4
    for name in ("ssd_fwd_states", "ssd_fwd_chunks", "ssd_bwd_states", "ssd_bwd_chunks"):
        assert name in text


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_larger_shapes_match_reference(chunk_size):
    # Two p tiles (p = 128 over tiles of 64), several chunks, 4 heads on 2 groups.
    _check(150, chunk_size, b=1, h=4, p=128, n=32, g=2, seed=5)
