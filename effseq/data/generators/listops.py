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


def _tree(rng: random.Random, depth: int, out: list[str]) -> tuple[int, int]:
    """Appends one node's rendering to ``out``; returns (value, length without parentheses)."""
    if depth >= MAX_DEPTH or rng.random() >= OPERATOR_P:
        value = rng.randrange(10)
        out.append(str(value))
        return value, 1
    num_args = rng.randint(2, MAX_ARGS)
    op = rng.choice(OPERATORS)
    out.append("( " * (num_args + 1) + op)
    values, length = [], 2
    for _ in range(num_args):
        value, sub_length = _tree(rng, depth + 1, out)
        out.append(")")
        values.append(value)
        length += sub_length
    out.append("] )")
    return _EVALUATE[op](values), length


def sample_expression(rng: random.Random) -> tuple[str, int, int]:
    """One random expression: (rendering, value, length without parentheses)."""
    pieces: list[str] = []
    value, length = _tree(rng, 1, pieces)
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
            source, value, length = sample_expression(rng)
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
