"""Sequence-parallel forms of ``selective_scan`` (Mamba) and ``s4d_scan`` (S4D's recurrence,
both directions): sharded == unsharded on outputs, final states and every input's gradient
(``h0`` and the parameters included), with document boundaries inside a shard, exactly on a
shard edge and one-token documents at an edge."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers.s4d import init_imag
from effseq.ops import s4d_discretize, s4d_scan, selective_scan
from effseq.ops.s4d import _power
from tests.sequence.harness import compare_sharded, mesh
from tests.tolerances import assert_close

# Built for 8 (fake CPU) devices; skipped where fewer are visible (one GPU).
pytestmark = pytest.mark.devices(8)

B, T, D, N = 2, 16, 4, 4
H = 3
CHUNK = 4

# Row 0: a boundary inside the first half (5), one on the middle edge (8) whose document is a
# single token (8), then 9..15. Row 1: a boundary at 3 and a document running across the
# middle edge (3..10), so the state crosses it but not the first half's own start; then
# one-token documents at 11 (the end of a quarter) and 15 (the end of the row).
SEGMENTS = np.array(
    [
        [1] * 5 + [2] * 3 + [3] + [4] * 7,
        [1] * 3 + [2] * 8 + [5] + [6] * 3 + [7],
    ],
    np.int32,
)


def _selective_args(seed=0, t=T):
    ks = jax.random.split(jax.random.key(seed), 7)
    u = jax.random.normal(ks[0], (B, t, D))
    delta = jax.nn.softplus(jax.random.normal(ks[1], (B, t, D)) - 1.0)
    A = -jnp.exp(0.5 * jax.random.normal(ks[2], (D, N)))
    Bm = jax.random.normal(ks[3], (B, t, N))
    C = jax.random.normal(ks[4], (B, t, N))
    Dskip = jax.random.normal(ks[5], (D,))
    h0 = jax.random.normal(ks[6], (B, D, N))
    return [u, delta, A, Bm, C, Dskip, h0]


def _s4d_args(seed=0, t=T):
    ks = jax.random.split(jax.random.key(seed), 8)
    log_dt = jax.random.uniform(ks[0], (H,), minval=np.log(1e-2), maxval=np.log(2e-1))
    A = -0.5 + 1j * jnp.pi * jnp.arange(N)[None].repeat(H, 0)
    Bc = jax.random.normal(ks[1], (H, N)) + 1j * jax.random.normal(ks[2], (H, N))
    dA, dB = s4d_discretize(log_dt, A, Bc)
    C = jax.random.normal(ks[3], (H, N)) + 1j * jax.random.normal(ks[4], (H, N))
    u = jax.random.normal(ks[5], (B, t, H))
    h0 = (jax.random.normal(ks[6], (B, H, N)) + 1j * jax.random.normal(ks[7], (B, H, N))).astype(
        jnp.complex64
    )
    return [u, dA, dB, C.astype(jnp.complex64), h0]


def _check_selective(sequence, impl, seg, h0=True, data=1, fsdp=1, batch=(), chunk_size=CHUNK):
    args = _selective_args()
    if not h0:
        args = args[:-1]

    def fn(u, delta, A, Bm, C, Dskip, h0=None):
        return selective_scan(
            u, delta, A, Bm, C, Dskip, h0=h0, impl=impl, chunk_size=chunk_size, segment_ids=seg
        )

    names = ["u", "delta", "A", "B", "C", "D", "h0"][: len(args)]
    compare_sharded(fn, args, sequence, data=data, fsdp=fsdp, batch=batch, names=names)


def _check_s4d(sequence, reverse, seg, h0=True, data=1, fsdp=1, batch=()):
    args = _s4d_args()
    if not h0:
        args = args[:-1]

    def fn(u, dA, dB, C, h0=None):
        return s4d_scan(u, dA, dB, C, segment_ids=seg, h0=h0, reverse=reverse)

    names = ["u", "dA", "dB", "C", "h0"][: len(args)]
    compare_sharded(fn, args, sequence, data=data, fsdp=fsdp, batch=batch, names=names)


# Fast: every shard count once, both impls, both directions, packed rows with h0, and one
# case on a data x sequence mesh with batch-sharded inputs.


def test_selective_chunked_packed_sequence2():
    _check_selective(2, "chunked", jnp.asarray(SEGMENTS))


def test_selective_associative_data2_sequence4():
    _check_selective(4, "associative", None, data=2, batch=(0, 1, 3, 4, 6))


def test_s4d_packed_sequence8():
    _check_s4d(8, False, jnp.asarray(SEGMENTS))


def test_s4d_reverse_packed_sequence4():
    _check_s4d(4, True, jnp.asarray(SEGMENTS))


def test_length_must_split():
    u, delta, A, Bm, C, Dskip, _ = _selective_args(t=10)
    s = _s4d_args(t=10)
    with jax.set_mesh(mesh(4)):
        with pytest.raises(ValueError, match=r"selective_scan.*10.*mesh.sequence = 4"):
            selective_scan(u, delta, A, Bm, C, Dskip)
        with pytest.raises(ValueError, match=r"s4d_scan.*10.*mesh.sequence = 4"):
            s4d_scan(*s[:4])


def test_no_mesh_no_shard_map():
    u, delta, A, Bm, C, Dskip, h0 = _selective_args()
    jaxpr = str(jax.make_jaxpr(selective_scan)(u, delta, A, Bm, C, Dskip, h0=h0))
    assert "shard_map" not in jaxpr
    jaxpr = str(jax.make_jaxpr(s4d_scan)(*_s4d_args()[:4]))
    assert "shard_map" not in jaxpr


# The whole matrix.


@pytest.mark.slow
@pytest.mark.parametrize(
    "sequence,impl,packed,h0,chunk_size",
    [
        (n, impl, packed, h0, cs)
        for n, impl, packed, h0 in itertools.product(
            (2, 4, 8), ("chunked", "associative"), (False, True), (False, True)
        )
        for cs in ((CHUNK, None) if impl == "chunked" else (CHUNK,))
    ],
)
def test_selective_matrix(sequence, impl, packed, h0, chunk_size):
    seg = jnp.asarray(SEGMENTS) if packed else None
    _check_selective(sequence, impl, seg, h0=h0, chunk_size=chunk_size)


# Batch-sharded inputs on data or fsdp next to the sequence axis (b = 2 caps data * fsdp).
WITH_BATCH_AXES = [(2, 2, 1), (4, 2, 1), (2, 1, 2), (4, 1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["chunked", "associative"])
@pytest.mark.parametrize("sequence,data,fsdp", WITH_BATCH_AXES)
def test_selective_with_data(impl, sequence, data, fsdp):
    seg = jnp.asarray(SEGMENTS)
    _check_selective(sequence, impl, seg, data=data, fsdp=fsdp, batch=(0, 1, 3, 4, 6))


@pytest.mark.slow
@pytest.mark.parametrize(
    "sequence,reverse,packed,h0",
    list(itertools.product((2, 4, 8), (False, True), (False, True), (False, True))),
)
def test_s4d_matrix(sequence, reverse, packed, h0):
    _check_s4d(sequence, reverse, jnp.asarray(SEGMENTS) if packed else None, h0=h0)


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("sequence,data,fsdp", WITH_BATCH_AXES)
def test_s4d_with_data(reverse, sequence, data, fsdp):
    seg = jnp.asarray(SEGMENTS)
    _check_s4d(sequence, reverse, seg, data=data, fsdp=fsdp, batch=(0, 4))


def test_s4d_power_is_exact():
    """dA**l for the carried state is within a few ulps of the float32 dA's exact power (plain
    repeated squaring drifts by about l ulps: 1.8e-5 relative at l = 512 on these modes)."""
    h, n = 4, 32
    log_dt = jnp.linspace(np.log(1e-3), np.log(1e-1), h)
    A = jnp.asarray(-0.5 + 1j * np.asarray(init_imag("lin", n))[None].repeat(h, 0), jnp.complex64)
    dA, _ = s4d_discretize(log_dt, A, jnp.ones((h, n), jnp.complex64))
    exact = np.asarray(dA).astype(np.complex128)
    for length in (1, 2, 3, 7, 512, 4096):
        want = exact**length
        got = np.asarray(_power(dA, length)).astype(np.complex128)
        big = np.abs(want) > 1e-30
        rel = np.abs(got - want)[big] / np.abs(want)[big]
        assert rel.max() < 3e-7, (length, rel.max())


def _s4d_float64(u, dA, dB, C, h0, reverse):
    """The S4D recurrence in float64 on the same float32 values: the truth both forms drift from."""
    dA, dB, C = (np.asarray(x).astype(np.complex128) for x in (dA, dB, C))
    x = np.asarray(h0).astype(np.complex128)
    u = np.asarray(u, np.float64)
    y = np.zeros(u.shape)
    for s in reversed(range(u.shape[1])) if reverse else range(u.shape[1]):
        x_new = dA * x + dB * u[:, s, :, None]
        y[:, s] = 2 * np.einsum("hn,bhn->bh", C, x if reverse else x_new).real
        x = x_new
    return y, x


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True])
def test_s4d_long_slices(reverse):
    """Slices of 512 steps with slow modes (dt in [1e-3, 1e-2], S4D-Lin, n = 32), so the
    carried state crosses a dA**512 of order one. At this length the unsharded scan itself
    drifts from the float64 recurrence by up to ~4e-5 on |y| up to 60 (more than the entrywise
    float32 tolerance), so both forms are held to that truth: the sharded one may not drift
    further than the unsharded one (plain repeated squaring for the power drifted 2e-4)."""
    ks = jax.random.split(jax.random.key(0), 6)
    h, n, t = 4, 32, 1024
    log_dt = jax.random.uniform(ks[0], (h,), minval=np.log(1e-3), maxval=np.log(1e-2))
    A = jnp.asarray(-0.5 + 1j * np.asarray(init_imag("lin", n))[None].repeat(h, 0), jnp.complex64)
    dA, dB = s4d_discretize(log_dt, A, jnp.ones((h, n), jnp.complex64))
    C = (jax.random.normal(ks[1], (h, n)) + 1j * jax.random.normal(ks[2], (h, n))).astype(
        jnp.complex64
    )
    u = jax.random.normal(ks[3], (B, t, h))
    h0 = (jax.random.normal(ks[4], (B, h, n)) + 1j * jax.random.normal(ks[5], (B, h, n))).astype(
        jnp.complex64
    )
    fn = jax.jit(lambda *a: s4d_scan(*a[:4], h0=a[4], reverse=reverse))
    y_ref, last_ref = fn(u, dA, dB, C, h0)
    with jax.set_mesh(mesh(2)):
        assert "shard_map" in str(jax.make_jaxpr(fn)(u, dA, dB, C, h0))
        y, last = fn(u, dA, dB, C, h0)
    y64, last64 = _s4d_float64(u, dA, dB, C, h0, reverse)
    for got, ref, truth in ((y, y_ref, y64), (last, last_ref, last64)):
        err = np.abs(np.asarray(got) - truth).max()
        err_ref = np.abs(np.asarray(ref) - truth).max()
        assert err <= 1.25 * err_ref, (err, err_ref)


@pytest.mark.slow
def test_selective_long_slices():
    """Slices of 1024 steps with Mamba-sized steps (delta in [1e-3, 1e-2]): the carried state
    crosses exp(A sum delta) of order one where the unsharded scan multiplies 1024 decays."""
    ks = jax.random.split(jax.random.key(0), 7)
    t, d, n = 2048, 8, 16
    u = jax.random.normal(ks[0], (B, t, d))
    delta = jnp.exp(jax.random.uniform(ks[1], (B, t, d), minval=np.log(1e-3), maxval=np.log(1e-2)))
    A = -jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d, 1))
    Bm, C = jax.random.normal(ks[2], (B, t, n)), jax.random.normal(ks[3], (B, t, n))
    Dskip, h0 = jax.random.normal(ks[4], (d,)), jax.random.normal(ks[5], (B, d, n))

    def fn(u, delta, A, Bm, C, Dskip, h0):
        return selective_scan(u, delta, A, Bm, C, Dskip, h0=h0, impl="chunked", chunk_size=64)

    args = [u, delta, A, Bm, C, Dskip, h0]
    compare_sharded(fn, args, 2, names=["u", "delta", "A", "B", "C", "D", "h0"])


def test_gradient_outside_jit_under_a_sequence_mesh():
    # jax.grad called eagerly (no jit) under jax.set_mesh: JAX's eager transpose of a
    # shard_map manual over some axes only used to fail ("out_specs refers to 'data'").
    u, delta, A, Bm, C, Dskip, h0 = _selective_args()

    def loss(u, delta, Bm, C, h0):
        y, h = selective_scan(u, delta, A, Bm, C, Dskip, h0=h0)
        return jnp.sum(y) + jnp.sum(h)

    args = (u, delta, Bm, C, h0)
    want = jax.grad(loss, argnums=range(5))(*args)
    with jax.set_mesh(mesh(2)):
        got = jax.grad(loss, argnums=range(5))(*args)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, kind="grad")
