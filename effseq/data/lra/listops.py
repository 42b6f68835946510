"""LRA ListOps (Tay et al. 2021, "Long Range Arena", sec. 3.1; Nangia & Bowman 2018).

Files: ``listops-1000/basic_{train,val,test}.tsv``, a ``Source<TAB>Target`` header, then one
bracketed expression and its value (0-9) per line. Parentheses only render the generator's
binary tree and carry no information, so they are dropped; the rest are tokens.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from effseq.data import base

NAME = "lra/listops"
FOLDER = "listops-1000"
HEADER = b"Source\tTarget"
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
# id 0 is padding; digits 1..10, operators 11..14, the closing bracket 15.
VOCAB = {**{str(d): d + 1 for d in range(10)}, **{op: 11 + i for i, op in enumerate(OPERATORS)}}
VOCAB[END] = 15
VOCAB_SIZE = 16
NUM_CLASSES = 10
DEFAULTS = {"max_length": 2048}
HOW_TO = (
    base.LRA_HOW_TO + " Or generate it offline: "
    "effseq.data.generators.generate_listops('<data_dir>/listops-1000', num_train, num_val, "
    "num_test) or `effseq data generate --task lra/listops --out <data_dir>/listops-1000`."
)


def files(split: str) -> list[str]:
    return [f"{FOLDER}/basic_{split}.tsv"]


def info(max_length: int) -> base.TaskInfo:
    base.check_int("max_length", max_length)
    return base.TaskInfo(NAME, VOCAB_SIZE, None, NUM_CLASSES, max_length)


def tokenize(source: str) -> list[int]:
    """A rendered expression -> token ids; KeyError on an unknown token."""
    return [VOCAB[tok] for tok in source.split() if tok not in ("(", ")")]


def parse_row(line: bytes, path, lineno: int, max_length: int) -> dict[str, np.ndarray]:
    fields = line.decode("utf-8", errors="replace").split("\t")
    if len(fields) != 2:
        raise base.malformed(path, lineno, f"expected 2 tab-separated fields, got {len(fields)}")
    source, target = fields
    try:
        ids = tokenize(source)
    except KeyError as e:
        raise base.malformed(path, lineno, f"unknown token {e.args[0]!r}") from None
    if not target.strip().isdigit() or not 0 <= int(target) < NUM_CLASSES:
        raise base.malformed(path, lineno, f"target must be 0-9, got {target!r}")
    inputs, mask = base.pad_tokens(np.asarray(ids, np.int32), max_length)
    return {"inputs": inputs, "mask": mask, "label": np.int32(int(target))}


def load(split: str, data_dir, max_length: int) -> grain.MapDataset:
    root = base.resolve_data_dir(NAME, data_dir, files(split))
    (path,) = base.require_paths(NAME, root, files(split), HOW_TO)
    source = base.LineSource(path, functools.partial(parse_row, max_length=max_length), skip=1)
    header = base.read_line(path, source.offsets, 0)
    if header.strip() != HEADER:
        raise base.malformed(path, 1, f"expected the header {HEADER!r}, got {header[:40]!r}")
    return base.source_dataset(source)
