"""Sequence parallelism: the time axis split over the mesh axis ``sequence``.

When the current mesh (``jax.set_mesh``) has an axis named :data:`SEQUENCE` of size n > 1, every
op that mixes along time runs its sequence-parallel form: a ``jax.shard_map`` that is manual
over that one axis only (data, fsdp and tensor stay with the compiler), each device holding
t / n consecutive steps of every row, with an explicit, exact cross-shard exchange:

* linear recurrences (diagonal scans, GLA, SSD, the gated delta rule): each shard runs its slice
  from a zero state and summarises it as an affine map h_out = T h_in + B (T diagonal, or dense
  k x k for the delta rule). The summaries are all-gathered (:func:`carry`) and every shard folds
  the n of them in order, so each knows the state entering it and the final state; it then runs
  its slice again from that state. One collective round and n state-sized products per shard,
  where a ring pass would take n - 1 dependent rounds; the second local run costs more compute
  than adding a correction term, but it is exact through each op's own ``h0`` path (packed
  documents, chunking and the custom gradients included) instead of a second copy of its maths.
* short convolutions: the last ``width - 1`` steps of the left neighbour (:func:`halo`);
* long convolutions: an all-to-all from time- to channel-sharding around the FFT and back;
* attention: keys and values passed round the ring, with an online softmax.

``segment_ids`` follow :mod:`effseq.ops.segments`: a shard whose first id differs from its left
neighbour's last id starts a document there (:func:`boundary_cut`), so the carried state is cut.

Everything here except :func:`shards` and :func:`run` is called inside the shard_map body.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from effseq.typing import Array

SEQUENCE = "sequence"
# in_specs / out_specs of :func:`run`: time (axis 1) split over the sequence axis, or whole.
TIME = PartitionSpec(None, SEQUENCE)
WHOLE = PartitionSpec()


def shards() -> int:
    """The number of pieces the time axis is split into here.

    The size of the current mesh's ``sequence`` axis; 1 when no mesh is set (``jax.set_mesh``),
    when it has no such axis, or inside a ``shard_map`` that is already manual over it.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE not in mesh.axis_names:
        return 1
    if SEQUENCE in getattr(mesh, "manual_axes", ()):
        return 1
    return int(mesh.shape[SEQUENCE])


def check_length(op: str, length: int, n: int) -> None:
    """Raises ValueError unless ``length`` splits into ``n`` equal shards."""
    if length % n:
        raise ValueError(
            f"{op}: sequence length {length} does not divide into mesh.sequence = {n} shards; "
            "pad the rows to a multiple of it (or run without the sequence axis)"
        )


# This shard's index while a shard_map body of :func:`run` is traced (innermost last).
_INDEX: list[Array] = []


def run(local: Callable, in_specs, out_specs) -> Callable:
    """``local`` under ``jax.shard_map`` manual over :data:`SEQUENCE` only.

    Specs are :data:`TIME` for (b, t, ...) arrays and :data:`WHOLE` for arrays every shard holds
    whole (parameters, initial states, final states). Replication checking is off: the bodies
    return final states that are equal on every shard by construction (:func:`carry`).
    """

    def body(shard, *args):
        _INDEX.append(shard[0])
        try:
            return local(*args)
        finally:
            _INDEX.pop()

    mapped = jax.shard_map(
        body,
        in_specs=(PartitionSpec(SEQUENCE), *in_specs),
        out_specs=out_specs,
        axis_names={SEQUENCE},
        check_vma=False,
    )

    def call(*args):
        # Each shard's index enters as data (an iota split over the axis) rather than through
        # lax.axis_index: under a shard_map manual over some axes only, axis_index lowers to
        # XLA's PartitionId, which the SPMD partitioner refused ("UNIMPLEMENTED: PartitionId
        # ... ambiguous") once a program held several such shard_maps (a 5-mixer model's
        # logits and prefill in one jit, jax 0.10.2 CPU).
        # Under jit even when called eagerly: JAX's eager transpose of a shard_map manual over
        # some axes only fails (jax.grad outside jit names the other axes in out_specs).
        return jax.jit(mapped)(jnp.arange(shards(), dtype=jnp.int32), *args)

    return call


def index() -> Array:
    """This shard's position along the sequence axis (0 = the earliest time steps).

    Call it while :func:`run`'s body is traced; a function traced later (a custom VJP's
    backward) must take the index from its residuals.
    """
    if not _INDEX:
        raise RuntimeError(
            "effseq.ops.sequence.index() is only known while a sequence.run body is traced; "
            "pass it to later-traced functions (custom VJP backwards) as a residual"
        )
    return _INDEX[-1]


def count() -> int:
    """The number of sequence shards (inside the body)."""
    return jax.lax.axis_size(SEQUENCE)


def _shift(x: Array, step: int) -> Array:
    """Shard i receives shard i - step's ``x``; shards with no such neighbour get zeros."""
    n = count()
    pairs = [(i, i + step) for i in range(n) if 0 <= i + step < n]
    return jax.lax.ppermute(x, SEQUENCE, pairs)


def from_left(x: Array) -> Array:
    """The left neighbour's ``x`` (zeros on the first shard)."""
    return _shift(x, 1)


def from_right(x: Array) -> Array:
    """The right neighbour's ``x`` (zeros on the last shard)."""
    return _shift(x, -1)


def halo(x: Array, width: int, *, reverse: bool = False) -> Array:
    """(b, width, ...): the left neighbour's last ``width`` steps of ``x`` (zeros on shard 0).

    With ``reverse``, the right neighbour's first ``width`` steps (zeros on the last shard).
    """
    if reverse:
        return from_right(x[:, :width])
    return from_left(x[:, x.shape[1] - width :])


def boundary_cut(segment_ids: Array | None, *, reverse: bool = False) -> Array | None:
    """(b,) bool: True where a document boundary falls exactly between this shard and the
    neighbour its state comes from (the left one; the right one with ``reverse``).

    Forward, it means this shard's first step starts a document, so the state carried in is
    dropped; with ``reverse``, the right neighbour's first step starts one. None for None.
    """
    if segment_ids is None:
        return None
    if reverse:
        mine, theirs = segment_ids[:, -1], from_right(segment_ids[:, 0])
        has = index() < count() - 1
    else:
        mine, theirs = segment_ids[:, 0], from_left(segment_ids[:, -1])
        has = index() > 0
    return jnp.logical_and(has, mine != theirs)


def any_start(segment_ids: Array | None) -> Array | None:
    """(b,) bool: the slice holds a document boundary of its own (local steps 1..t-1), so
    nothing carried in survives to its end. None for None."""
    if segment_ids is None:
        return None
    return jnp.any(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)


def cut(x: Array, flags: Array | None) -> Array:
    """``x`` (b, ...) with the rows where ``flags`` (b,) is True set to zero."""
    if flags is None:
        return x
    return jnp.where(flags.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros((), x.dtype), x)


def carry(
    transition: Array,
    final: Array,
    h0: Array,
    apply: Callable[[Array, Array], Array] = jnp.multiply,
    *,
    reverse: bool = False,
) -> tuple[Array, Array]:
    """Folds every shard's affine summary h_out = apply(transition, h_in) + final.

    Args:
      transition: this shard's T (any shape ``apply`` takes), e.g. the product of its decays.
      final: (b, ...) this shard's final state when started from zero.
      h0: (b, ...) the state entering the whole sequence (the last shard's with ``reverse``).
      apply: how T acts on a state; elementwise product by default.
      reverse: states flow from the last shard to the first.

    Returns:
      ``(incoming, last)``: the state entering this shard and the state leaving the whole
      sequence (the same on every shard).
    """
    ts = jax.lax.all_gather(transition, SEQUENCE)
    fs = jax.lax.all_gather(final, SEQUENCE)
    n = ts.shape[0]
    h = h0
    incoming = [None] * n
    for i in reversed(range(n)) if reverse else range(n):
        incoming[i] = h
        h = apply(ts[i], h) + fs[i]
    return jnp.stack(incoming)[index()], h


def gather_time(x: Array) -> Array:
    """(b, t, ...): every shard's (b, t / n, ...) slice, in order (an all-gather along time)."""
    return jax.lax.all_gather(x, SEQUENCE, axis=1, tiled=True)


def to_channels(x: Array, axis: int = -1) -> Array:
    """(b, t / n, ..., c) time-sharded -> (b, t, ..., c / n) sharded along ``axis`` (all-to-all).

    ``x.shape[axis]`` must divide by the shard count; shard i gets the i-th block of channels.
    """
    return jax.lax.all_to_all(x, SEQUENCE, split_axis=axis % x.ndim, concat_axis=1, tiled=True)


def to_time(x: Array, axis: int = -1) -> Array:
    """The inverse of :func:`to_channels`."""
    return jax.lax.all_to_all(x, SEQUENCE, split_axis=1, concat_axis=axis % x.ndim, tiled=True)


def channel_block(x: Array, axis: int = 0) -> Array:
    """This shard's block of ``x`` along ``axis`` (the block :func:`to_channels` gives it)."""
    size = x.shape[axis] // count()
    return jax.lax.dynamic_slice_in_dim(x, index() * size, size, axis)
