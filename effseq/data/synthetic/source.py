"""Deterministic per-index generation shared by the synthetic tasks."""

from __future__ import annotations

import functools

import grain
import numpy as np

from effseq.data import base

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SyntheticSource:
    """Example ``i`` of a split is ``make(rng)`` with ``rng`` seeded by (seed, split, i).

    So any example can be produced alone, in any order, on any process, and always the same.
    ``make`` must be picklable (a module-level function or a ``functools.partial`` of one).
    """

    def __init__(self, make, seed: int, split: str, num_examples: int):
        self.make, self.seed, self.split_code = make, seed, SPLIT_CODES[split]
        self.num_examples = num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, self.split_code, index])
        return self.make(rng)


COMMON_DEFAULTS = {"num_examples": 100_000, "num_eval_examples": 1_000, "seed": 0}


def dataset(make, split: str, num_examples: int, num_eval_examples: int, seed: int, **params):
    """The split's MapDataset: ``num_examples`` for train, ``num_eval_examples`` for val/test."""
    base.check_int("num_examples", num_examples)
    base.check_int("num_eval_examples", num_eval_examples)
    base.check_int("seed", seed, minimum=0)
    count = num_examples if split == "train" else num_eval_examples
    return grain.MapDataset.source(
        SyntheticSource(functools.partial(make, **params), seed, split, count)
    )


def labelled(inputs: np.ndarray, label: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The sequence-labelling example dict, with the dtypes every task promises."""
    return {
        "inputs": inputs.astype(np.int32),
        "label": label.astype(np.int32),
        "weights": weights.astype(np.float32),
        "mask": np.ones(inputs.shape[0], bool),
    }
