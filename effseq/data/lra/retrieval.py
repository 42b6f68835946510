"""LRA Retrieval: do two ACL Anthology papers cite each other? (Tay et al. 2021, sec. 3.3).

Files: ``tsv_data/new_aan_pairs.{train,eval,test}.tsv`` ("eval" is read as "val"), no header,
five tab-separated columns: label, id1, id2, text1, text2. Each text is its UTF-8 bytes,
token = byte + 1, truncated to ``max_length`` (4000 in LRA). Rows are indexed by byte offset
when loading and parsed when read, since the training file is large.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from effseq.data import base

NAME = "lra/retrieval"
FOLDER = "tsv_data"
FILE_SPLITS = {"train": "train", "val": "eval", "test": "test"}
DEFAULTS = {"max_length": 4000}


def files(split: str) -> list[str]:
    return [f"{FOLDER}/new_aan_pairs.{FILE_SPLITS[split]}.tsv"]


def info(max_length: int) -> base.TaskInfo:
    base.check_int("max_length", max_length)
    return base.TaskInfo(NAME, base.BYTE_VOCAB, None, 2, max_length, two_sequence=True)


def parse_row(line: bytes, path, lineno: int, max_length: int) -> dict[str, np.ndarray]:
    fields = line.split(b"\t")
    if len(fields) != 5:
        raise base.malformed(path, lineno, f"expected 5 tab-separated fields, got {len(fields)}")
    try:
        label = float(fields[0])
    except ValueError:
        label = -1.0
    if label not in (0.0, 1.0):
        raise base.malformed(path, lineno, f"label must be 0 or 1, got {fields[0][:20]!r}")
    inputs, mask = base.byte_tokens(fields[3], max_length)
    inputs2, mask2 = base.byte_tokens(fields[4], max_length)
    return {
        "inputs": inputs,
        "mask": mask,
        "inputs2": inputs2,
        "mask2": mask2,
        "label": np.int32(label),
    }


def load(split: str, data_dir, max_length: int) -> grain.MapDataset:
    root = base.resolve_data_dir(NAME, data_dir, files(split))
    (path,) = base.require_paths(NAME, root, files(split), base.LRA_HOW_TO)
    return base.source_dataset(
        base.LineSource(path, functools.partial(parse_row, max_length=max_length))
    )
