"""Selective copying and induction heads (Gu & Dao 2023, "Mamba", sec. 4.1.1 and 4.1.2).

Selective copying: ``num_tokens`` data tokens sit at random positions of a region of
``seq_len - num_tokens`` filler tokens; then ``num_tokens`` marker tokens follow, and the
target at the j-th marker is the j-th data token. Ids: 0 padding, 1 filler, 2 marker, data
tokens [3, vocab_size).

Induction heads: random tokens, with a trigger token placed once at a random position and
followed by a random token x; the last position holds the trigger again and its target is x.
Ids: 0 padding, 1 trigger, ordinary tokens [2, vocab_size). Only the last position is scored.

Variable lengths (both tasks; ``min_len`` > 0, ``length_dist``, see
:mod:`effseq.data.synthetic.source`): an example of length n is the task laid out over n
positions (copying: the tokens in the first n - num_tokens, the markers at the end of the n,
so min_len >= 2 * num_tokens; induction heads: the query at position n - 1, min_len >= 3),
then padding. Default 0: every example ``seq_len`` long, exactly as without the option.
"""

from __future__ import annotations

import numpy as np

from effseq.data import base
from effseq.data.synthetic import source

COPY_NAME = "synthetic/selective_copy"
INDUCTION_NAME = "synthetic/induction_heads"
FILLER, MARKER, TRIGGER = 1, 2, 1
COPY_DEFAULTS = {
    "seq_len": 256,
    "vocab_size": 16,
    "num_tokens": 16,
    **source.LENGTH_DEFAULTS,
    **source.COMMON_DEFAULTS,
}
INDUCTION_DEFAULTS = {
    "seq_len": 256,
    "vocab_size": 16,
    **source.LENGTH_DEFAULTS,
    **source.COMMON_DEFAULTS,
}


def _lengths(min_len, length_dist) -> dict:
    """The generator's length options: none at the default (the fixed-length generator)."""
    return {"min_len": min_len, "length_dist": length_dist} if min_len else {}


def _check_copy(
    seq_len: int, vocab_size: int, num_tokens: int, min_len=0, length_dist="uniform"
) -> None:
    base.check_int("seq_len", seq_len, 2)
    base.check_int("vocab_size", vocab_size, 4)
    base.check_int("num_tokens", num_tokens)
    if 2 * num_tokens > seq_len:
        raise ValueError(
            f"option num_tokens={num_tokens} needs seq_len >= {2 * num_tokens} (the tokens and "
            f"as many markers), got seq_len={seq_len}"
        )
    source.check_lengths(
        seq_len, min_len, length_dist, 2 * num_tokens, f"num_tokens={num_tokens} and markers"
    )


def copy_info(
    seq_len, vocab_size, num_tokens, min_len, length_dist, num_examples, num_eval_examples, seed
):
    _check_copy(seq_len, vocab_size, num_tokens, min_len, length_dist)
    return base.TaskInfo(COPY_NAME, vocab_size, None, vocab_size, seq_len, sequence_labels=True)


def make_copy(
    rng: np.random.Generator, count, seq_len, vocab_size, num_tokens, min_len=0, length_dist=""
):
    """``count`` examples at once."""
    if min_len:
        lengths = source.draw_lengths(rng, count, seq_len, min_len, length_dist)
        region = (lengths - num_tokens)[:, None]  # (count, 1): each row's token region
        tokens = rng.integers(3, vocab_size, (count, num_tokens))
        inputs = np.full((count, seq_len), FILLER, np.int64)
        draws = rng.random((count, seq_len - num_tokens))
        draws[np.arange(seq_len - num_tokens)[None, :] >= region] = np.inf  # beyond the region
        positions = np.sort(np.argsort(draws, axis=1)[:, :num_tokens], axis=1)
        rows = np.arange(count)[:, None]
        inputs[rows, positions] = tokens
        markers = region + np.arange(num_tokens)[None, :]
        inputs[rows, markers] = MARKER
        label = np.zeros((count, seq_len), np.int64)
        label[rows, markers] = tokens
        weights = np.zeros((count, seq_len))
        weights[rows, markers] = 1.0
        return source.pad_after(source.labelled(inputs, label, weights), lengths)
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
    split,
    data_dir,
    seq_len,
    vocab_size,
    num_tokens,
    min_len,
    length_dist,
    num_examples,
    num_eval_examples,
    seed,
):
    del data_dir  # generated, no files
    _check_copy(seq_len, vocab_size, num_tokens, min_len, length_dist)
    return source.dataset(
        make_copy,
        split,
        num_examples,
        num_eval_examples,
        seed,
        seq_len=seq_len,
        vocab_size=vocab_size,
        num_tokens=num_tokens,
        **_lengths(min_len, length_dist),
    )


def _check_induction(seq_len: int, vocab_size: int, min_len=0, length_dist="uniform") -> None:
    base.check_int("seq_len", seq_len, 3)
    base.check_int("vocab_size", vocab_size, 3)
    source.check_lengths(seq_len, min_len, length_dist, 3, "a trigger, its successor, the query")


def induction_info(
    seq_len, vocab_size, min_len, length_dist, num_examples, num_eval_examples, seed
):
    _check_induction(seq_len, vocab_size, min_len, length_dist)
    return base.TaskInfo(
        INDUCTION_NAME, vocab_size, None, vocab_size, seq_len, sequence_labels=True
    )


def make_induction(rng: np.random.Generator, count, seq_len, vocab_size, min_len=0, length_dist=""):
    """``count`` examples at once."""
    if min_len:
        lengths = source.draw_lengths(rng, count, seq_len, min_len, length_dist)
        inputs = rng.integers(2, vocab_size, (count, seq_len))
        rows = np.arange(count)
        at = rng.integers(0, lengths - 2)  # the trigger and its successor fit before the end
        inputs[rows, at] = TRIGGER
        inputs[rows, lengths - 1] = TRIGGER
        label = np.zeros((count, seq_len), np.int64)
        label[rows, lengths - 1] = inputs[rows, at + 1]
        weights = np.zeros((count, seq_len))
        weights[rows, lengths - 1] = 1.0
        return source.pad_after(source.labelled(inputs, label, weights), lengths)
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


def induction_load(
    split,
    data_dir,
    seq_len,
    vocab_size,
    min_len,
    length_dist,
    num_examples,
    num_eval_examples,
    seed,
):
    del data_dir  # generated, no files
    _check_induction(seq_len, vocab_size, min_len, length_dist)
    return source.dataset(
        make_induction,
        split,
        num_examples,
        num_eval_examples,
        seed,
        seq_len=seq_len,
        vocab_size=vocab_size,
        **_lengths(min_len, length_dist),
    )
