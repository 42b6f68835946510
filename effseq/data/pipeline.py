"""Global batches for the trainer: shuffled, repeated, split over processes, checkpointable."""

from __future__ import annotations

import math

import grain
import numpy as np

DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)


def _stack(rows: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    batch["example_weight"] = weights
    return batch


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

    stream = dataset.shuffle(seed) if shuffle else dataset
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

    def make_batch(i: int) -> dict[str, np.ndarray]:
        start = i * global_batch_size + offset
        indices = np.arange(start, start + local)
        weights = np.ones(local, np.float32)
        if total is not None:
            weights[indices >= total] = 0.0
            indices = np.minimum(indices, total - 1)
        return _stack([stream[int(j)] for j in indices], weights)

    iter_ds = (
        grain.MapDataset.range(num_batches)
        .map(make_batch)
        .to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
    )
    return iter(iter_ds)
