"""Writers of tiny data sets in each official file format, for the data tests."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_lines(path: Path, lines: list[str], ending: str = "\r\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + ending for line in lines).encode("utf-8"))
    return path


def write_listops(root: Path, split: str, rows: list[tuple[str, str]]) -> Path:
    """``listops-1000/basic_<split>.tsv`` with the official header."""
    lines = ["Source\tTarget"] + [f"{s}\t{t}" for s, t in rows]
    return write_lines(root / "listops-1000" / f"basic_{split}.tsv", lines)


def write_imdb(root: Path, split: str, reviews: dict[str, list[str]]) -> None:
    """``aclImdb/<split>/{pos,neg}/<id>_<rating>.txt``; also an ``unsup`` folder to ignore."""
    for polarity, texts in reviews.items():
        folder = root / "aclImdb" / split / polarity
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            rating = 8 if polarity == "pos" else 2
            (folder / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    unsup = root / "aclImdb" / split / "unsup"
    unsup.mkdir(parents=True, exist_ok=True)
    (unsup / "0_0.txt").write_text("unlabelled", encoding="utf-8")


def write_aan(root: Path, file_split: str, rows: list[tuple[str, str, str, str, str]]) -> Path:
    """``tsv_data/new_aan_pairs.<file_split>.tsv``: no header, 5 columns."""
    lines = ["\t".join(row) for row in rows]
    return write_lines(root / "tsv_data" / f"new_aan_pairs.{file_split}.tsv", lines, "\n")


def write_cifar(root: Path, name: str, rgb: np.ndarray, labels: list[int]) -> None:
    """One CIFAR-10 python batch: rgb uint8 (n, 3, 32, 32)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batch = {b"data": rgb.reshape(len(rgb), -1), b"labels": list(labels), b"batch_label": b"x"}
    with open(folder / name, "wb") as f:
        pickle.dump(batch, f)


def write_pathfinder(
    root: Path, resolution: int, difficulty: str, batches: dict[int, list[tuple[np.ndarray, int]]]
) -> Path:
    """Official layout: imgs/<batch>/sample_<i>.png and metadata/<batch>.npy text lines."""
    directory = root / f"pathfinder{resolution}" / difficulty
    for batch, items in batches.items():
        lines = []
        for i, (pixels, label) in enumerate(items):
            folder = directory / "imgs" / str(batch)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"sample_{i}.png")
            lines.append(f"imgs/{batch} sample_{i}.png {i} {label} 14 1.5")
        write_lines(directory / "metadata" / f"{batch}.npy", lines, "\n")
    return directory


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """An IDX file of uint8 ``array`` (magic 0x0000 08 <ndim>, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path
