"""Pathfinder-like images (after Linsley et al. 2018; LRA sec. 3.6), in the official layout.

These are not the official Pathfinder images, only images of the same kind: a black square
with dashed curved contours, two of whose endpoints are marked with dots. The label is 1 when
the two dots sit at the two ends of one contour and 0 when they sit on two different contours.
Every image holds the same number of contours of the same length either way (two main
contours and ``num_distractors`` shorter ones), so only connectivity tells the classes apart.
Longer contours (``contour_length`` dashes) make the task harder, as in the original, whose
folders are named after it (6: curv_baseline, 9 and 14: curv_contour_length_{9,14}).

Contours are drawn with anti-aliasing: on a canvas ``SUPERSAMPLE`` times larger, then reduced.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SUPERSAMPLE = 4
MAX_TURN = math.pi / 6  # largest change of direction between consecutive dashes
DIFFICULTY_NAMES = {6: "curv_baseline", 9: "curv_contour_length_9", 14: "curv_contour_length_14"}


def difficulty_name(contour_length: int) -> str:
    return DIFFICULTY_NAMES.get(contour_length, f"curv_contour_length_{contour_length}")


def _contour(
    rng: np.random.Generator,
    size: float,
    num_dashes: int,
    step: float,
    margin: float,
    tries: int = 200,
) -> np.ndarray | None:
    """Vertices (num_dashes + 1, 2) of a smooth random walk that stays inside the square."""
    for _ in range(tries):
        point = rng.uniform(margin, size - margin, 2)
        heading = rng.uniform(0, 2 * math.pi)
        points = [point]
        for _ in range(num_dashes):
            heading += rng.uniform(-MAX_TURN, MAX_TURN)
            point = point + step * np.array([math.cos(heading), math.sin(heading)])
            if not (margin <= point[0] <= size - margin and margin <= point[1] <= size - margin):
                break
            points.append(point)
        else:
            return np.asarray(points)
    return None


def _draw_dashed(draw: ImageDraw.ImageDraw, points: np.ndarray, width: int) -> None:
    """Each segment drawn over its first 60%: dashes with gaps, as in Pathfinder."""
    for a, b in zip(points[:-1], points[1:], strict=True):
        end = a + 0.6 * (b - a)
        draw.line([tuple(a), tuple(end)], fill=255, width=width)


def render_image(
    rng: np.random.Generator, resolution: int, contour_length: int, label: int, num_distractors: int
) -> np.ndarray:
    """One uint8 (resolution, resolution) image whose endpoints are connected iff ``label``."""
    size = resolution * SUPERSAMPLE
    scale = resolution / 32
    step = 2.2 * scale * SUPERSAMPLE
    width = max(1, round(0.8 * scale * SUPERSAMPLE))
    radius = 1.3 * scale * SUPERSAMPLE
    margin = radius + width
    for _ in range(100):
        main = [_contour(rng, size, contour_length, step, margin) for _ in range(2)]
        extra = [
            _contour(rng, size, max(2, contour_length // 2), step, margin)
            for _ in range(num_distractors)
        ]
        if all(c is not None for c in main + extra):
            break
    else:
        raise ValueError(
            f"contour_length={contour_length} does not fit a {resolution}x{resolution} image; "
            "use a shorter contour or a larger resolution"
        )
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for contour in main + extra:
        _draw_dashed(draw, contour, width)
    ends = (main[0][0], main[0][-1]) if label else (main[0][0], main[1][-1])
    for x, y in ends:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    return np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX))


def generate_pathfinder(
    out_dir: str | os.PathLike,
    resolution: int = 32,
    num_images: int = 1000,
    contour_length: int = 14,
    seed: int = 0,
    *,
    num_distractors: int | None = None,
    images_per_batch: int = 1000,
    progress: bool = True,
) -> Path:
    """Writes pathfinder-like images under ``out_dir`` in the official layout; returns its folder.

    Layout: ``pathfinder{resolution}/{difficulty}/imgs/<batch>/sample_<i>.png`` and
    ``.../metadata/<batch>.npy``, a text file with one line per image:
    ``imgs/<batch> sample_<i>.png <i> <label> <contour_length> <num_distractors>`` (field 0 the
    subfolder, field 1 the file, field 3 the label, as the official metadata). Labels are
    balanced (half of each) in a seeded random order. Pass ``out_dir`` = the data_dir given to
    ``load_task("lra/pathfinder32", ...)`` (or 64, or pathx for 128).

    Args:
      resolution: image side in pixels (32, 64, 128, 256 match the LRA tasks).
      contour_length: dashes per main contour; 6, 9, 14 are written to the official folder
        names curv_baseline, curv_contour_length_9, curv_contour_length_14.
      num_distractors: extra unmarked contours of half length; default scales with the image
        side (1 at 32, 2 at 64, 4 at 128, ...).
      images_per_batch: images per ``imgs/<batch>`` folder and metadata file.
    """
    for name, value, low in (
        ("resolution", resolution, 8),
        ("num_images", num_images, 1),
        ("contour_length", contour_length, 2),
        ("images_per_batch", images_per_batch, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_distractors is None:
        num_distractors = max(1, resolution // 32)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images) % 2)
    root = Path(out_dir) / f"pathfinder{resolution}" / difficulty_name(contour_length)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {}
    for i in tqdm(range(num_images), desc=f"pathfinder{resolution}", disable=not progress):
        batch, label = i // images_per_batch, int(labels[i])
        folder = root / "imgs" / str(batch)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = render_image(rng, resolution, contour_length, label, num_distractors)
        Image.fromarray(pixels).save(folder / f"sample_{i}.png")
        lines.setdefault(batch, []).append(
            f"imgs/{batch} sample_{i}.png {i} {label} {contour_length} {num_distractors}"
        )
    for batch, batch_lines in lines.items():
        (root / "metadata" / f"{batch}.npy").write_text("\n".join(batch_lines) + "\n")
    return root
