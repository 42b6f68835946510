"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", sec. 3).

A sequence opens with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys
from one half of the vocabulary, distinct values from the other half). In the rest of the
sequence each key is queried once, at an even offset drawn without replacement from a power
law that favours short gaps (p(g) proportional to g^(power_a - 1), g = 1, 2, ..., as in
Zoology), and the target at the query position is the key's value. Other positions hold a
filler token and are not scored.

Ids: 0 padding (unused: sequences are full length), 1 the filler, keys
[2, 2 + (vocab_size - 2) // 2), values the rest up to vocab_size - 1. Zoology uses 0 as its
filler; it is shifted here because id 0 means padding in effseq.

Variable lengths (``min_len`` > 0, ``length_dist``; :mod:`effseq.data.synthetic.source`): an
example of length n has the same pairs, and its queries drawn over its own query region
(n - 2 * num_kv_pairs positions), so min_len >= 4 * num_kv_pairs. Default 0: every example
``seq_len`` long, exactly as without the option.
"""

from __future__ import annotations

import numpy as np

from effseq.data import base
from effseq.data.synthetic import source

NAME = "synthetic/mqar"
FILLER = 1
DEFAULTS = {
    "seq_len": 256,
    "vocab_size": 8192,
    "num_kv_pairs": 16,
    "power_a": 0.01,
    **source.LENGTH_DEFAULTS,
    **source.COMMON_DEFAULTS,
}


def _check(
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float,
    min_len: int = 0,
    length_dist: str = "uniform",
) -> None:
    base.check_int("seq_len", seq_len, 4)
    base.check_int("vocab_size", vocab_size, 4)
    base.check_int("num_kv_pairs", num_kv_pairs)
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"option num_kv_pairs={num_kv_pairs} needs seq_len >= {4 * num_kv_pairs} (the pairs, "
            f"then room for the queries), got seq_len={seq_len}"
        )
    if (vocab_size - 2) // 2 < num_kv_pairs:
        raise ValueError(
            f"option vocab_size={vocab_size} has {(vocab_size - 2) // 2} keys, fewer than "
            f"num_kv_pairs={num_kv_pairs}"
        )
    if not power_a > 0:
        raise ValueError(f"option power_a must be > 0, got {power_a!r}")
    source.check_lengths(
        seq_len, min_len, length_dist, 4 * num_kv_pairs, f"num_kv_pairs={num_kv_pairs}"
    )


def info(
    seq_len,
    vocab_size,
    num_kv_pairs,
    power_a,
    min_len,
    length_dist,
    num_examples,
    num_eval_examples,
    seed,
):
    _check(seq_len, vocab_size, num_kv_pairs, power_a, min_len, length_dist)
    return base.TaskInfo(NAME, vocab_size, None, vocab_size, seq_len, sequence_labels=True)


def make(
    rng: np.random.Generator,
    count,
    seq_len,
    vocab_size,
    num_kv_pairs,
    power_a,
    min_len=0,
    length_dist="uniform",
):
    """``count`` examples at once; with ``min_len``, lengths drawn from [min_len, seq_len],
    each with its own query region, padded after its length."""
    lengths = None
    if min_len:
        lengths = source.draw_lengths(rng, count, seq_len, min_len, length_dist)
    num_keys = (vocab_size - 2) // 2
    keys = source.distinct(rng, count, num_keys, num_kv_pairs) + 2
    values = source.distinct(rng, count, vocab_size - 2 - num_keys, num_kv_pairs) + 2 + num_keys
    context = 2 * num_kv_pairs
    inputs = np.full((count, seq_len), FILLER, np.int64)
    label = np.zeros((count, seq_len), np.int64)
    weights = np.zeros((count, seq_len))
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    space = (seq_len - context) // 2
    # Gaps without replacement with p(g) ~ g^(power_a - 1): the top num_kv_pairs of
    # log p + Gumbel noise, which draws exactly as sequential sampling with renormalisation.
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1, dtype=np.float64))
    noisy = log_p + rng.gumbel(size=(count, space))
    if lengths is not None:
        # Gaps beyond a row's own query region are never drawn (>= num_kv_pairs remain).
        noisy[np.arange(space)[None, :] >= ((lengths - context) // 2)[:, None]] = -np.inf
    gaps = np.argsort(-noisy, axis=1)[:, :num_kv_pairs]
    rows = np.arange(count)[:, None]
    positions = context + 2 * gaps
    inputs[rows, positions], label[rows, positions], weights[rows, positions] = keys, values, 1.0
    example = source.labelled(inputs, label, weights)
    return example if lengths is None else source.pad_after(example, lengths)


def load(
    split,
    data_dir,
    seq_len,
    vocab_size,
    num_kv_pairs,
    power_a,
    min_len,
    length_dist,
    num_examples,
    num_eval_examples,
    seed,
):
    del data_dir  # generated, no files
    _check(seq_len, vocab_size, num_kv_pairs, power_a, min_len, length_dist)
    return source.dataset(
        make,
        split,
        num_examples,
        num_eval_examples,
        seed,
        seq_len=seq_len,
        vocab_size=vocab_size,
        num_kv_pairs=num_kv_pairs,
        power_a=power_a,
        **({"min_len": min_len, "length_dist": length_dist} if min_len else {}),
    )
