"""ListOps expressions as specified by the LRA generator (Tay et al. 2021, sec. 3.1).

A tree is drawn top-down from depth 1: below the maximum depth (10) a node is an operator with
probability 0.25, otherwise a digit 0-9; an operator (MIN, MAX, MED = median truncated to an
int, SM = sum mod 10) takes 2-10 arguments. Its length counts operators, digits and closing
brackets (not parentheses); a tree is kept when min_length < length < max_length and its
rendering has not been seen before.

The rendering is LRA's: an operator node with arguments a1..ak is the left-nested binary tree
(((op, a1), a2), ..., ak), "]"), each pair written "( x y )", e.g. "( ( ( [MAX 2 ) 9 ) ] )".
Files are tab-separated with a ``Source<TAB>Target`` header and csv's "\\r\\n" line ends, as
the official files were written.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
MAX_DEPTH = 10
MAX_ARGS = 10
OPERATOR_P = 0.25
_EVALUATE = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda args: int(np.median(args)),
    "[SM": lambda args: sum(args) % 10,
}


class _TooLong(Exception):
    """Raised as soon as a tree being drawn exceeds the length limit."""


def _tree(rng: random.Random, depth: int, out: list[str], budget: list[int]) -> tuple[int, int]:
    """Appends one node's rendering to ``out``; returns (value, length without parentheses).

    ``budget[0]`` is the length still allowed; drawing stops with ``_TooLong`` once it is
    spent, so trees that the length window will reject are not drawn to the end (they grow
    without bound in expectation below the maximum depth).
    """
    if depth >= MAX_DEPTH or rng.random() >= OPERATOR_P:
        value = rng.randrange(10)
        out.append(str(value))
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooLong
        return value, 1
    num_args = rng.randint(2, MAX_ARGS)
    op = rng.choice(OPERATORS)
    out.append("( " * (num_args + 1) + op)
    budget[0] -= 2
    values, length = [], 2
    for _ in range(num_args):
        value, sub_length = _tree(rng, depth + 1, out, budget)
        out.append(")")
        values.append(value)
        length += sub_length
    out.append("] )")
    return _EVALUATE[op](values), length


def sample_expression(rng: random.Random, max_length: float = float("inf")):
    """One random expression: (rendering, value, length without parentheses), or None when
    its length reaches ``max_length`` (it is then abandoned part-way)."""
    pieces: list[str] = []
    try:
        value, length = _tree(rng, 1, pieces, [max_length - 1])
    except _TooLong:
        return None
    return " ".join(pieces), value, length


def generate_listops(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    *,
    progress: bool = True,
    max_attempts: int | None = None,
) -> dict[str, Path]:
    """Writes ``basic_{train,val,test}.tsv`` to ``out_dir``; returns the paths by split.

    For ``effseq.data.load_task("lra/listops", ...)`` write into ``<data_dir>/listops-1000``.
    The LRA sizes are 96,000 / 2,000 / 2,000 with lengths in (500, 2000); smaller lengths give
    CPU-sized variants. Expressions are unique across all three files, assigned to the splits
    in the order drawn. ``max_attempts`` (default 1000 draws per expression) bounds the search
    when the length window admits few distinct expressions.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"num_{name} must be a non-negative int, got {count!r}")
    if not 0 <= min_length < max_length - 1:
        raise ValueError(
            "need 0 <= min_length < max_length - 1 (lengths are strictly between them), got "
            f"min_length={min_length}, max_length={max_length}"
        )
    total = sum(counts.values())
    max_attempts = 1000 * max(total, 1) if max_attempts is None else max_attempts
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    attempts = 0
    with tqdm(total=total, desc="listops", disable=not progress) as bar:
        while len(rows) < total:
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(
                    f"found only {len(rows)} of {total} distinct expressions with length in "
                    f"({min_length}, {max_length}) after {max_attempts} draws; widen the window"
                )
            drawn = sample_expression(rng, max_length)
            if drawn is None:
                continue
            source, value, length = drawn
            if min_length < length < max_length and source not in seen:
                seen.add(source)
                rows.append((source, value))
                bar.update(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for split, count in counts.items():
        paths[split] = out / f"basic_{split}.tsv"
        with open(paths[split], "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["Source", "Target"])
            writer.writerows(rows[start : start + count])
        start += count
    return paths
