"""LRA Image: grayscale CIFAR-10 as a sequence of 1024 pixels (Tay et al. 2021, sec. 3.5).

Files: the standard ``cifar-10-batches-py/data_batch_{1..5}`` and ``test_batch`` pickles.
Train is the first 90% of the training images (45,000 of the official 50,000), val the last
10% (the second half of ``data_batch_5``), test the 10,000 test images. Pixels are converted
to grayscale with the ITU-R 601 luma weights (as ``tf.image.rgb_to_grayscale``, which LRA
used) and rounded to uint8, then read row by row: tokens (pixel + 1, vocabulary 257) or,
with ``continuous=True``, float32 (1024, 1) in [-1, 1].
"""

from __future__ import annotations

import pickle

import grain
import numpy as np

from effseq.data import base

NAME = "lra/image"
FOLDER = "cifar-10-batches-py"
DEFAULTS = {"continuous": False}
TRAIN_FRACTION = 0.9
NUM_CLASSES = 10
LUMA = np.asarray([0.2989, 0.5870, 0.1140], np.float32)
HOW_TO = (
    "Download the CIFAR-10 python version (cifar-10-python.tar.gz, www.cs.toronto.edu/~kriz/"
    "cifar.html), extract it and pass data_dir=<the folder holding cifar-10-batches-py/> or set "
    "$EFFSEQ_DATA_DIR."
)


def files(split: str) -> list[str]:
    if split == "test":
        return [f"{FOLDER}/test_batch"]
    return [f"{FOLDER}/data_batch_{i}" for i in range(1, 6)]


def info(continuous: bool) -> base.TaskInfo:
    continuous = base.check_bool("continuous", continuous)
    vocab, dim = (None, 1) if continuous else (base.BYTE_VOCAB, None)
    return base.TaskInfo(NAME, vocab, dim, NUM_CLASSES, 1024)


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """uint8 (b, 3, h, w) -> uint8 (b, h, w), luma rounded to the nearest level."""
    gray = np.tensordot(LUMA, rgb.astype(np.float32), axes=([0], [1]))
    return np.clip(np.round(gray), 0, 255).astype(np.uint8)


def _read_batch(path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
            data, labels = batch[b"data"], batch[b"labels"]
        except Exception as e:  # any unpickling failure means the file is not a CIFAR batch
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({e!r})") from None
    data = np.asarray(data, np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise ValueError(f"{path}: expected data (n, 3072) and n labels, got {data.shape}")
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path}: image {i} (0-based) has label {labels[i]}, outside 0-{NUM_CLASSES - 1} "
            f"({bad.size} such labels in the file)"
        )
    return grayscale(data.reshape(-1, 3, 32, 32)), labels.astype(np.int32)


class ImageSource:
    """In-memory grayscale images (n, h, w) uint8 and labels (n,), encoded on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, continuous: bool):
        self.images, self.labels, self.continuous = images, labels, continuous

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = base.pixel_example(self.images[index], self.continuous)
        example["label"] = np.int32(self.labels[index])
        return example


def load(split: str, data_dir, continuous: bool) -> grain.MapDataset:
    root = base.resolve_data_dir(NAME, data_dir, files(split))
    paths = base.require_paths(NAME, root, files(split), HOW_TO)
    parts = [_read_batch(p) for p in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if split != "test":
        num_train = int(round(TRAIN_FRACTION * len(labels)))
        part = slice(0, num_train) if split == "train" else slice(num_train, None)
        images, labels = images[part], labels[part]
    return base.source_dataset(ImageSource(images, labels, continuous))
