"""Sequence parallelism of the depthwise convolutions (``causal_conv``, ``bidirectional_conv``):
with time split over the mesh axis ``sequence``, outputs and the gradients w.r.t. the input and
every kernel equal the unsharded op's. The kernels enter every shard whole, so their gradients
are the sum over shards that the shard_map transpose forms: these checks are what verify it.

Kernels that reach at most one shard's slice go through a halo (from the left, and from the
right for the backward kernel); longer ones through the all-to-all to channel sharding. Packed
layouts put a document start inside a shard, one exactly on a shard edge, a one-token document
starting on an edge and one ending on an edge. The fast tests cover each exchange once (sequence
= 2, 4 and 8, one with data = 2 and batch-sharded inputs, both kernels exactly at the threshold
once); the whole matrix (both impls, every shard count, kernels below, at, just past and far
past the threshold, packed or not) is marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops.fftconv import bidirectional_conv, causal_conv
from tests.sequence.harness import compare_sharded, mesh
from tests.tolerances import assert_close

# Built for 8 (fake CPU) devices; skipped where fewer are visible (one GPU).
pytestmark = pytest.mark.devices(8)

B = 2


def _ids(t, n):
    """(B, t) ids for shards of L = t / n steps (L >= 2). Row 0: a start inside shard 0 (1), a
    one-token document starting on the first edge (L), a start inside shard 1 (L + 1 + ...);
    later shards carry its last document through. Row 1: a one-token document ending on the
    first edge (L - 1), starts on the first and last edges, a one-token last document (t - 1);
    ids alternate between two values, so equal ids in different documents stay apart."""
    L = t // n
    rows = ([0, 1, L, L + 1, min(L + 3, 2 * L - 1)], [0, L - 1, L, (n - 1) * L, t - 1])
    ids = np.zeros((B, t), np.int32)
    for r, starts in enumerate(rows):
        for i, s in enumerate(sorted(set(starts))):
            ids[r, s:] = 1 + i % 2
    return jnp.asarray(ids)


def _inputs(t, h, l_fwd, l_bwd, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(ks[0], (B, t, h)),
        jax.random.normal(ks[1], (h, l_fwd)) / np.sqrt(l_fwd),
        jax.random.normal(ks[2], (h, l_bwd)) / np.sqrt(l_bwd),
    )


def _convs(impl, seg):
    """Both ops in one program (one compile per check): the causal one with the forward kernel."""

    def fn(u, kf, kb):
        return (
            causal_conv(u, kf, impl=impl, segment_ids=seg),
            bidirectional_conv(u, kf, kb, impl=impl, segment_ids=seg),
        )

    return fn


def _check(impl, n, t, h, l_fwd, l_bwd, packed, data=1):
    seg = _ids(t, n) if packed else None
    compare_sharded(
        _convs(impl, seg),
        _inputs(t, h, l_fwd, l_bwd),
        n,
        data=data,
        names=["u", "k_fwd", "k_bwd"],
        kind="grad",
        batch=(0,) if data > 1 else (),
    )


def _collectives(fn, args, n):
    with jax.set_mesh(mesh(n)):
        text = str(jax.make_jaxpr(fn)(*args))
    return {c for c in ("ppermute", "all_to_all", "all_gather") if c in text}


# ---- fast -----------------------------------------------------------------------------------


def test_short_kernels_halo_with_batch_sharding():
    """sequence = 2 x data = 2, FFT, short kernels: halos from both sides."""
    _check("fft", n=2, t=16, h=4, l_fwd=4, l_bwd=4, packed=False, data=2)


def test_short_kernels_packed_at_the_threshold():
    """sequence = 4 (L = 4), direct, packed: k_fwd of L + 1 taps and k_bwd of L (lags 1..L)
    both reach exactly one neighbour's whole slice, so the halos carry document starts (and
    one-token documents) that sit on the shard edges."""
    _check("direct", n=4, t=16, h=4, l_fwd=5, l_bwd=4, packed=True)


def test_long_kernels_all_to_all_packed():
    """sequence = 8 (L = 2), FFT-length kernels (l = t), packed: all-to-all to channels, the
    gathered ids, the masked Toeplitz form on each shard's h / 8 channels."""
    _check("fft", n=8, t=16, h=8, l_fwd=16, l_bwd=16, packed=True)


def test_the_threshold_picks_the_exchange():
    """Reach <= t / n: halos only; one step more: the all-to-all (and the ids' all-gather)."""
    t, n, h = 16, 4, 4
    seg = _ids(t, n)
    at = _inputs(t, h, 5, 4)  # forward reach 4, backward reach 4 = t / n
    past_fwd = _inputs(t, h, 6, 4)
    past_bwd = _inputs(t, h, 5, 5)
    assert _collectives(_convs("fft", None), at, n) == {"ppermute"}
    assert _collectives(_convs("direct", seg), at, n) == {"ppermute"}
    assert _collectives(_convs("fft", seg), past_fwd, n) == {"all_to_all", "all_gather"}
    bidi = lambda u, kf, kb: bidirectional_conv(u, kf, kb)  # noqa: E731
    assert _collectives(bidi, past_bwd, n) == {"all_to_all"}


def test_sharded_convs_reject_shapes_that_do_not_split():
    u, kf, kb = _inputs(16, 4, 16, 16)
    with jax.set_mesh(mesh(8)):
        # Kernels past the threshold need h divisible by the shard count.
        with pytest.raises(ValueError, match=r"causal_conv: .*h = 4 .*mesh.sequence = 8"):
            causal_conv(u, kf)
        with pytest.raises(ValueError, match=r"bidirectional_conv: .*h = 4 .*mesh.sequence = 8"):
            bidirectional_conv(u, kf, kb)
    u_odd = jnp.zeros((B, 18, 4))
    with jax.set_mesh(mesh(4)):
        with pytest.raises(ValueError, match=r"causal_conv: sequence length 18 .* = 4"):
            causal_conv(u_odd, kf[:, :4])
        with pytest.raises(ValueError, match=r"bidirectional_conv: sequence length 18"):
            bidirectional_conv(u_odd, kf[:, :4], kb[:, :4])


def test_without_a_sequence_axis_nothing_is_sharded():
    """No mesh, or a mesh whose sequence axis is 1: the plain op, no shard_map, no collective."""
    args = _inputs(16, 4, 4, 16)
    seg = _ids(16, 2)
    for fn in (_convs("fft", None), _convs("direct", seg)):
        plain = str(jax.make_jaxpr(fn)(*args))
        with jax.set_mesh(mesh(1, data=2)):
            under_mesh = str(jax.make_jaxpr(fn)(*args))
        for text in (plain, under_mesh):
            assert "shard_map" not in text and "ppermute" not in text and "all_to_all" not in text


# ---- slow: the whole matrix -----------------------------------------------------------------

T, H = 32, 8


def _kernel_cases():
    for n in (2, 4, 8):
        L = T // n
        # below, exactly at (fwd reach L, bwd reach L), just past, and sequence-long kernels
        for name, (lf, lb) in {
            "short": (4, 3),
            "at": (L + 1, L),
            "past": (L + 2, L + 1),
            "long": (T, T),
        }.items():
            yield pytest.param(n, lf, lb, id=f"n{n}-{name}")


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("impl", ["fft", "direct"])
@pytest.mark.parametrize("n,l_fwd,l_bwd", list(_kernel_cases()))
def test_matrix(n, l_fwd, l_bwd, impl, packed):
    _check(impl, n=n, t=T, h=H, l_fwd=l_fwd, l_bwd=l_bwd, packed=packed)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["fft", "direct"])
@pytest.mark.parametrize("l", [4, T])
def test_with_data_parallel(impl, l):
    _check(impl, n=4, t=T, h=H, l_fwd=l, l_bwd=l, packed=True, data=2)


@pytest.mark.slow
def test_bfloat16_inputs_follow_the_unsharded_dtype():
    """bfloat16 in, bfloat16 out, the same values: both forms accumulate in float32 and round
    once at the end."""
    u, kf, kb = (x.astype(jnp.bfloat16) for x in _inputs(T, H, 4, T))
    fn = jax.jit(_convs("fft", None))
    ref = fn(u, kf, kb)
    with jax.set_mesh(mesh(4)):
        out = fn(u, kf, kb)
    for a, r in zip(out, ref, strict=True):
        assert a.dtype == jnp.bfloat16
        assert_close(a, r, dtype="bfloat16")
