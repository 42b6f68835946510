"""Selective copying and induction heads (Gu & Dao 2023, "Mamba", sec. 4.1.1 and 4.1.2).

Selective copying: ``num_tokens`` data tokens sit at random positions of a region of
``seq_len - num_tokens`` filler tokens; then ``num_tokens`` marker tokens follow, and the
target at the j-th marker is the j-th data token. Ids: 0 padding, 1 filler, 2 marker, data
tokens [3, vocab_size).

Induction heads: random tokens, with a trigger token placed once at a random position and
followed by a random token x; the last position holds the trigger again and its target is x.
Ids: 0 padding, 1 trigger, ordinary tokens [2, vocab_size). Only the last position is scored.
"""

from __future__ import annotations

import numpy as np

from effseq.data import base
from effseq.data.synthetic import source

COPY_NAME = "synthetic/selective_copy"
INDUCTION_NAME = "synthetic/induction_heads"
FILLER, MARKER, TRIGGER = 1, 2, 1
COPY_DEFAULTS = {"seq_len": 256, "vocab_size": 16, "num_tokens": 16, **source.COMMON_DEFAULTS}
INDUCTION_DEFAULTS = {"seq_len": 256, "vocab_size": 16, **source.COMMON_DEFAULTS}


def _check_copy(seq_len: int, vocab_size: int, num_tokens: int) -> None:
    base.check_int("seq_len", seq_len, 2)
    base.check_int("vocab_size", vocab_size, 4)
    base.check_int("num_tokens", num_tokens)
    if 2 * num_tokens > seq_len:
        raise ValueError(
            f"option num_tokens={num_tokens} needs seq_len >= {2 * num_tokens} (the tokens and "
            f"as many markers), got seq_len={seq_len}"
        )


def copy_info(seq_len, vocab_size, num_tokens, num_examples, num_eval_examples, seed):
    _check_copy(seq_len, vocab_size, num_tokens)
    return base.TaskInfo(COPY_NAME, vocab_size, None, vocab_size, seq_len, sequence_labels=True)


def make_copy(rng: np.random.Generator, count, seq_len, vocab_size, num_tokens):
    """``count`` examples at once."""
    region = seq_len - num_tokens
    tokens = rng.integers(3, vocab_size, (count, num_tokens))
    inputs = np.full((count, seq_len), FILLER, np.int64)
    positions = np.sort(source.distinct(rng, count, region, num_tokens), axis=1)
    inputs[np.arange(count)[:, None], positions] = tokens
    inputs[:, region:] = MARKER
    label = np.zeros((count, seq_len), np.int64)
    label[:, region:] = tokens
    weights = np.zeros((count, seq_len))
    weights[:, region:] = 1.0
    return source.labelled(inputs, label, weights)


def copy_load(
    split, data_dir, seq_len, vocab_size, num_tokens, num_examples, num_eval_examples, seed
):
    del data_dir  # generated, no files
    _check_copy(seq_len, vocab_size, num_tokens)
    return source.dataset(
        make_copy,
        split,
        num_examples,
        num_eval_examples,
        seed,
        seq_len=seq_len,
        vocab_size=vocab_size,
        num_tokens=num_tokens,
    )


def _check_induction(seq_len: int, vocab_size: int) -> None:
    base.check_int("seq_len", seq_len, 3)
    base.check_int("vocab_size", vocab_size, 3)


def induction_info(seq_len, vocab_size, num_examples, num_eval_examples, seed):
    _check_induction(seq_len, vocab_size)
    return base.TaskInfo(
        INDUCTION_NAME, vocab_size, None, vocab_size, seq_len, sequence_labels=True
    )


def make_induction(rng: np.random.Generator, count, seq_len, vocab_size):
    """``count`` examples at once."""
    inputs = rng.integers(2, vocab_size, (count, seq_len))
    rows = np.arange(count)
    at = rng.integers(0, seq_len - 2, count)  # the trigger and its successor fit before the end
    inputs[rows, at] = TRIGGER
    inputs[:, -1] = TRIGGER
    label = np.zeros((count, seq_len), np.int64)
    label[:, -1] = inputs[rows, at + 1]
    weights = np.zeros((count, seq_len))
    weights[:, -1] = 1.0
    return source.labelled(inputs, label, weights)


def induction_load(split, data_dir, seq_len, vocab_size, num_examples, num_eval_examples, seed):
    del data_dir  # generated, no files
    _check_induction(seq_len, vocab_size)
    return source.dataset(
        make_induction,
        split,
        num_examples,
        num_eval_examples,
        seed,
        seq_len=seq_len,
        vocab_size=vocab_size,
    )
