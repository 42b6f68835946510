"""Deterministic per-index generation shared by the synthetic tasks.

Variable lengths (for packing, :mod:`effseq.data.packing`): the sequence tasks take
``min_len`` (default 0: every example is ``seq_len`` long, as without the option) and
``length_dist``. With ``min_len`` > 0 each example's length n is drawn from
[min_len, seq_len]: ``"uniform"`` (every length equally likely) or ``"log_uniform"`` (log n
uniform: a long tail of short documents and few long ones). The example is then the task's
structure laid out over its first n positions; positions n..seq_len-1 are padding (id 0,
``mask`` False, ``label`` 0, ``weights`` 0).
"""

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
LENGTH_DEFAULTS = {"min_len": 0, "length_dist": "uniform"}
LENGTH_DISTS = ("uniform", "log_uniform")


def check_lengths(seq_len: int, min_len, length_dist, least: int, why: str) -> None:
    """``min_len`` 0 or in [least, seq_len] (``why`` says what needs ``least`` positions);
    ``length_dist`` one of :data:`LENGTH_DISTS`."""
    base.check_int("min_len", min_len, 0)
    if min_len and not least <= min_len <= seq_len:
        raise ValueError(
            f"option min_len={min_len} must be 0 (every example seq_len long) or in "
            f"[{least}, seq_len={seq_len}] ({why})"
        )
    if length_dist not in LENGTH_DISTS:
        raise ValueError(f"option length_dist must be one of {LENGTH_DISTS}, got {length_dist!r}")


def draw_lengths(rng: np.random.Generator, count: int, seq_len: int, min_len: int, dist: str):
    """(count,) int64 example lengths in [min_len, seq_len] (see the module docstring)."""
    if dist == "uniform":
        return rng.integers(min_len, seq_len + 1, count)
    u = rng.uniform(np.log(min_len), np.log(seq_len + 1), count)
    return np.clip(np.floor(np.exp(u)).astype(np.int64), min_len, seq_len)


def pad_after(example: dict[str, np.ndarray], lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The (count, t) examples with every position at or after each row's length made
    padding: 0 in every array, ``mask`` False."""
    t = example["inputs"].shape[1]
    real = np.arange(t)[None, :] < lengths[:, None]
    return {k: np.where(real, v, np.zeros((), v.dtype)) for k, v in example.items()}


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
