"""Dataset statistics behind ``effseq data stats``: counts, real lengths, labels."""

from __future__ import annotations

import collections
import os

import numpy as np

from effseq.data.tasks import load_task, task_info

NUM_BINS = 10


def task_stats(name: str, split: str, data_dir: str | os.PathLike | None = None, **options) -> dict:
    """Reads every example of a split once and summarises it.

    Returns a dict: ``task``, ``split``, ``count``; ``length`` with ``min``, ``mean``, ``max``
    of the real lengths (``mask`` sums; for two-sequence tasks both documents) and a histogram
    ``bin_edges`` (NUM_BINS + 1 edges over [0, max_length]) / ``counts``; ``labels``, a dict
    label -> count (for sequence labelling, over the scored positions).
    """
    info = task_info(name, **options)
    dataset = load_task(name, split, data_dir=data_dir, **options)
    lengths, labels = [], collections.Counter()
    for i in range(len(dataset)):
        example = dataset[i]
        lengths.append(int(example["mask"].sum()))
        if "mask2" in example:
            lengths.append(int(example["mask2"].sum()))
        if info.sequence_labels:
            labels.update(example["label"][example["weights"] > 0].tolist())
        else:
            labels[int(example["label"])] += 1
    lengths = np.asarray(lengths, np.int64)
    counts, edges = np.histogram(lengths, bins=NUM_BINS, range=(0, info.max_length))
    return {
        "task": name,
        "split": split,
        "count": len(dataset),
        "length": {
            "min": int(lengths.min()) if lengths.size else 0,
            "mean": float(lengths.mean()) if lengths.size else 0.0,
            "max": int(lengths.max()) if lengths.size else 0,
            "bin_edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts],
        },
        "labels": dict(sorted(labels.items())),
    }


def format_stats(stats: dict) -> str:
    """A plain-text report of ``task_stats``' result."""
    length = stats["length"]
    lines = [
        f"{stats['task']} [{stats['split']}]: {stats['count']} examples",
        f"length: min {length['min']}, mean {length['mean']:.1f}, max {length['max']}",
        "length histogram:",
    ]
    peak = max(length["counts"]) or 1
    edges = length["bin_edges"]
    for lo, hi, count in zip(edges[:-1], edges[1:], length["counts"], strict=True):
        bar = "#" * round(30 * count / peak)
        lines.append(f"  [{lo:8.0f}, {hi:8.0f})  {count:8d}  {bar}")
    total = sum(stats["labels"].values()) or 1
    lines.append("labels:")
    for label, count in stats["labels"].items():
        lines.append(f"  {label:>6}  {count:8d}  {100 * count / total:5.1f}%")
    return "\n".join(lines)
