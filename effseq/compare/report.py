"""Reporting for ``effseq compare``: the results table (``results.md``) and the plots.

Pure functions of the run records the runner appends to ``results.json``. A record is a dict::

    task, mixer, seed, params, steps, wall_s,
    val_accuracy    best validation accuracy, a fraction in [0, 1] (None if never validated)
    test_accuracy   test accuracy on the best-validation checkpoint (None if not evaluated)
    status          "completed" | "skipped" | "failed"
    reason          why a run was skipped or failed
    generated       True when the task ran on generated data, not the published dataset
    curve           [{"step", "wall_s", "val_accuracy"}, ...], the validation curve
    optional: suite, d_model, state_size, recurrent_state_bytes | recurrent_state_floats

The table follows Long Range Arena (Tay et al. 2021, Table 1): tasks as columns, models as rows,
an average column, published numbers beside ours. The recall-memory plot follows Arora et al.
2024 ("Simple linear attention language models balance the recall-throughput tradeoff",
Figure 2): associative-recall accuracy against the size of the recurrent state.

Plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, not pyplot, so reporting
never touches a global backend or figure registry. Figures are saved at a fixed size
(``figsize * DPI`` pixels) so that their size is known in advance.
"""

from __future__ import annotations

import math
import numbers
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STATUSES = ("completed", "skipped", "failed")
# Short column names of the Long Range Arena tasks, in the paper's column order.
LRA_COLUMNS = {
    "lra/listops": "ListOps",
    "lra/text": "Text",
    "lra/retrieval": "Retrieval",
    "lra/image": "Image",
    "lra/pathfinder": "Pathfinder",
    "lra/pathfinder32": "Pathfinder",
    "lra/pathx": "Path-X",
}
# Record keys that a sweep varies for one mixer on one task (the MQAR width/state sweep, the
# learning-rate sweep). When they vary, each value gets its own row instead of being averaged.
VARIANT_KEYS = ("d_model", "state_size", "learning_rate", "ssm_learning_rate")
# The variant keys that change a model's size (the others, learning rates, do not).
SIZE_KEYS = ("d_model", "state_size")
# State-size keys for the recall-memory plot, in order of preference, with axis labels.
STATE_KEYS = {
    "recurrent_state_bytes": "recurrent state (bytes)",
    "recurrent_state_floats": "recurrent state (floats)",
}

DPI = 100
CURVES_FIGSIZE = (11.0, 4.0)  # two panels: over steps, over wall time
SCATTER_FIGSIZE = (7.0, 5.0)

GENERATED_MARK = "†"
VAL_MARK = "‡"
IMPROVING_MARK = "↑"

# A run is "still improving" when a straight line through its validation accuracies over the
# last quarter of its steps rises by more than this (a fraction) across that quarter.
IMPROVING_RISE = 0.01
# Two rows' means differ beyond seed noise when the gap exceeds this many standard errors of
# the difference (sqrt(s1^2/n1 + s2^2/n2)); about a 95% two-sided z-interval.
NOISE_Z = 2.0


# --------------------------------------------------------------------------- records


def _check_fraction(where: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{where} must be a number or None, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} = {value!r} is outside [0, 1] (a fraction, not a percent)")


def check_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Validates the keys every report function relies on; returns the records as a list.

    Raises ValueError naming the record index and key at the first bad record.
    """
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise ValueError(f"records must be a list of dicts, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"records[{i}] must be a dict, got {type(rec).__name__}")
        for key in ("task", "mixer", "status"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise ValueError(
                    f"records[{i}][{key!r}] must be a non-empty string, got {rec.get(key)!r}"
                )
        if rec["status"] not in STATUSES:
            raise ValueError(
                f"records[{i}]['status'] = {rec['status']!r}; expected one of {', '.join(STATUSES)}"
            )
        for key in ("val_accuracy", "test_accuracy"):
            _check_fraction(f"records[{i}][{key!r}]", rec.get(key))
        params = rec.get("params")
        if params is not None and (
            not isinstance(params, numbers.Integral) or isinstance(params, bool) or params < 0
        ):
            raise ValueError(
                f"records[{i}]['params'] must be a non-negative int or None, got {params!r}"
            )
    return list(records)


def _row_keys(records: list[Mapping[str, Any]]) -> dict[int, tuple]:
    """Row key per record index: (mixer, ((key, value), ...)) with the swept keys of its mixer.

    A key counts as swept for (mixer, task) when it takes two values there; widths that only
    differ between tasks (LRA uses per-task depths and widths) keep one row per mixer.
    """
    seen: dict[tuple[str, str, str], set] = {}
    for rec in records:
        for key in VARIANT_KEYS:
            seen.setdefault((rec["mixer"], rec["task"], key), set())
            if rec.get(key) is not None:  # a skipped run may not know its width
                seen[(rec["mixer"], rec["task"], key)].add(rec[key])
    keys = {}
    for i, rec in enumerate(records):
        variant = tuple(
            (key, rec.get(key))
            for key in VARIANT_KEYS
            if len(seen[(rec["mixer"], rec["task"], key)]) > 1
        )
        keys[i] = (rec["mixer"], variant)
    return keys


def _row_order(records: list[Mapping[str, Any]], keys: dict[int, tuple]) -> list[tuple]:
    """Mixers in order of first appearance; a mixer's sweep rows sorted by their values."""
    mixers = list(dict.fromkeys(rec["mixer"] for rec in records))
    rows = set(keys.values())

    def sort_key(row):
        return [
            (
                v is None,
                not isinstance(v, (int, float)),
                v if isinstance(v, (int, float)) else str(v),
            )
            for _, v in row[1]
        ]

    return [row for m in mixers for row in sorted((r for r in rows if r[0] == m), key=sort_key)]


def _row_label(row: tuple) -> str:
    mixer, variant = row
    if not variant:
        return mixer
    return f"{mixer} ({', '.join(f'{k}={v}' for k, v in variant)})"


def _task_order(tasks) -> list[str]:
    """LRA tasks in the paper's column order, then the others in order of first appearance."""
    tasks = list(dict.fromkeys(tasks))
    lra = [t for t in LRA_COLUMNS if t in tasks]
    return lra + [t for t in tasks if t not in LRA_COLUMNS]


def task_label(task: str) -> str:
    """Short column name: "lra/listops" -> "ListOps"; tasks outside LRA keep their name."""
    return LRA_COLUMNS.get(task, task)


def _cell_accuracies(recs: list[Mapping[str, Any]]) -> tuple[list[float], bool]:
    """Accuracies of a cell's completed runs; validation for all of them if any lacks test.

    Mixing test and validation numbers in one mean would be neither, so one missing test
    accuracy switches the whole cell to validation.
    """
    done = [r for r in recs if r["status"] == "completed"]
    if done and all(r.get("test_accuracy") is not None for r in done):
        return [r["test_accuracy"] for r in done], False
    values = [r["val_accuracy"] for r in done if r.get("val_accuracy") is not None]
    return values, True


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); the std is None for a single value."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def still_improving(curve: Sequence[Mapping[str, Any]], steps: int) -> bool | None:
    """Whether validation accuracy was still rising over the last quarter of a run: the
    least-squares slope of accuracy against step over the points with step >= 3/4 of
    ``steps``, times the quarter's length, exceeds :data:`IMPROVING_RISE`. None when the
    quarter holds fewer than three validation points (too few to tell)."""
    points = [(p["step"], p["val_accuracy"]) for p in curve if p.get("val_accuracy") is not None]
    last = [(x, y) for x, y in points if x >= 0.75 * steps]
    if len(last) < 3:
        return None
    x, y = np.asarray(last, np.float64).T
    if np.ptp(x) == 0:
        return None
    slope = np.polyfit(x, y, 1)[0]
    return bool(slope * 0.25 * steps > IMPROVING_RISE)


def format_mean_std(fractions: Sequence[float]) -> str:
    """Percent with two decimals: "55.00 ± 7.07", or "55.00" for one seed."""
    mean, std = mean_std([100.0 * f for f in fractions])
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def format_params(n: float) -> str:
    """Compact parameter count: 950, 12.3K, 1.23M, 1.50B."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{n:.0f}"


# --------------------------------------------------------------------------- table


def _check_published(published: Mapping[str, Mapping[str, Any]] | None) -> dict:
    if published is None:
        return {}
    if not isinstance(published, Mapping):
        raise ValueError(
            f"published must be a dict task -> {{model: (accuracy, source)}}, got "
            f"{type(published).__name__}"
        )
    out: dict[str, dict[str, tuple[float, str]]] = {}
    for task, models in published.items():
        if not isinstance(models, Mapping):
            raise ValueError(
                f"published[{task!r}] must be a dict model -> (accuracy, source), "
                f"got {type(models).__name__}"
            )
        for model, entry in models.items():
            ok = (
                isinstance(entry, (tuple, list))
                and len(entry) == 2
                and isinstance(entry[0], (int, float))
                and not isinstance(entry[0], bool)
                and 0.0 <= entry[0] <= 100.0
                and isinstance(entry[1], str)
            )
            if not ok:
                raise ValueError(
                    f"published[{task!r}][{model!r}] must be (accuracy in percent, "
                    f"source string), got {entry!r}"
                )
            out.setdefault(task, {})[model] = (float(entry[0]), entry[1])
    return out


def _avg_cell(means: list[float], n_columns: int) -> tuple[str, bool]:
    """Average over the tasks a row has; "(k/n)" when it lacks some of the table's tasks."""
    if not means:
        return "—", n_columns > 0
    text = f"{float(np.mean(means)):.2f}"
    if len(means) < n_columns:
        return f"{text} ({len(means)}/{n_columns})", True
    return text, False


def _reasons(records, keys, status: str, tasks: list[str]) -> list[str]:
    """One line per (task, reason): which rows (and seeds) were skipped or failed, and why."""
    groups: dict[tuple[str, str], list[str]] = {}
    for i, rec in enumerate(records):
        if rec["status"] != status:
            continue
        reason = str(rec.get("reason") or "no reason recorded")
        who = _row_label(keys[i])
        if status == "failed" and rec.get("seed") is not None:
            who += f" seed {rec['seed']}"
        members = groups.setdefault((rec["task"], reason), [])
        if who not in members:
            members.append(who)
    order = {t: n for n, t in enumerate(tasks)}
    lines = []
    for (task, reason), who in sorted(groups.items(), key=lambda kv: order[kv[0][0]]):
        lines.append(f"- {task_label(task)} ({', '.join(who)}): {reason}")
    return lines


def _budget_lines(records, keys, rows, tasks) -> list[str]:
    """The parameter budget: max/min of the mean parameter counts across mixers, overall and
    per task (a budget only holds within a task, where inputs and heads are the same). Sweep
    rows vary their width on purpose and are stated apart; rows of a learning-rate sweep share
    their mixer's size and count as that mixer."""

    def size_row(row):
        return row[0], tuple((k, v) for k, v in row[1] if k in SIZE_KEYS)

    def mean_params(row, task=None):
        counts = [
            rec["params"]
            for i, rec in enumerate(records)
            if size_row(keys[i]) == row
            and (task is None or rec["task"] == task)
            and rec["status"] == "completed"
            and rec.get("params") is not None
        ]
        return float(np.mean(counts)) if counts else None

    lines = []
    rows = list(dict.fromkeys(size_row(row) for row in rows))
    mixers = [row for row in rows if not row[1]]
    ratios = []  # (ratio, task, largest row, its params, smallest row, its params)
    for task in tasks:
        per_row = {row: p for row in mixers if (p := mean_params(row, task))}
        if len(per_row) > 1:
            big = max(per_row, key=per_row.get)
            small = min(per_row, key=per_row.get)
            ratios.append(
                (per_row[big] / per_row[small], task, big, per_row[big], small, per_row[small])
            )
    if ratios:
        ratio, task, big, n_big, small, n_small = max(ratios, key=lambda r: r[0])
        lines.append(
            f"Parameter budget: on each task the largest model has at most {ratio:.2f}× the "
            f"parameters of the smallest (max/min; widest gap on {task_label(task)}: "
            f"{_row_label(big)} {format_params(n_big)} vs {_row_label(small)} "
            f"{format_params(n_small)})."
        )
        if len(ratios) > 1:
            per_task = ", ".join(f"{task_label(r[1])} {r[0]:.2f}×" for r in ratios)
            lines.append(f"Max/min parameter ratio per task: {per_task}.")
    swept = [row for row in rows if row[1]]
    sizes = [p for row in swept if (p := mean_params(row))]
    if sizes:
        names = sorted({k for row in swept for k, _ in row[1]})
        lines.append(
            f"Rows with {'/'.join(names)} in their name are a sweep: their parameter counts "
            f"vary by design ({format_params(min(sizes))} to {format_params(max(sizes))})."
        )
    return lines


def _params_cell(row_recs, tasks) -> str:
    """The row's parameter count: one number, or the range over tasks whose models differ
    (a mean over different tasks' models would describe none of them)."""
    per_task = []
    for task in tasks:
        counts = [
            r["params"]
            for r in row_recs
            if r["task"] == task and r["status"] == "completed" and r.get("params") is not None
        ]
        if counts:
            per_task.append(float(np.mean(counts)))
    if not per_task:
        return "—"
    lo, hi = min(per_task), max(per_task)
    if hi <= 1.01 * lo:
        return format_params(float(np.mean(per_task)))
    return f"{format_params(lo)}–{format_params(hi)}"


def _improving_mark(recs: list[Mapping[str, Any]]) -> str:
    """ "↑" when every completed run of a cell was still improving, "↑k/n" when some were."""
    done = [r for r in recs if r["status"] == "completed"]
    rising = sum(bool(r.get("still_improving")) for r in done)
    if not rising:
        return ""
    return IMPROVING_MARK if rising == len(done) else f"{IMPROVING_MARK}{rising}/{len(done)}"


def _cell_stats(records, keys, row, task) -> tuple[float, float, int] | None:
    """(mean, standard error of the mean, n) of a cell's accuracies in percent, or None."""
    recs = [r for i, r in enumerate(records) if keys[i] == row and r["task"] == task]
    values, _ = _cell_accuracies(recs)
    if not values:
        return None
    mean, std = mean_std([100.0 * v for v in values])
    return mean, (std or 0.0) / math.sqrt(len(values)), len(values)


def _noise_lines(records, keys, rows, tasks, baselines) -> list[str]:
    """Per task: the rows in order of mean accuracy, with ">" where two neighbours differ by
    more than NOISE_Z standard errors of the difference and "≈" where they do not; then which
    rows beat the best trivial baseline by more than NOISE_Z standard errors."""
    lines = []
    for task in tasks:
        stats = {row: st for row in rows if (st := _cell_stats(records, keys, row, task))}
        if not stats or max(n for _, _, n in stats.values()) < 2:
            continue
        order = sorted(stats, key=lambda r: -stats[r][0])
        chain = _row_label(order[0])
        for a, b in zip(order, order[1:], strict=False):
            (ma, sa, _), (mb, sb, _) = stats[a], stats[b]
            apart = ma - mb > NOISE_Z * math.sqrt(sa**2 + sb**2)
            chain += (" > " if apart else " ≈ ") + _row_label(b)
        text = f"{task_label(task)}: {chain}."
        trivial = [b for b in (baselines or {}).get(task, [])]
        if trivial:
            best = max(trivial, key=lambda b: b["accuracy"])
            level = 100.0 * best["accuracy"]
            above = [_row_label(r) for r in order if stats[r][0] - NOISE_Z * stats[r][1] > level]
            text += (
                f" Above the {best['name']} baseline ({level:.2f}) beyond seed noise: "
                + (", ".join(above) if above else "none")
                + "."
            )
        lines.append(text)
    if not lines:
        return []
    head = (
        f'Differences against seed noise (">": neighbours in the ranking differ by more than '
        f'{NOISE_Z:g} standard errors of the difference of their means over seeds; "≈": '
        f"they do not, so their order is not established by these runs):"
    )
    return [head + "\n" + "\n".join(f"- {line}" for line in lines)]


def _one_table(
    records: list[Mapping[str, Any]], published: dict, baselines: Mapping[str, list] | None = None
) -> str:
    keys = _row_keys(records)
    rows = _row_order(records, keys)
    tasks = _task_order(rec["task"] for rec in records)
    generated = {t for t in tasks if any(r.get("generated") for r in records if r["task"] == t)}
    notes: list[str] = []
    used = {"val": False, "incomplete": False, "improving": False}
    seed_counts: set[int] = set()
    params_cells: list[str] = []
    # The LRA paper's average over its six tasks; over other task sets (e.g. a 10-way and a
    # 31-way accuracy) a plain average of accuracies means nothing, so there is none.
    with_avg = all(t in LRA_COLUMNS for t in tasks)

    header = ["Model", "Params"]
    for task in tasks:
        header.append(task_label(task) + (GENERATED_MARK if task in generated else ""))
    if with_avg:
        header.append("Avg")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]

    for row in rows:
        row_recs = [rec for i, rec in enumerate(records) if keys[i] == row]
        cells = [_row_label(row), _params_cell(row_recs, tasks)]
        params_cells.append(cells[1])
        means = []
        for task in tasks:
            recs = [r for r in row_recs if r["task"] == task]
            values, is_val = _cell_accuracies(recs)
            if values:
                text = format_mean_std(values) + (VAL_MARK if is_val else "")
                mark = _improving_mark(recs)
                used["improving"] |= bool(mark)
                text += mark
                # A column that mixes data sources marks its generated cells individually.
                gen = [bool(r.get("generated")) for r in recs if r["status"] == "completed"]
                if any(gen) and not all(r.get("generated") for r in records if r["task"] == task):
                    text += GENERATED_MARK
                used["val"] |= is_val
                seed_counts.add(len(values))
                means.append(100.0 * float(np.mean(values)))
            elif any(r["status"] == "skipped" for r in recs):
                text = "skipped"
            elif any(r["status"] == "failed" for r in recs):
                text = "failed"
            else:
                text = "—"
            cells.append(text)
        if with_avg:
            avg, incomplete = _avg_cell(means, len(tasks))
            used["incomplete"] |= incomplete and bool(means)
            cells.append(avg)
        lines.append("| " + " | ".join(cells) + " |")

    # Baseline rows, computed from the data of the tasks this table has.
    baselines = baselines or {}
    names = list(dict.fromkeys(b["name"] for t in tasks for b in baselines.get(t, [])))
    for name in names:
        cells = [f"_baseline: {name}_", "—"]
        for task in tasks:
            hit = [b for b in baselines.get(task, []) if b["name"] == name]
            cells.append(f"_{100.0 * hit[0]['accuracy']:.2f}_" if hit else "—")
        if with_avg:
            cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")

    # Published rows: only the tasks this table has; sources numbered in order of appearance.
    sources: list[str] = []
    models = list(dict.fromkeys(m for t in tasks for m in published.get(t, {})))
    for model in models:
        entries = {t: published[t][model] for t in tasks if model in published.get(t, {})}
        row_sources = {src for _, src in entries.values()}
        for _, src in entries.values():
            if src not in sources:
                sources.append(src)

        def ref(src):
            return f"[{sources.index(src) + 1}]"

        label = f"*{model}*"
        if len(row_sources) == 1:
            label += " " + ref(next(iter(row_sources)))
        cells = [label, "—"]
        for task in tasks:
            if task not in entries:
                cells.append("—")
                continue
            value, src = entries[task]
            cells.append(f"*{value:.2f}*" + ("" if len(row_sources) == 1 else " " + ref(src)))
        if with_avg:
            avg, incomplete = _avg_cell([v for v, _ in entries.values()], len(tasks))
            used["incomplete"] |= incomplete
            cells.append(f"*{avg}*")
        lines.append("| " + " | ".join(cells) + " |")

    if seed_counts:
        n = min(seed_counts), max(seed_counts)
        if n == (1, 1):
            over = "one seed (no std)"
        else:
            over = "mean ± sample std over " + (f"{n[0]}" if n[0] == n[1] else f"{n[0]}–{n[1]}")
            over += " seeds"
        notes.append(f"Test accuracy (%) on the best-validation checkpoint, {over}.")
    if any(cell != "—" for cell in params_cells):
        notes.append(
            "Params: mean parameter count over the row's completed runs on each task; a range "
            "(smallest–largest task) where the tasks' models differ in size."
        )
    if used["val"]:
        notes.append(f"{VAL_MARK} Best validation accuracy: the test split was not evaluated.")
    if used["improving"]:
        notes.append(
            f"{IMPROVING_MARK} Still improving: validation accuracy rose by more than "
            f"{100 * IMPROVING_RISE:g} point over the last quarter of training (a line fit), in "
            f"every seed (↑k/n: in k of n). The number is a point on a rising curve, not what "
            f"the architecture converges to."
        )
    if names:
        notes.append(
            "Baseline rows are computed from each task's data (fit on train, scored on test): "
            + "; ".join(
                f"{b['name']}: {b['description']}"
                for b in {b["name"]: b for t in tasks for b in baselines.get(t, [])}.values()
            )
            + "."
        )
    notes.extend(_noise_lines(records, keys, rows, tasks, baselines))
    if generated:
        names = ", ".join(task_label(t) for t in tasks if t in generated)
        notes.append(
            f"{GENERATED_MARK} Generated data ({names}), not the published dataset: "
            "not comparable with published numbers."
        )
    if used["incomplete"]:
        notes.append("Avg is over the tasks a row has; (k/n) marks a row with k of the n tasks.")
    if not with_avg and len(tasks) > 1:
        notes.append(
            "No average column: the tasks are not the LRA six, and an average of accuracies "
            "with different numbers of classes and chance levels means nothing."
        )
    if sources:
        notes.append(
            "Italic rows are published numbers, not run here: "
            + "; ".join(f"[{n}] {src}" for n, src in enumerate(sources, 1))
            + "."
        )
    skipped = _reasons(records, keys, "skipped", tasks)
    if skipped:
        notes.append("Skipped:\n" + "\n".join(skipped))
    failed = _reasons(records, keys, "failed", tasks)
    if failed:
        notes.append("Failed:\n" + "\n".join(failed))
    notes.extend(_match_lines(records, tasks))
    notes.extend(_budget_lines(records, keys, rows, tasks))
    notes.extend(_sweep_lines(records, tasks))
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


MATCH_WORDS = {
    "params": "parameter count",
    "flops": "forward FLOPs per example",
    "width": "nothing (each experiment's own width)",
}


def _match_lines(records, tasks) -> list[str]:
    """What the compared models share on each task, and the widths that gave it."""
    lines = []
    for task in tasks:
        recs = [r for r in records if r["task"] == task and r.get("match")]
        if not recs:
            continue
        match = recs[0]["match"]
        ref = next((r.get("matched_to") for r in recs if r.get("matched_to")), None)
        widths = dict.fromkeys(
            f"{r['mixer']} {r['d_model']}" for r in recs if r.get("d_model") is not None
        )
        text = f"{task_label(task)}: matched on {MATCH_WORDS.get(match, match)}"
        if ref and match != "width":
            text += f" (to {ref}'s at the experiment's width)"
        if widths:
            text += "; d_model " + ", ".join(widths)
        lines.append(text + ".")
    if not lines:
        return []
    return ["What the models share:\n" + "\n".join(f"- {line}" for line in lines)]


def best_learning_rates(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict]:
    """Per (task, mixer) whose runs used more than one learning rate (a sweep): the rates with
    the best mean validation accuracy over seeds (ties: the lower rates), as
    ``{"learning_rate", "ssm_learning_rate", "val_accuracy", "seeds", "grid"}``. Only completed
    runs count."""
    cells: dict[tuple[str, str], dict[tuple, list[float]]] = {}
    for rec in check_records(records):
        if rec["status"] != "completed" or rec.get("val_accuracy") is None:
            continue
        rates = (rec.get("learning_rate"), rec.get("ssm_learning_rate"))
        cells.setdefault((rec["task"], rec["mixer"]), {}).setdefault(rates, []).append(
            rec["val_accuracy"]
        )
    best = {}
    for key, by_rate in cells.items():
        if len(by_rate) < 2:
            continue
        # Ties go to the lower rates, whatever order the runs were recorded in.
        rates = max(
            by_rate,
            key=lambda r: (float(np.mean(by_rate[r])), -(r[0] or 0.0), -(r[1] or 0.0)),
        )
        best[key] = {
            "learning_rate": rates[0],
            "ssm_learning_rate": rates[1],
            "val_accuracy": float(np.mean(by_rate[rates])),
            "seeds": len(by_rate[rates]),
            "grid": sorted(by_rate, key=lambda r: (r[0] or 0.0, r[1] or 0.0)),
        }
    return best


def _sweep_lines(records, tasks) -> list[str]:
    best = best_learning_rates(records)
    if not best:
        return []
    lines = []
    for (task, mixer), b in sorted(best.items(), key=lambda kv: (tasks.index(kv[0][0]), kv[0][1])):
        rate = f"learning_rate {b['learning_rate']:g}"
        if b["ssm_learning_rate"] is not None:
            rate += f", ssm_learning_rate {b['ssm_learning_rate']:g}"
        lines.append(
            f"- {task_label(task)}, {mixer}: {rate} (mean validation accuracy "
            f"{100 * b['val_accuracy']:.2f} over {b['seeds']} seed(s), of {len(b['grid'])} "
            f"settings)"
        )
    return [
        "Learning-rate sweep, best setting per task and mixer by mean validation accuracy "
        "(the test split plays no part in the choice):\n" + "\n".join(lines)
    ]


def results_table(
    records: Sequence[Mapping[str, Any]],
    published: Mapping[str, Mapping[str, Any]] | None = None,
    baselines: Mapping[str, list] | None = None,
) -> str:
    """Markdown results table in the shape of the LRA paper, with notes under it.

    Args:
      records: run records (see the module docstring).
      published: ``{task: {model: (accuracy_percent, source)}}``; rows in italic for the tasks
        the table has, sources numbered in a note.
      baselines: ``{task: [{"name", "accuracy", "description"}, ...]}`` (see
        :mod:`effseq.compare.baselines`), one row per baseline name.

    Rows are mixers (one per swept ``d_model``/``state_size`` value where a sweep varies them),
    columns are tasks, cells are mean ± sample std over seeds of the test accuracy in percent
    (validation, marked ``‡``, when test is missing), ``skipped``/``failed`` where no run
    completed, ``—`` where nothing ran. Records with a ``suite`` key get one table per suite.
    """
    records = check_records(records)
    published = _check_published(published)
    if not records:
        return "_No runs recorded._\n"
    suites = list(dict.fromkeys(rec.get("suite") for rec in records))
    if len(suites) == 1:
        return _one_table(records, published, baselines)
    parts = []
    for suite in suites:
        title = "other" if suite is None else suite
        subset = [rec for rec in records if rec.get("suite") == suite]
        parts.append(f"### {title}\n\n{_one_table(subset, published, baselines)}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- plots


def _figure(figsize):
    """A figure on the Agg canvas, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _slug(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", task).strip("-")


def _colors(rows: list) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(rows) <= 10 else colormaps["tab20"]
    return {row: cmap(i % cmap.N) for i, row in enumerate(rows)}


def _curve(rec: Mapping[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, wall_s, accuracy) arrays of a record's validation curve, sorted by step."""
    points = rec.get("curve") or []
    if not isinstance(points, Sequence):
        raise ValueError(f"{where}['curve'] must be a list of points, got {type(points).__name__}")
    steps, wall, acc = [], [], []
    for j, p in enumerate(points):
        if not isinstance(p, Mapping) or any(
            k not in p for k in ("step", "wall_s", "val_accuracy")
        ):
            raise ValueError(
                f"{where}['curve'][{j}] must be a dict with step, wall_s and "
                f"val_accuracy, got {p!r}"
            )
        if p["val_accuracy"] is None:
            continue
        _check_fraction(f"{where}['curve'][{j}]['val_accuracy']", p["val_accuracy"])
        steps.append(float(p["step"]))
        wall.append(float(p["wall_s"]))
        acc.append(float(p["val_accuracy"]))
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(wall)[order], 100.0 * np.asarray(acc)[order]


def mean_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]]):
    """Mean, min and max over seeds of curves (x, y) on the union of their x values.

    Seeds are evaluated at the same steps but at different wall times, so each curve is
    linearly interpolated onto the x values inside the range that all curves cover.
    Returns (x, mean, lo, hi); empty arrays when the curves do not overlap.
    """
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not curves:
        return (np.empty(0),) * 4
    start = max(x[0] for x, _ in curves)
    stop = min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= start) & (grid <= stop)]
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def plot_curves(
    records: Sequence[Mapping[str, Any]], out_dir: str | pathlib.Path
) -> list[pathlib.Path]:
    """Validation accuracy over steps and over wall time: one PNG per task, one line per row.

    Lines are the mean over seeds; the shaded band spans the seeds' min and max. Only completed
    runs with a curve are drawn; a task without any gets no file. Files are
    ``OUT_DIR/curves_<task>.png`` with "/" in the task name replaced by "-".
    """
    records = check_records(records)
    out_dir = pathlib.Path(out_dir)
    keys = _row_keys(records)
    rows = _row_order(records, keys)
    colors = _colors(rows)
    curves = {
        i: _curve(rec, f"records[{i}]")
        for i, rec in enumerate(records)
        if rec["status"] == "completed"
    }
    paths = []
    for task in _task_order(rec["task"] for rec in records):
        fig = None
        for row in rows:
            mine = [
                c
                for i, c in curves.items()
                if keys[i] == row and records[i]["task"] == task and len(c[0])
            ]
            if not mine:
                continue
            if fig is None:
                fig = _figure(CURVES_FIGSIZE)
                ax_step, ax_wall = fig.subplots(1, 2, sharey=True)
            for ax, xi in ((ax_step, 0), (ax_wall, 1)):
                x, mean, lo, hi = mean_curve([(c[xi], c[2]) for c in mine])
                if len(mine) > 1:
                    ax.fill_between(x, lo, hi, color=colors[row], alpha=0.2, linewidth=0)
                ax.plot(x, mean, color=colors[row], marker=".", label=_row_label(row))
        if fig is None:
            continue
        ax_step.set_xlabel("step")
        ax_wall.set_xlabel("wall time (s)")
        ax_step.set_ylabel("validation accuracy (%)")
        for ax in (ax_step, ax_wall):
            ax.grid(alpha=0.3)
        ax_wall.legend(fontsize="small", loc="best")
        fig.suptitle(f"{task_label(task)} ({task})")
        paths.append(_save(fig, out_dir / f"curves_{_slug(task)}.png"))
    return paths


def plot_params(
    records: Sequence[Mapping[str, Any]], out_dir: str | pathlib.Path
) -> pathlib.Path | None:
    """Accuracy against parameter count (log x): colour per row (mixer), marker per task.

    One point per (task, row): mean accuracy over seeds (test, else validation) with the sample
    std as an error bar, at the mean parameter count. Writes ``OUT_DIR/accuracy_vs_params.png``;
    returns None and writes nothing when no completed run has both.
    """
    records = check_records(records)
    keys = _row_keys(records)
    rows = _row_order(records, keys)
    tasks = _task_order(rec["task"] for rec in records)
    mixers = list(dict.fromkeys(row[0] for row in rows))
    # Colour per mixer, not per row: a sweep's points share their mixer's colour.
    colors = {row: c for m, c in _colors(mixers).items() for row in rows if row[0] == m}
    markers = "osD^vP*Xhp<>"
    points = []
    for task in tasks:
        for row in rows:
            recs = [
                r
                for i, r in enumerate(records)
                if keys[i] == row
                and r["task"] == task
                and r["status"] == "completed"
                and r.get("params")
            ]
            values, _ = _cell_accuracies(recs)
            if not values:
                continue
            mean, std = mean_std([100.0 * v for v in values])
            points.append((task, row, float(np.mean([r["params"] for r in recs])), mean, std))
    if not points:
        return None
    from matplotlib.lines import Line2D

    fig = _figure(SCATTER_FIGSIZE)
    ax = fig.subplots()
    for task, row, params, mean, std in points:
        ax.errorbar(
            params,
            mean,
            yerr=std or 0.0,
            color=colors[row],
            marker=markers[tasks.index(task) % len(markers)],
            markersize=7,
            capsize=3,
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    used_mixers = [m for m in mixers if any(p[1][0] == m for p in points)]
    used_tasks = [t for t in tasks if any(p[0] == t for p in points)]
    handles = [
        Line2D([], [], color=_colors(mixers)[m], marker="o", linestyle="", label=m)
        for m in used_mixers
    ]
    handles += [
        Line2D(
            [],
            [],
            color="gray",
            linestyle="",
            marker=markers[tasks.index(t) % len(markers)],
            label=task_label(t),
        )
        for t in used_tasks
    ]
    ax.legend(handles=handles, fontsize="small", loc="best")
    ax.set_title("Accuracy against parameter count")
    return _save(fig, pathlib.Path(out_dir) / "accuracy_vs_params.png")


def is_mqar(task: str) -> bool:
    return task.rsplit("/", 1)[-1] == "mqar"


def plot_recall_memory(
    records: Sequence[Mapping[str, Any]], out_dir: str | pathlib.Path
) -> pathlib.Path | None:
    """MQAR recall accuracy against recurrent state size (log x), one line per mixer.

    The state size comes from ``recurrent_state_bytes`` (preferred) or
    ``recurrent_state_floats`` on each completed MQAR record; each point is the mean over seeds
    at one state size. Writes ``OUT_DIR/recall_vs_state.png``; returns None and writes nothing
    when there is no completed MQAR run. Raises ValueError when a completed MQAR record has
    neither state-size key, or records mix the two.
    """
    records = check_records(records)
    mqar = [
        (i, r) for i, r in enumerate(records) if is_mqar(r["task"]) and r["status"] == "completed"
    ]
    if not mqar:
        return None
    state_key = None
    for i, rec in mqar:
        key = next((k for k in STATE_KEYS if rec.get(k) is not None), None)
        if key is None:
            raise ValueError(
                f"records[{i}] (MQAR, {rec['mixer']}) has no state size: "
                f"set one of {', '.join(STATE_KEYS)}"
            )
        if state_key is not None and key != state_key:
            raise ValueError(
                f"records[{i}] gives {key} but earlier MQAR records give "
                f"{state_key}; use one unit for the whole plot"
            )
        state_key = key
    mixers = list(dict.fromkeys(rec["mixer"] for _, rec in mqar))
    colors = _colors(mixers)
    fig = _figure(SCATTER_FIGSIZE)
    ax = fig.subplots()
    for mixer in mixers:
        by_size: dict[float, list[Mapping[str, Any]]] = {}
        for _, rec in mqar:
            if rec["mixer"] == mixer:
                by_size.setdefault(float(rec[state_key]), []).append(rec)
        xs, ys = [], []
        for size in sorted(by_size):
            values, _ = _cell_accuracies(by_size[size])
            if values:
                xs.append(size)
                ys.append(100.0 * float(np.mean(values)))
        ax.plot(xs, ys, color=colors[mixer], marker="o", label=mixer)
    ax.set_xscale("log")
    ax.set_ylim(-2, 102)
    ax.set_xlabel(STATE_KEYS[state_key])
    ax.set_ylabel("MQAR recall accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="best")
    ax.set_title("Recall against memory")
    return _save(fig, pathlib.Path(out_dir) / "recall_vs_state.png")


# --------------------------------------------------------------------------- report


def write_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | pathlib.Path,
    published: Mapping[str, Mapping[str, Any]] | None = None,
    baselines: Mapping[str, list] | None = None,
) -> dict[str, Any]:
    """Writes ``OUT_DIR/results.md`` (table, notes, plot links) and every plot that has data.

    Returns ``{"results_md": Path, "curves": [Path, ...], "params": Path | None,
    "recall_memory": Path | None}``.
    """
    records = check_records(records)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = results_table(records, published, baselines)
    paths: dict[str, Any] = {
        "curves": plot_curves(records, out_dir),
        "params": plot_params(records, out_dir),
        "recall_memory": plot_recall_memory(records, out_dir),
    }
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    lines = [
        "# effseq compare: results",
        "",
        f"{len(records)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
        "",
        table.rstrip("\n"),
    ]
    plots = [(p, p.stem.replace("_", " ")) for p in paths["curves"]]
    plots += [
        (paths[k], title)
        for k, title in (
            ("params", "accuracy against parameters"),
            ("recall_memory", "recall against memory"),
        )
        if paths[k] is not None
    ]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({p.name})" for p, title in plots]
    md = out_dir / "results.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["results_md"] = md
    return paths
