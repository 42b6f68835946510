"""Trivial baselines of a task, computed from its data, for the rows beside every table.

Each baseline is fit on the training split and scored on the test split (validation where a
task has no test split), with the task's own weighting: one vote per example for
classification, one per scored position for sequence-labelling tasks such as MQAR.

- ``majority``: always predict the most frequent training label.
- ``root operator`` (ListOps): the best predictor that reads only the expression's outermost
  operator: per operator, the most frequent training label.
- ``guess in context`` (MQAR): pick uniformly among the values that the sequence's key-value
  pairs hold; its expected accuracy is the mean of 1 / (number of distinct values in context)
  over the scored positions, the plateau at which a model knows where the values are but not
  which key each belongs to (ln k loss for k pairs).

Returned as ``{"name", "accuracy", "split", "description"}`` dicts, accuracy a fraction.
"""

from __future__ import annotations

import numpy as np

from effseq.data import batches, load_task, task_defaults, task_info
from effseq.data.lra import listops
from effseq.data.synthetic import mqar


def _arrays(task: str, split: str, data_dir, options) -> dict[str, np.ndarray]:
    """Every example of ``split`` stacked into arrays, in order."""
    ds = load_task(task, split, data_dir=data_dir, **options)
    stream = batches(ds, global_batch_size=len(ds), shuffle=False, num_epochs=1)
    return next(stream)


def _scored(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, weights) flattened to one entry per scored prediction."""
    labels = data["label"]
    weights = data["example_weight"].astype(np.float64)
    if labels.ndim == 2:  # per-position labels (sequence labelling)
        weights = weights[:, None] * data["weights"]
    return labels.reshape(-1), np.broadcast_to(weights, labels.shape).reshape(-1)


def _majority(train, test) -> float:
    labels, weights = _scored(train)
    keep = weights > 0
    majority = np.bincount(labels[keep], weights=weights[keep]).argmax()
    labels, weights = _scored(test)
    return float(np.sum(weights * (labels == majority)) / np.sum(weights))


def _root_operator(train, test) -> float:
    """ListOps: the most frequent training label for each outermost operator."""

    def roots(data):
        return data["inputs"][:, 0]  # parentheses are dropped: the first token is the root

    table = {}
    for op in np.unique(roots(train)):
        table[int(op)] = np.bincount(train["label"][roots(train) == op]).argmax()
    fallback = np.bincount(train["label"]).argmax()
    guess = np.array([table.get(int(op), fallback) for op in roots(test)])
    return float(np.mean(guess == test["label"]))


def _guess_in_context(test, num_kv_pairs: int) -> float:
    """MQAR: the expected accuracy of a uniform guess among the context's values."""
    inputs, weights = test["inputs"], test["weights"]
    context = inputs[:, 1 : 2 * num_kv_pairs : 2]  # keys at even, values at odd positions
    distinct = np.array([len(np.unique(row)) for row in context], np.float64)
    in_context = np.array(
        [
            np.isin(lab[w > 0], ctx).all()
            for lab, w, ctx in zip(test["label"], weights, context, strict=True)
        ]
    )
    per_example = np.where(in_context, 1.0 / distinct, 0.0)
    scored = weights.sum(axis=1)
    return float(np.sum(per_example * scored) / np.sum(scored))


def task_baselines(task: str, data_dir: str | None, options: dict) -> list[dict]:
    """The trivial baselines of ``task`` (see the module docstring), computed from its data."""
    info = task_info(task, **options)
    eval_split = "test" if "test" in info.splits else "val"
    train = _arrays(task, "train", data_dir, options)
    test = _arrays(task, eval_split, data_dir, options)
    rows = [("majority class", _majority(train, test), "always the most frequent training label")]
    if task == listops.NAME:
        rows.append(
            (
                "root operator",
                _root_operator(train, test),
                "the most frequent training label of the outermost operator",
            )
        )
    if task == mqar.NAME:
        pairs = {**task_defaults(task), **options}["num_kv_pairs"]
        rows.append(
            (
                "guess in context",
                _guess_in_context(test, pairs),
                f"a uniform guess among the {pairs} values in context",
            )
        )
    return [
        dict(name=name, accuracy=accuracy, split=eval_split, description=text)
        for name, accuracy, text in rows
    ]
