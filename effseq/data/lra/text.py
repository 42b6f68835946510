"""LRA Text: IMDB sentiment at the byte level (Tay et al. 2021, sec. 3.2; Maas et al. 2011).

Files: the standard ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` (``unsup/`` is
ignored). Each review is its UTF-8 bytes, token = byte + 1, truncated to ``max_length``
(LRA's own config used 1000; the default here is 4096). Label 1 = pos, 0 = neg.

IMDB has no validation split. LRA evaluated on the test set; with ``val_fraction=0`` (the
default) "val" is the test set, as there. ``val_fraction > 0`` instead holds out that fraction
of the training reviews (a fixed seeded selection) as "val" and trains on the rest.
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from effseq.data import base

NAME = "lra/text"
FOLDER = "aclImdb"
DEFAULTS = {"max_length": 4096, "val_fraction": 0.0}
HOW_TO = (
    "Download the Large Movie Review Dataset (aclImdb_v1.tar.gz, ai.stanford.edu/~amaas/data/"
    "sentiment/), extract it and pass data_dir=<the folder holding aclImdb/> or set "
    "$EFFSEQ_DATA_DIR."
)
_HOLDOUT_SEED = 0


def info(max_length: int, val_fraction: float) -> base.TaskInfo:
    base.check_int("max_length", max_length)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"option val_fraction must be in [0, 1), got {val_fraction!r}")
    return base.TaskInfo(NAME, base.BYTE_VOCAB, None, 2, max_length)


class ReviewSource:
    """Reviews read from their files on access; holds only paths and labels."""

    def __init__(self, paths: list[Path], labels: np.ndarray, max_length: int):
        self.paths, self.labels, self.max_length = paths, labels, max_length

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        inputs, mask = base.byte_tokens(self.paths[index].read_bytes(), self.max_length)
        return {"inputs": inputs, "mask": mask, "label": np.int32(self.labels[index])}


def _list_reviews(root: Path, folder: str) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for label, polarity in ((0, "neg"), (1, "pos")):
        found = sorted((root / FOLDER / folder / polarity).glob("*.txt"))
        if not found:
            raise base.MissingDataError(
                f"task {NAME!r}: no *.txt reviews in {root / FOLDER / folder / polarity}. "
                f"How to get them: {HOW_TO}"
            )
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, np.int32)


def load(split: str, data_dir, max_length: int, val_fraction: float) -> grain.MapDataset:
    expected = [f"{FOLDER}/{s}/{p}" for s in ("train", "test") for p in ("neg", "pos")]
    root = base.resolve_data_dir(NAME, data_dir, expected)
    folder = "train" if split == "train" or (split == "val" and val_fraction > 0) else "test"
    base.require_paths(NAME, root, [f"{FOLDER}/{folder}/{p}" for p in ("neg", "pos")], HOW_TO)
    paths, labels = _list_reviews(root, folder)
    if folder == "train" and val_fraction > 0:
        order = np.random.default_rng(_HOLDOUT_SEED).permutation(len(paths))
        num_val = int(round(val_fraction * len(paths)))
        keep = np.sort(order[:num_val] if split == "val" else order[num_val:])
        paths, labels = [paths[i] for i in keep], labels[keep]
    return base.source_dataset(ReviewSource(paths, labels, max_length))
