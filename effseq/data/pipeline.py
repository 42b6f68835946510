"""Global batches for the trainer: shuffled, repeated, split over processes, checkpointable.

``batches(..., pack=True)`` packs documents of varying length into the rows instead of one
example per row (training streams of token tasks; :mod:`effseq.data.packing` describes the
packing, its ``segment_ids`` and its resumable position).
"""

from __future__ import annotations

import math
import threading
import weakref

import grain
import numpy as np

from effseq.data import base, packing

DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)

# Datasets up to this size are kept in memory once read (the CPU-sized tasks are a few MB).
IN_MEMORY_BYTES = 256 << 20
# Examples read together when a kept dataset misses one (a multiple of the synthetic tasks'
# generation block).
_FILL_RUN = 256


class _Rows:
    """Examples of a dataset by index, gathered into stacked arrays.

    A dataset of at most :data:`IN_MEMORY_BYTES` keeps every example it has read in stacked
    arrays, so a batch is one fancy-index per key instead of a Python call per example:
    generating or parsing one example costs 30-150 us, and at batch 32 that was 4 ms per
    step, as long as a small model's whole train step. Larger datasets read every time.
    """

    def __init__(self, dataset: grain.MapDataset):
        self.dataset = dataset
        # Rows straight from the dataset's source where there is one (see base.source_dataset).
        self.source = base.plain_source(dataset)
        first = dataset[0]
        per_example = sum(np.asarray(v).nbytes for v in first.values())
        self.store = None
        if per_example * len(dataset) <= IN_MEMORY_BYTES:
            self.store = {
                k: np.empty((len(dataset), *np.shape(v)), np.asarray(v).dtype)
                for k, v in first.items()
            }
            self.filled = np.zeros(len(dataset), bool)
            self.lock = threading.Lock()
            for key, column in self.store.items():
                column[0] = first[key]
            self.filled[0] = True

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if self.store is None:
            rows = [self.dataset[int(i)] for i in indices]
            return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        missing = indices[~self.filled[indices]]
        if missing.size:
            with self.lock:
                # Whole aligned runs of examples, read in order: generated tasks make theirs
                # in blocks, and shuffled reads would otherwise generate a block per example.
                for run in np.unique(missing // _FILL_RUN) * _FILL_RUN:
                    todo = run + np.flatnonzero(~self.filled[run : run + _FILL_RUN])
                    if not todo.size:
                        continue
                    start, stop = int(todo[0]), int(todo[-1]) + 1
                    for i, row in zip(range(start, stop), self._read(start, stop), strict=True):
                        if self.filled[i]:
                            continue
                        for key, column in self.store.items():
                            column[i] = row[key]
                        self.filled[i] = True
        return {key: column[indices] for key, column in self.store.items()}

    def _read(self, start: int, stop: int):
        """Rows start..stop-1: in one read where the source can (LineSource.rows)."""
        if hasattr(self.source, "rows"):
            return self.source.rows(start, stop)
        read = self.source if self.source is not None else self.dataset
        return (read[i] for i in range(start, stop))


# One row store per dataset object, so a caller that keeps its dataset (the trainer keeps each
# split's) reads every example once across epochs and evaluation passes.
_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rows(dataset: grain.MapDataset) -> _Rows:
    rows = _ROWS.get(dataset)
    if rows is None:
        rows = _ROWS[dataset] = _Rows(dataset)
    return rows


def batches(
    dataset: grain.MapDataset,
    *,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    read_options: grain.ReadOptions | None = None,
    pack: bool = False,
) -> grain.DatasetIterator:
    """Iterator over this process's rows of each global batch of ``dataset``.

    The global batch stream is the dataset, shuffled with ``seed`` (a new deterministic order
    each epoch), repeated ``num_epochs`` times (None: forever), cut into batches of
    ``global_batch_size`` examples. Process ``p`` of ``process_count`` receives rows
    [p * b, (p + 1) * b) of every global batch, b = global_batch_size // process_count, so the
    processes' slices concatenated in process order are exactly the single-process batch, and
    every process yields the same number of batches.

    Each batch is a dict of stacked arrays (b, ...) plus ``example_weight`` float32 (b,): 1.0
    for real rows. With ``drop_remainder=False`` (evaluation) the last batch is filled up to
    size by repeating the final example with weight 0.0, so a weighted sum over all batches
    counts every example exactly once; with True the incomplete last batch is dropped.

    The returned ``grain.DatasetIterator``'s ``get_state()`` / ``set_state()`` record and
    restore the position exactly.

    ``pack=True`` (training: ``num_epochs=None`` only) packs the same document stream
    first-fit into the rows (:mod:`effseq.data.packing`): per-position keys packed with zero
    padding, per-example keys dropped, ``segment_ids`` int32 (b, t) added (1, 2, ... per
    document in a row, 0 on padding). Examples need a ``mask`` with their real tokens first.
    """
    if (
        isinstance(global_batch_size, bool)
        or not isinstance(global_batch_size, int)
        or (global_batch_size < 1)
    ):
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got process_index={process_index}, "
            f"process_count={process_count}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    if num_epochs is not None and (isinstance(num_epochs, bool) or num_epochs < 1):
        raise ValueError(f"num_epochs must be None or a positive int, got {num_epochs!r}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")

    # The order as indices into the dataset: a shuffled range permutes exactly as shuffling the
    # dataset itself would (grain's shuffle depends only on the seed and the length).
    stream = grain.MapDataset.range(len(dataset))
    stream = stream.shuffle(seed) if shuffle else stream
    if num_epochs is None:
        stream = stream.repeat()
        total = None
        num_batches = len(stream) // global_batch_size
    else:
        if num_epochs > 1:
            stream = stream.repeat(num_epochs)
        total = len(stream)
        round_ = math.floor if drop_remainder else math.ceil
        num_batches = round_(total / global_batch_size)
        if num_batches == 0:
            raise ValueError(
                f"the dataset has {total} examples over {num_epochs} epoch(s), fewer than one "
                f"global batch of {global_batch_size}; use drop_remainder=False or a smaller batch"
            )
    local = global_batch_size // process_count
    offset = process_index * local
    rows = _rows(dataset)
    if pack:
        return _packed(dataset, stream, rows, num_epochs, global_batch_size, offset, local)

    def make_batch(i: int) -> dict[str, np.ndarray]:
        start = i * global_batch_size + offset
        positions = np.arange(start, start + local)
        weights = np.ones(local, np.float32)
        if total is not None:
            weights[positions >= total] = 0.0
            positions = np.minimum(positions, total - 1)
        batch = rows.take(np.array([stream[int(j)] for j in positions], np.int64))
        batch["example_weight"] = weights
        return batch

    iter_ds = (
        grain.MapDataset.range(num_batches)
        .map(make_batch)
        .to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
    )
    return iter(iter_ds)


def _packed(dataset, stream, rows, num_epochs, global_batch_size, offset, local):
    if num_epochs is not None:
        raise ValueError("pack=True packs a training stream: it needs num_epochs=None")
    first = dataset[0]
    if "mask" not in first or np.ndim(first["mask"]) != 1:
        raise ValueError(
            "pack=True needs examples with a per-position `mask` (token tasks); these have "
            f"keys {sorted(first)}"
        )
    length = int(np.shape(first["mask"])[0])
    keys = packing.packable_keys(first, length)
    return packing.PackedIterator(stream, rows.take, keys, length, global_batch_size, offset, local)
