"""Sequence parallelism of the chunked linear-recurrence ops (GLA, SSD, the gated delta rule
with per-head and per-key-channel gates): with time split over the mesh axis ``sequence``,
outputs, final states and the gradient of every input (h0 and the parameters included) equal
the unsharded op's.

Packed layouts put document starts inside a shard, exactly on a shard edge, a one-token document
starting on an edge and one ending on an edge. The fast tests cover each op once (sequence = 2,
4 and 8, one with data = 2 and batch-sharded inputs); the whole matrix (every impl, shard count,
gate shape, chunk that does or does not divide the local length) is marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops.delta_rule import gated_delta_rule
from effseq.ops.gla import gated_linear_attention
from effseq.ops.ssd import ssd
from tests.sequence.harness import compare_sharded, mesh

# Built for 8 (fake CPU) devices; skipped where fewer are visible (one GPU).
pytestmark = pytest.mark.devices(8)

B, H, DK, DV = 2, 2, 4, 6
SSD_H, SSD_P, SSD_N, SSD_G = 4, 4, 8, 2


def _ids(t, n):
    """(B, t) ids for shards of L = t / n steps. Row 0: a start inside shard 0 (3), a one-token
    document starting on the first edge (L), a start inside shard 1 (L + 5); later shards carry
    its last document through. Row 1: a one-token document ending on the first edge (L - 1),
    starts on the first and last edges, a one-token last document (t - 1)."""
    L = t // n
    rows = ([0, 3, L, L + 1, L + 5], [0, L - 1, L, (n - 1) * L, t - 1])
    ids = np.zeros((B, t), np.int32)
    for r, starts in enumerate(rows):
        for i, s in enumerate(sorted(set(starts))):
            ids[r, s:] = 1 + i % 2
    return jnp.asarray(ids)


def _gla_inputs(t, gates, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    shape = (B, t, H, DK)
    if gates == "realistic":
        log_g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], shape)) / 16
    else:  # mixed: -20 and ~0 side by side
        tiny = -1e-4 * jax.random.uniform(ks[3], shape)
        log_g = jnp.where(jax.random.bernoulli(ks[4], 0.5, shape), -20.0, tiny)
    return (
        jax.random.normal(ks[0], shape),
        jax.random.normal(ks[1], shape),
        jax.random.normal(ks[2], (B, t, H, DV)),
        log_g,
        jax.random.normal(ks[5], (B, H, DK, DV)),
    )


def _gla(impl, chunk, seg):
    def fn(q, k, v, log_g, h0):
        return gated_linear_attention(
            q, k, v, log_g, h0=h0, chunk_size=chunk, impl=impl, segment_ids=seg
        )

    return fn


def _ssd_inputs(t, gates, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    x = jax.random.normal(ks[0], (B, t, SSD_H, SSD_P))
    if gates == "realistic":
        dt = jax.nn.softplus(jax.random.normal(ks[5], (B, t, SSD_H)) - 2.0)
        A = -jax.random.uniform(ks[6], (SSD_H,), minval=1.0, maxval=4.0)
    else:  # mixed: dt A = -20 and ~0 side by side
        strong = jax.random.bernoulli(ks[5], 0.5, (B, t, SSD_H))
        dt = jnp.where(strong, 20.0, 1e-5 * jax.random.uniform(ks[6], (B, t, SSD_H)))
        A = -jnp.ones((SSD_H,))
        x = x / 20
    return (
        x,
        dt,
        A,
        jax.random.normal(ks[1], (B, t, SSD_G, SSD_N)),
        jax.random.normal(ks[2], (B, t, SSD_G, SSD_N)),
        jax.random.normal(ks[3], (SSD_H,)),
        jax.random.normal(ks[4], (B, SSD_H, SSD_P, SSD_N)),
    )


def _ssd(impl, chunk, seg):
    def fn(x, dt, A, Bm, Cm, D, h0):
        return ssd(x, dt, A, Bm, Cm, D, h0=h0, chunk_size=chunk, impl=impl, segment_ids=seg)

    return fn


def _delta_inputs(t, gates, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    shape = (B, t, H, DK)
    gshape = (B, t, H) if gates == "head" else shape
    normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return (
        normalise(jax.random.normal(ks[0], shape)),
        normalise(jax.random.normal(ks[1], shape)),
        jax.random.normal(ks[2], (B, t, H, DV)),
        jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], gshape) + 2.0),
        jax.nn.sigmoid(jax.random.normal(ks[4], (B, t, H))),
        jax.random.normal(ks[5], (B, H, DK, DV)),
    )


def _delta(impl, chunk, seg):
    def fn(q, k, v, log_g, beta, h0):
        return gated_delta_rule(
            q, k, v, log_g, beta, h0=h0, chunk_size=chunk, impl=impl, segment_ids=seg
        )

    return fn


OPS = {
    "gla": (_gla_inputs, _gla, ("realistic", "mixed")),
    "ssd": (_ssd_inputs, _ssd, ("realistic", "mixed")),
    "delta": (_delta_inputs, _delta, ("head", "channel")),
}


def _check(op, impl, n, *, t, chunk, gates, packed, data=1):
    inputs, make, _ = OPS[op]
    args = inputs(t, gates)
    seg = _ids(t, n) if packed else None
    batch = tuple(range(len(args))) if data > 1 else ()
    # Batch-sharded inputs: every argument with a leading batch axis (not A or D of SSD).
    batch = tuple(i for i in batch if args[i].shape[0] == B and args[i].ndim > 1)
    _, grads = compare_sharded(make(impl, chunk, seg), args, n, data=data, batch=batch)
    if packed and op != "ssd":
        # A start's own gate gets exactly zero gradient, as unsharded, also on a shard edge.
        starts = np.asarray(jnp.pad(seg[:, 1:] != seg[:, :-1], ((0, 0), (1, 0))))
        assert not np.any(np.asarray(grads[3])[starts]), "a start's gate has a gradient"


# ----------------------------------------------------------------------------- fast
def test_gla_packed_sequence_4():
    _check("gla", "chunked", 4, t=32, chunk=4, gates="mixed", packed=True)


def test_ssd_packed_sequence_2_data_2():
    # chunk 6 does not divide the local 16 steps.
    _check("ssd", "chunked", 2, t=32, chunk=6, gates="realistic", packed=True, data=2)


def test_delta_rule_packed_sequence_8():
    _check("delta", "chunked", 8, t=32, chunk=4, gates="channel", packed=True)


@pytest.mark.parametrize("op", sorted(OPS))
def test_length_must_split(op):
    inputs, make, variants = OPS[op]
    args = [jnp.zeros(a.shape, a.dtype) for a in jax.eval_shape(lambda: inputs(12, variants[0]))]
    with jax.set_mesh(mesh(8)), pytest.raises(ValueError, match="does not divide"):
        make("chunked", 4, None)(*args)


# ----------------------------------------------------------------------------- slow matrix
_MATRIX = [
    (op, impl, n, gates, packed)
    for op in sorted(OPS)
    for impl in ("chunked", "recurrent")
    for n in (2, 4, 8)
    for gates in OPS[op][2]
    for packed in (False, True)
]


@pytest.mark.slow
@pytest.mark.parametrize("op,impl,n,gates,packed", _MATRIX)
def test_matrix(op, impl, n, gates, packed):
    # t = 48: local lengths 24, 12, 6; chunk 4 divides them all but 6, chunk 5 none.
    for chunk in (4, 5) if impl == "chunked" else (4,):
        _check(op, impl, n, t=48, chunk=chunk, gates=gates, packed=packed)


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(OPS))
def test_fsdp(op):
    inputs, make, variants = OPS[op]
    args = inputs(32, variants[-1])
    fn = make("chunked", 4, _ids(32, 4))
    batch = tuple(i for i, a in enumerate(args) if a.ndim > 1)
    compare_sharded(fn, args, 4, fsdp=2, batch=batch)


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(OPS))
def test_without_h0(op):
    inputs, make, variants = OPS[op]
    args = inputs(32, variants[0])
    seg = _ids(32, 4)

    def fn(*xs):
        return make("chunked", 4, seg)(*xs, None)

    compare_sharded(fn, args[:-1], 4)
