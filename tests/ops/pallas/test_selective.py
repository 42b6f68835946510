"""``selective_scan(..., impl="pallas")`` (effseq.ops.pallas.selective) against the per-step
float32 reference: outputs, final state and the gradient of every input (h0 and D included),
run in Pallas's interpret mode on a CPU; and the CPU-side check that the forward and backward
kernels lower for a GPU through Triton.

Shapes are tiny (interpret mode compiles every unrolled step): d = 6 in tiles of 4 (two tiles,
the second half padding, so the per-tile partial gradients of B and C are summed) and n = 5
(padded to 8) check the zero padding; t = 37 with chunks of 8 (a padded last chunk) and t = 5
(shorter than one chunk).
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from effseq.ops.pallas import _common, selective
from effseq.ops.pallas.selective import selective_scan_pallas
from effseq.ops.selective_scan import selective_scan, selective_scan_reference
from tests.ops.compare import compare_with_reference
from tests.ops.test_packed_ops import packed_ids
from tests.ops.test_selective_scan import make_inputs
from tests.tolerances import assert_close

NAMES = ["u", "delta", "A", "B", "C", "D", "h0"]
CHUNK = 8
D_MODEL, N_STATE = 6, 5


def _pallas(**kwargs):
    """The op through the Pallas kernels, h0 positional (for vjp over every input)."""

    def run(u, delta, A, B, C, D, h0):
        return selective_scan(
            u, delta, A, B, C, D, h0=h0, impl="pallas", chunk_size=CHUNK, **kwargs
        )

    return run


def _tiled(u, delta, A, B, C, D, h0):
    # Two channel tiles of 4 (the op itself would take one tile of 8 for d = 6).
    return selective_scan_pallas(u, delta, A, B, C, D, h0, chunk_size=CHUNK, block_d=4)


def _reference(**kwargs):
    return lambda u, delta, A, B, C, D, h0: selective_scan_reference(
        u, delta, A, B, C, D, h0=h0, **kwargs
    )


def _inputs(t, dtype="float32", seed=0):
    return make_inputs(t, dtype, d=D_MODEL, n=N_STATE, seed=seed)


def test_matches_reference_two_tiles():
    # The kernels' wrapper with two channel tiles of 4 (d = 6 padded to 8), n = 5 padded to 8,
    # and t = 37: four chunks of 8 and a padded fifth.
    (y, h_last), _ = compare_with_reference(
        _tiled, _reference(), _inputs(37, seed=37), jit=True, names=NAMES
    )
    assert y.shape == (2, 37, D_MODEL) and h_last.shape == (2, D_MODEL, N_STATE)


def test_matches_reference_short():
    # Through the public op: t = 5, shorter than one chunk (cut to 8, then padded).
    (y, h_last), _ = compare_with_reference(
        _pallas(), _reference(), _inputs(5, seed=5), jit=True, names=NAMES
    )
    assert y.dtype == h_last.dtype == jnp.float32


def test_bfloat16_inputs():
    # bf16 u, delta, B, C go to the kernels as they are; the reference sees them upcast.
    (y, h_last), grads = compare_with_reference(
        _pallas(), _reference(), _inputs(37, "bfloat16", seed=1), "bfloat16", jit=True, names=NAMES
    )
    assert y.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 7


def test_without_skip_and_initial_state():
    u, delta, A, B, C, _, _ = _inputs(37, seed=2)

    def fast(u, delta, A, B, C):
        return selective_scan(u, delta, A, B, C, impl="pallas", chunk_size=CHUNK)

    compare_with_reference(
        fast, selective_scan_reference, (u, delta, A, B, C), jit=True, names=NAMES[:5]
    )


def test_packed_rows():
    # Documents start inside chunks of 8, on chunk boundaries (16, 24) and last one token.
    seg = packed_ids()
    compare_with_reference(
        _pallas(segment_ids=seg),
        _reference(segment_ids=seg),
        _inputs(37, seed=3),
        jit=True,
        names=NAMES,
    )


def test_default_chunk_and_empty():
    # chunk_size None: the default 16, cut to 8 for t = 5 (forward only).
    u, delta, A, B, C, D, h0 = _inputs(5, seed=4)
    y, h_last = jax.jit(functools.partial(selective_scan, impl="pallas"))(u, delta, A, B, C, D)
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D)
    assert_close(y, y_ref, err_msg="y")
    assert_close(h_last, h_ref, err_msg="h_last")
    y, h_last = selective_scan(
        u[:, :0], delta[:, :0], A, B[:, :0], C[:, :0], D, h0=h0, impl="pallas"
    )
    assert y.shape == (2, 0, D_MODEL)
    assert_close(h_last, h0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"chunk_size": 12},
            r"selective_scan: impl='pallas' needs chunk_size to be a power of two",
        ),
        ({"chunk_size": 0}, r"`chunk_size` must be a positive"),
    ],
)
def test_bad_tile_raises(kwargs, match):
    u, delta, A, B, C, D, _ = _inputs(5)
    with pytest.raises(ValueError, match=match):
        selective_scan(u, delta, A, B, C, D, impl="pallas", **kwargs)


def test_default_block_d_halves_on_small_grids(monkeypatch):
    # b·d/block_d programs: 32 channels when that fills the GPU, fewer (down to 8) when not.
    seen = []
    real = selective._scan

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(selective, "_scan", spy)
    for b, d in [(9, 1024), (1, 2048), (1, 16384), (4, 2048), (1, 64)]:
        u, x = jnp.zeros((b, 1, d)), jnp.zeros((b, 1, 16))
        jax.eval_shape(
            selective_scan_pallas, u, u, jnp.zeros((d, 16)), x, x, None, jnp.zeros((b, d, 16))
        )
    assert seen == [32, 8, 32, 16, 8]


def test_bad_block_d_raises():
    u, delta, A, B, C, D, h0 = _inputs(5)
    with pytest.raises(ValueError, match=r"impl='pallas' needs block_d to be a power of two"):
        selective_scan_pallas(u, delta, A, B, C, D, h0, block_d=24)


@pytest.mark.parametrize("chunk_size", [None, pytest.param(128, marks=pytest.mark.slow)])
def test_lowers_for_gpu(chunk_size):
    # Forward and gradient (both kernels) lower through Triton for the cuda platform, in bf16
    # and with packed rows (the decay-zeroing load), at the default chunk and channel tile, and
    # with a chunk above MAX_CHUNK (taken as 32: the longest unrolled chunk).
    u, delta, A, B, C, D, h0 = _inputs(37, "bfloat16")
    seg = packed_ids()

    def fwd(u, delta, A, B, C, D, h0):
        return selective_scan(
            u, delta, A, B, C, D, h0=h0, impl="pallas", segment_ids=seg, chunk_size=chunk_size
        )

    def loss(*args):
        y, h_last = fwd(*args)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h_last)

    args = (u, delta, A, B, C, D, h0)
    text = _common.lower_for_gpu(fwd, *args)
    assert text.count("__gpu$xla.gpu.triton") == 1
    text = _common.lower_for_gpu(jax.grad(loss, argnums=tuple(range(7))), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2


@pytest.mark.slow
@pytest.mark.devices(2)
def test_sequence_sharded():
    # Under a mesh with sequence = 2 the op runs the Pallas kernels on each local slice (the
    # shared _sharded path); packed rows with a boundary on the shard edge.
    from tests.sequence.test_scans import SEGMENTS, _check_selective

    _check_selective(2, "pallas", jnp.asarray(SEGMENTS))


@pytest.mark.slow
def test_default_tiles_mamba_sizes():
    # The default tiles at realistic sizes: chunks of 16 and 32 channels (the default before
    # a small grid halves it); d = 80 (three tiles, the last half padding), n = 16, t = 50
    # (three chunks and a padded fourth).
    args = make_inputs(50, d=80, n=16, seed=11)

    def fast(u, delta, A, B, C, D, h0):
        return selective_scan_pallas(u, delta, A, B, C, D, h0, block_d=32)

    compare_with_reference(fast, _reference(), args, jit=True, names=NAMES)
