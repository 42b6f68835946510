"""Sequential (and permuted) MNIST / Fashion-MNIST from IDX files (LeCun et al. 1998).

Files, gzipped or not: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]`` in ``<data_dir>/mnist`` or
``<data_dir>/fashion_mnist``. Without that folder Fashion-MNIST is read from
``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package puts the
gzipped files. Train is the first 55,000 of the 60,000 training images (the first 11/12), val
the rest, test the 10,000 test images.

Each 28x28 image is read row by row as 784 steps, by default continuous float32 (784, 1) in
[-1, 1]; ``permuted=True`` applies one fixed permutation (seeded by ``permutation_seed``) to the
pixel order, as in permuted sequential MNIST (Le et al. 2015).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import grain
import numpy as np

from effseq.data import base
from effseq.data.lra.image import ImageSource

FOLDERS = {"image/mnist": "mnist", "image/fashion_mnist": "fashion_mnist"}
SYSTEM_DIRS = {"image/fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
PREFIXES = {"train": "train", "val": "train", "test": "t10k"}
DEFAULTS = {"permuted": False, "permutation_seed": 0, "continuous": True}
TRAIN_FRACTION = 11 / 12
HOW_TO = {
    "image/mnist": "Put the four MNIST IDX files (yann.lecun.com/exdb/mnist/) in <data_dir>/mnist.",
    "image/fashion_mnist": (
        "Install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) "
        "or put the four IDX files from github.com/zalandoresearch/fashion-mnist in "
        "<data_dir>/fashion_mnist."
    ),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def info(name: str, permuted: bool, permutation_seed: int, continuous: bool) -> base.TaskInfo:
    base.check_bool("permuted", permuted)
    base.check_int("permutation_seed", permutation_seed, minimum=0)
    vocab, dim = (None, 1) if base.check_bool("continuous", continuous) else (base.BYTE_VOCAB, None)
    return base.TaskInfo(name, vocab, dim, 10, 784)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped if its name ends in .gz) as an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
    dtype = np.dtype(_DTYPES[data[2]])
    if len(data) - header != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(
            f"{path}: header declares shape {shape}, but the file holds {len(data) - header} "
            "bytes of data"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    return None


def _directory(name: str, data_dir) -> Path:
    stems = [
        f"{p}-{kind}"
        for p in ("train", "t10k")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    system = SYSTEM_DIRS.get(name)
    candidates = []
    if data_dir is not None or os.environ.get(base.ENV_VAR):
        candidates.append(base.resolve_data_dir(name, data_dir, []) / FOLDERS[name])
    if system is not None:
        candidates.append(system)
    for directory in candidates:
        if all(_find(directory, s) for s in stems):
            return directory
    listing = "\n".join(
        f"  {d}/{s}[.gz]"
        for d in (candidates or [Path("<data_dir>") / FOLDERS[name]])
        for s in stems
    )
    raise base.MissingDataError(
        f"task {name!r}: IDX files not found. Expected:\n{listing}\nHow to get them: "
        f"{HOW_TO[name]} data_dir defaults to ${base.ENV_VAR}."
    )


def load(
    name: str, split: str, data_dir, permuted: bool, permutation_seed: int, continuous: bool
) -> grain.MapDataset:
    directory = _directory(name, data_dir)
    prefix = PREFIXES[split]
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (n, 28, 28), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels, got shape {labels.shape}"
        )
    if split != "test":
        num_train = int(round(TRAIN_FRACTION * len(labels)))
        part = slice(0, num_train) if split == "train" else slice(num_train, None)
        images, labels = images[part], labels[part]
    images = images.reshape(len(images), -1)
    if permuted:
        images = images[:, np.random.default_rng(permutation_seed).permutation(784)]
    return base.source_dataset(ImageSource(images, labels.astype(np.int32), continuous))
