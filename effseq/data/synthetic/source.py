"""Deterministic per-index generation shared by the synthetic tasks."""

from __future__ import annotations

import functools

import numpy as np

from effseq.data import base

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


# Examples are generated in blocks of this many: numpy's per-call overhead made one example
# at a time cost 70-150 us, as long as a small model's train step per 32-example batch.
BLOCK = 256


class SyntheticSource:
    """Example ``i`` of a split is row ``i % BLOCK`` of ``make(rng, BLOCK)``, with ``rng``
    seeded by (seed, split, i // BLOCK).

    So any example can be produced alone, in any order, on any process, and always the same.
    ``make(rng, count)`` returns a dict of arrays with ``count`` rows; it must be picklable (a
    module-level function or a ``functools.partial`` of one). The last few blocks are kept,
    so reading examples in any order within a block generates it once.
    """

    def __init__(self, make, seed: int, split: str, num_examples: int):
        self.make, self.seed, self.split_code = make, seed, SPLIT_CODES[split]
        self.num_examples = num_examples
        self._block = functools.lru_cache(maxsize=8)(self._generate)

    def __len__(self) -> int:
        return self.num_examples

    def _generate(self, block: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_code, block])
        return self.make(rng, BLOCK)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} out of range for {self.num_examples} examples")
        rows = self._block(index // BLOCK)
        return {key: value[index % BLOCK] for key, value in rows.items()}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_block"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._block = functools.lru_cache(maxsize=8)(self._generate)


COMMON_DEFAULTS = {"num_examples": 100_000, "num_eval_examples": 1_000, "seed": 0}


def dataset(make, split: str, num_examples: int, num_eval_examples: int, seed: int, **params):
    """The split's MapDataset: ``num_examples`` for train, ``num_eval_examples`` for val/test."""
    base.check_int("num_examples", num_examples)
    base.check_int("num_eval_examples", num_eval_examples)
    base.check_int("seed", seed, minimum=0)
    count = num_examples if split == "train" else num_eval_examples
    return base.source_dataset(
        SyntheticSource(functools.partial(make, **params), seed, split, count)
    )


def labelled(inputs: np.ndarray, label: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The sequence-labelling examples (count, t), with the dtypes every task promises."""
    return {
        "inputs": inputs.astype(np.int32),
        "label": label.astype(np.int32),
        "weights": weights.astype(np.float32),
        "mask": np.ones(inputs.shape, bool),
    }


def distinct(rng: np.random.Generator, count: int, population: int, k: int) -> np.ndarray:
    """(count, k): for each row, k distinct draws from range(population), uniformly."""
    return np.argsort(rng.random((count, population)), axis=1)[:, :k]
