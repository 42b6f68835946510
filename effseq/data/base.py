"""Shared vocabulary of the data package: task metadata, options, data folders, errors, encoding.

Every example is a dict of numpy arrays with fixed shapes for a given task and options, so a
jitted step sees static shapes:

* token tasks: ``inputs`` int32 (t,) padded with 0 (id 0 is padding in every task), ``mask``
  bool (t,) True on real tokens; two-sequence tasks add ``inputs2`` and ``mask2``.
* continuous tasks: ``inputs`` float32 (t, c) with pixels mapped to [-1, 1]
  (``value / 127.5 - 1``), ``mask`` all True.
* classification: ``label`` int32 of shape ().
* sequence labelling: ``label`` int32 (t,) the target at each position, ``weights`` float32 (t,)
  1.0 where the position is scored.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

SPLITS = ("train", "val", "test")
ENV_VAR = "EFFSEQ_DATA_DIR"
PAD_ID = 0

LRA_HOW_TO = (
    "Download lra_release.gz (linked from the README of google-research/long-range-arena), "
    "extract it, and pass data_dir=<the extracted folder> or set $EFFSEQ_DATA_DIR."
)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a model needs to know about a task before any data is read.

    Attributes:
      name: the task's registered name, e.g. "lra/listops".
      vocab_size: number of token ids including the padding id 0; None for continuous inputs.
      input_dim: channels of continuous inputs; None for token inputs.
      num_classes: classes of ``label`` (for sequence labelling: the label vocabulary).
      max_length: t, the fixed length of ``inputs``.
      two_sequence: examples also carry ``inputs2`` / ``mask2`` (LRA Retrieval).
      sequence_labels: ``label`` has one entry per position, scored where ``weights`` is 1.
      splits: the split names ``load_task`` accepts.
    """

    name: str
    vocab_size: int | None
    input_dim: int | None
    num_classes: int
    max_length: int
    two_sequence: bool = False
    sequence_labels: bool = False
    splits: tuple[str, ...] = SPLITS


class MissingDataError(FileNotFoundError):
    """A task's files are not where they should be; the message says where and how to get them."""


def resolve_options(task: str, defaults: Mapping[str, Any], options: Mapping[str, Any]) -> dict:
    """Defaults overridden by ``options``; an unknown key raises ValueError naming it."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for task {task!r}; its options are {sorted(defaults)}"
        )
    return {**defaults, **options}


def check_split(task: str, split: str, splits: Sequence[str] = SPLITS) -> None:
    if split not in splits:
        raise ValueError(f"unknown split={split!r} for task {task!r}; choose one of {splits}")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= minimum, else ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"option {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"option {name} must be True or False, got {value!r}")
    return bool(value)


def resolve_data_dir(
    task: str, data_dir: str | os.PathLike | None, expected: Sequence[str]
) -> Path:
    """``data_dir``, else $EFFSEQ_DATA_DIR; neither set raises MissingDataError.

    Args:
      task: the task name, for the message.
      data_dir: the caller's folder, or None.
      expected: paths relative to the data folder that the task reads, for the message.
    """
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or None
    if data_dir is None:
        listing = "\n".join(f"  <data_dir>/{p}" for p in expected)
        raise MissingDataError(
            f"task {task!r} reads files, but no data_dir was given and ${ENV_VAR} is not set. "
            f"Pass data_dir= or set ${ENV_VAR} to a folder holding:\n{listing}"
        )
    return Path(data_dir).expanduser()


def require_paths(task: str, root: Path, relative: Sequence[str], how_to: str) -> list[Path]:
    """The paths ``root / relative``; any missing raises MissingDataError listing all of them."""
    paths = [root / p for p in relative]
    missing = [p for p in paths if not p.exists()]
    if missing:
        listing = "\n".join(f"  {p}{'  (missing)' if p in missing else ''}" for p in paths)
        raise MissingDataError(
            f"task {task!r}: {len(missing)} of its files are missing under {root}.\n"
            f"Expected:\n{listing}\nHow to get them: {how_to}"
        )
    return paths


def malformed(path: os.PathLike | str, line: int, why: str) -> ValueError:
    """The error for a bad row: names the file and the 1-based line number."""
    return ValueError(f"{path}:{line}: malformed row: {why}")


# ---------------------------------------------------------------------------------------------
# Encoding


def pad_tokens(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (n,) -> (inputs int32 (length,), mask bool (length,)): truncated, padded with 0."""
    ids = np.asarray(ids)[:length]
    inputs = np.zeros(length, np.int32)
    inputs[: ids.shape[0]] = ids
    mask = np.zeros(length, bool)
    mask[: ids.shape[0]] = True
    return inputs, mask


def byte_tokens(data: bytes, length: int) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes -> (inputs, mask) with token = byte + 1, so 0 stays the padding id."""
    ids = np.frombuffer(data[:length], np.uint8).astype(np.int32) + 1
    return pad_tokens(ids, length)


BYTE_VOCAB = 257  # 256 byte values shifted by one, plus the padding id


def pixel_example(pixels: np.ndarray, continuous: bool) -> dict[str, np.ndarray]:
    """uint8 pixels (h, w) or (t,) -> a flattened example, row by row.

    Tokens: pixel + 1 in [1, 256] (vocabulary 257 with padding). Continuous: float32 (t, 1) in
    [-1, 1]. The mask is all True: images have no padding.
    """
    flat = np.asarray(pixels, np.uint8).reshape(-1)
    if continuous:
        inputs = (flat.astype(np.float32) / 127.5 - 1.0)[:, None]
    else:
        inputs = flat.astype(np.int32) + 1
    return {"inputs": inputs, "mask": np.ones(flat.shape[0], bool)}


# ---------------------------------------------------------------------------------------------
# Line-indexed text files


def line_offsets(path: os.PathLike | str, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Byte offsets where each line of a file starts, plus the file size: int64 (lines + 1,).

    Line ``k`` (0-based) is ``data[offsets[k]:offsets[k + 1]]``. Scanning in chunks with numpy
    indexes files of hundreds of MB in seconds without holding them in memory, so rows can be
    read lazily and in any order.
    """
    ends = []
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            ends.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size + 1)
            size += len(chunk)
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if size and (ends.size == 0 or ends[-1] != size):  # last line has no newline
        ends = np.append(ends, size)
    return np.concatenate([[0], ends]).astype(np.int64)


def read_line(path: os.PathLike | str, offsets: np.ndarray, k: int) -> bytes:
    """Line ``k`` of an indexed file without its line ending (``\\n`` or ``\\r\\n``)."""
    start, stop = int(offsets[k]), int(offsets[k + 1])
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(stop - start).rstrip(b"\r\n")


# The plain source behind each dataset made by source_dataset (see there).
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def source_dataset(source) -> grain.MapDataset:
    """``grain.MapDataset.source(source)``, remembering ``source`` so that batching can read
    many rows from it directly (:func:`plain_source`): grain's per-item bookkeeping cost about
    25 us per example, half of reading a ListOps row."""
    dataset = grain.MapDataset.source(source)
    _SOURCES[dataset] = source
    return dataset


def validate(dataset: grain.MapDataset) -> None:
    """Checks every row of a dataset whose source can (``validate()``; text-file sources),
    raising the first malformed row's ``file:line`` error."""
    check = getattr(plain_source(dataset), "validate", None)
    if check is not None:
        check()


def plain_source(dataset: grain.MapDataset):
    """The source a dataset from :func:`source_dataset` reads, or None for any other."""
    return _SOURCES.get(dataset)


class LineSource:
    """Random-access rows of a text file, parsed on read: ``parse(line, path, lineno) -> example``.

    Holds only the path and the line offsets (no open file), so it pickles and is safe to read
    from several threads. ``skip`` leading lines (a header) are not rows; ``lineno`` passed to
    ``parse`` is the 1-based line number in the file, for error messages.
    """

    def __init__(self, path: os.PathLike | str, parse, skip: int = 0):
        self.path = Path(path)
        self.parse = parse
        self.skip = skip
        self.offsets = line_offsets(self.path)
        if len(self.offsets) - 1 < skip:
            raise malformed(self.path, 1, f"expected {skip} header line(s), the file is empty")

    def __len__(self) -> int:
        return len(self.offsets) - 1 - self.skip

    def line(self, index: int) -> bytes:
        return read_line(self.path, self.offsets, index + self.skip)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows of {self.path}")
        return self.parse(self.line(index), self.path, index + self.skip + 1)

    def validate(self, block: int = 4096) -> None:
        """Parses every row once (and drops them), so a malformed row fails, naming its file
        and line, when the data is loaded rather than when training reaches it."""
        for start in range(0, len(self), block):
            self.rows(start, min(start + block, len(self)))

    def rows(self, start: int, stop: int) -> list[dict[str, np.ndarray]]:
        """Rows ``start`` to ``stop - 1`` parsed, from one read of the file."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(
                f"rows {start}:{stop} out of range for {len(self)} rows of {self.path}"
            )
        first, last = start + self.skip, stop + self.skip
        base = int(self.offsets[first])
        with open(self.path, "rb") as f:
            f.seek(base)
            data = f.read(int(self.offsets[last]) - base)
        return [
            self.parse(
                data[self.offsets[k] - base : self.offsets[k + 1] - base].rstrip(b"\r\n"),
                self.path,
                k + 1,
            )
            for k in range(first, last)
        ]
