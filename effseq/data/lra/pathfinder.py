"""LRA Pathfinder and Path-X (Tay et al. 2021, sec. 3.6; Linsley et al. 2018).

Files: ``pathfinder{res}/{difficulty}/metadata/<batch>.npy`` (despite the suffix, text: one
image per line, space-separated; field 0 the image's subfolder, field 1 its file name, field 3
the label) and the images ``pathfinder{res}/{difficulty}/<field 0>/<field 1>``, grayscale PNGs
of res x res, read when an example is accessed. Metadata files are taken in numeric order of
their batch number and lines in file order; the first 80% of that list is train, the next 10%
val, the last 10% test.
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np
from PIL import Image

from effseq.data import base

RESOLUTIONS = {
    "lra/pathfinder32": 32,
    "lra/pathfinder64": 64,
    "lra/pathx": 128,
    "lra/pathx256": 256,
}
DIFFICULTIES = ("curv_baseline", "curv_contour_length_9", "curv_contour_length_14")
DEFAULTS = {"difficulty": "curv_contour_length_14", "continuous": False}
SPLIT_FRACTIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
# An image of the official release that is blank (known to LRA users); it is left out.
KNOWN_BAD = {("pathfinder32", "curv_baseline", "imgs/0", "sample_172.png")}


def how_to(resolution: int) -> str:
    return (
        base.LRA_HOW_TO + " Or generate pathfinder-like images offline (not the official ones): "
        f"effseq.data.generators.generate_pathfinder('<data_dir>', resolution={resolution}, ...)."
    )


def folder(name: str, difficulty: str) -> str:
    return f"pathfinder{RESOLUTIONS[name]}/{difficulty}"


def info(name: str, difficulty: str, continuous: bool) -> base.TaskInfo:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"option difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    continuous = base.check_bool("continuous", continuous)
    vocab, dim = (None, 1) if continuous else (base.BYTE_VOCAB, None)
    return base.TaskInfo(name, vocab, dim, 2, RESOLUTIONS[name] ** 2)


def read_metadata(directory: Path) -> tuple[list[str], np.ndarray]:
    """All (image path relative to ``directory``, label) pairs, in the split's order."""
    meta_files = list((directory / "metadata").glob("*.npy"))
    try:
        meta_files.sort(key=lambda p: int(p.stem))
    except ValueError:
        bad = next(p for p in meta_files if not p.stem.isdigit())
        raise ValueError(f"{bad}: metadata files must be named <batch number>.npy") from None
    skip = {bad[2:] for bad in KNOWN_BAD if bad[:2] == (directory.parent.name, directory.name)}
    paths, labels = [], []
    for meta in meta_files:
        for lineno, line in enumerate(meta.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise base.malformed(
                    meta,
                    lineno,
                    "expected at least 4 space-separated fields with a 0/1 label "
                    f"in field 3, got {line[:80]!r}",
                )
            if (fields[0], fields[1]) in skip:
                continue
            paths.append(f"{fields[0]}/{fields[1]}")
            labels.append(int(fields[3]))
    return paths, np.asarray(labels, np.int32)


class PathfinderSource:
    """Images read from their PNG files on access."""

    def __init__(
        self,
        directory: Path,
        paths: list[str],
        labels: np.ndarray,
        resolution: int,
        continuous: bool,
    ):
        self.directory, self.paths, self.labels = directory, paths, labels
        self.resolution, self.continuous = resolution, continuous

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        path = self.directory / self.paths[index]
        if not path.exists():
            raise base.MissingDataError(f"{path}: image listed in the metadata is missing")
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        if pixels.shape != (self.resolution, self.resolution):
            raise ValueError(
                f"{path}: expected a {self.resolution}x{self.resolution} image, got {pixels.shape}"
            )
        example = base.pixel_example(pixels, self.continuous)
        example["label"] = np.int32(self.labels[index])
        return example


def load(name: str, split: str, data_dir, difficulty: str, continuous: bool) -> grain.MapDataset:
    resolution = RESOLUTIONS[name]
    relative = folder(name, difficulty)
    root = base.resolve_data_dir(name, data_dir, [f"{relative}/metadata", f"{relative}/imgs"])
    (directory, _) = base.require_paths(
        name, root, [f"{relative}/metadata", f"{relative}/imgs"], how_to(resolution)
    )
    directory = directory.parent
    paths, labels = read_metadata(directory)
    if not paths:
        raise base.MissingDataError(f"task {name!r}: no images listed in {directory}/metadata")
    lo, hi = SPLIT_FRACTIONS[split]
    start, stop = int(round(lo * len(paths))), int(round(hi * len(paths)))
    return base.source_dataset(
        PathfinderSource(directory, paths[start:stop], labels[start:stop], resolution, continuous)
    )
