"""The `effseq compare` report: table contents from synthetic records, and the plot files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from effseq.compare import report

TAB10_BLUE = (31, 119, 180)  # the first mixer's colour in every plot


def rec(task="lra/listops", mixer="s4d", seed=0, test=0.5, val=None, **kw):
    """One completed run record; keyword arguments override or add keys."""
    out = {
        "task": task,
        "mixer": mixer,
        "seed": seed,
        "params": 200_000,
        "steps": 100,
        "wall_s": 10.0,
        "val_accuracy": test if val is None else val,
        "test_accuracy": test,
        "status": "completed",
        "reason": None,
        "generated": False,
        "curve": [],
    }
    out.update(kw)
    return out


def skipped(task, mixer, reason="data not found"):
    return {"task": task, "mixer": mixer, "seed": 0, "status": "skipped", "reason": reason}


def table_rows(text):
    """{first cell: [cells...]} of the markdown table rows (header and rule excluded)."""
    rows = {}
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def header(text):
    return [c.strip() for c in text.splitlines()[0].strip("|").split("|")]


def test_mean_std_over_seeds_in_percent():
    records = [
        rec(mixer="s4d", seed=0, test=0.5),
        rec(mixer="s4d", seed=1, test=0.6),
        rec(mixer="attention", seed=0, test=0.35, params=250_000),
    ]
    text = report.results_table(records)
    assert header(text) == ["Model", "Params", "ListOps", "Avg"]
    rows = table_rows(text)
    # sample std of (50, 60) = sqrt(50) = 7.07
    assert rows["s4d"] == ["200.0K", "55.00 ± 7.07", "55.00"]
    assert rows["attention"] == ["250.0K", "35.00", "35.00"]
    assert "mean ± sample std over 1–2 seeds" in text
    assert "at most 1.25× the parameters of the smallest" in text
    assert "attention 250.0K vs s4d 200.0K" in text


def test_lra_column_order_short_names_and_average():
    records = [
        rec(task="lra/image", test=0.8),
        rec(task="lra/listops", test=0.6),
        rec(task="lra/pathx", test=0.5, mixer="attention"),
    ]
    text = report.results_table(records)
    assert header(text) == ["Model", "Params", "ListOps", "Image", "Path-X", "Avg"]
    rows = table_rows(text)
    # (60 + 80) / 2 over the two tasks s4d has, marked 2 of 3.
    assert rows["s4d"] == ["200.0K", "60.00", "80.00", "—", "70.00 (2/3)"]
    assert rows["attention"] == ["200.0K", "—", "—", "50.00", "50.00 (1/3)"]
    assert "(k/n) marks a row with k of the n tasks" in text
    # A task outside the LRA six: an average of unlike accuracies is left out, and said so.
    mixed = report.results_table(records + [rec(task="synthetic/mqar", test=0.9)])
    assert header(mixed) == ["Model", "Params", "ListOps", "Image", "Path-X", "synthetic/mqar"]
    assert table_rows(mixed)["s4d"] == ["200.0K", "60.00", "80.00", "—", "90.00"]
    assert "No average column" in mixed


def test_validation_used_when_test_missing_and_marked():
    records = [
        rec(mixer="s4d", seed=0, test=None, val=0.7),
        rec(mixer="gla", seed=0, test=0.9, val=0.8),
        rec(mixer="gla", seed=1, test=None, val=0.6),  # one seed lacks test: whole cell val
    ]
    text = report.results_table(records)
    rows = table_rows(text)
    assert rows["s4d"][1] == "70.00‡"
    assert rows["gla"][1] == "70.00 ± 14.14‡"
    assert "‡ Best validation accuracy: the test split was not evaluated." in text


def test_skipped_and_failed_cells_with_reasons():
    records = [
        rec(task="lra/listops", mixer="s4d", test=0.6),
        skipped("lra/text", "s4d", "no data under /data/aclImdb"),
        skipped("lra/text", "gla", "no data under /data/aclImdb"),
        {
            "task": "lra/listops",
            "mixer": "gla",
            "seed": 3,
            "status": "failed",
            "reason": "NaN loss at step 40",
        },
    ]
    text = report.results_table(records)
    rows = table_rows(text)
    assert rows["s4d"] == ["200.0K", "60.00", "skipped", "60.00 (1/2)"]
    assert rows["gla"] == ["—", "failed", "skipped", "—"]
    assert "Skipped:\n- Text (s4d, gla): no data under /data/aclImdb" in text
    assert "Failed:\n- ListOps (gla seed 3): NaN loss at step 40" in text


def test_partial_failure_keeps_completed_seeds():
    records = [
        rec(mixer="s4d", seed=0, test=0.6),
        {"task": "lra/listops", "mixer": "s4d", "seed": 1, "status": "failed", "reason": "OOM"},
    ]
    text = report.results_table(records)
    assert table_rows(text)["s4d"][1] == "60.00"
    assert "- ListOps (s4d seed 1): OOM" in text


def test_generated_data_marked():
    records = [
        rec(task="lra/listops", generated=True, test=0.4),
        rec(task="lra/image", test=0.5),
    ]
    text = report.results_table(records)
    assert header(text)[2:4] == ["ListOps†", "Image"]
    assert "† Generated data (ListOps), not the published dataset" in text
    # A column that mixes generated and real data marks the generated cells themselves.
    mixed = report.results_table(
        [rec(mixer="s4d", generated=True, test=0.4), rec(mixer="gla", test=0.45)]
    )
    rows = table_rows(mixed)
    assert rows["s4d"][1] == "40.00†"
    assert rows["gla"][1] == "45.00"


def test_published_rows_and_sources():
    published = {
        "lra/listops": {"transformer": (36.37, "Tay et al. 2021"), "s4d-legs": (60.47, "S4D")},
        "lra/text": {"transformer": (64.27, "Tay et al. 2021"), "s4d-legs": (86.18, "Other")},
        "lra/pathx": {"transformer": (50.0, "Tay et al. 2021")},  # no column here: left out
    }
    records = [rec(task="lra/listops", test=0.6), rec(task="lra/text", test=0.8)]
    text = report.results_table(records, published)
    rows = table_rows(text)
    # One source for the whole row: the reference sits on the label.
    assert rows["*transformer* [1]"] == ["—", "*36.37*", "*64.27*", "*50.32*"]
    # Sources differ per cell: each cell carries its reference.
    assert rows["*s4d-legs*"] == ["—", "*60.47* [2]", "*86.18* [3]", "*73.33*"]
    assert "[1] Tay et al. 2021; [2] S4D; [3] Other." in text
    assert "Path-X" not in text
    # Published rows count their own tasks for the average marker.
    partial = report.results_table(
        records, {"lra/listops": {"transformer": (36.37, "Tay et al. 2021")}}
    )
    assert table_rows(partial)["*transformer* [1]"] == ["—", "*36.37*", "—", "*36.37 (1/2)*"]


def test_sweep_rows_split_only_where_a_task_varies_the_key():
    records = [
        # LRA widths differ between tasks (per-task recipes): still one row.
        rec(task="lra/listops", mixer="s4d", d_model=128, test=0.6),
        rec(task="lra/image", mixer="s4d", d_model=512, test=0.8),
        # MQAR sweeps d_model: one row per width.
        rec(task="synthetic/mqar", mixer="mamba", d_model=64, test=0.3, params=50_000),
        rec(task="synthetic/mqar", mixer="mamba", d_model=32, test=0.1, params=20_000),
    ]
    rows = table_rows(report.results_table(records))
    assert list(rows) == ["s4d", "mamba (d_model=32)", "mamba (d_model=64)"]
    assert rows["mamba (d_model=32)"] == ["20.0K", "—", "—", "10.00"]
    text = report.results_table(records)
    assert "vary by design (20.0K to 50.0K)" in text


def test_one_table_per_suite():
    records = [
        rec(task="lra/listops", suite="lra", test=0.6),
        rec(task="synthetic/mqar", suite="mqar", test=0.9),
    ]
    text = report.results_table(records)
    assert text.index("### lra") < text.index("### mqar")
    lra, mqar = text.split("### mqar")
    assert "ListOps" in lra and "synthetic/mqar" not in lra
    assert "synthetic/mqar" in mqar and "ListOps" not in mqar


def test_empty_and_only_skipped():
    assert report.results_table([]) == "_No runs recorded._\n"
    text = report.results_table([skipped("lra/text", "s4d"), skipped("lra/text", "gla")])
    rows = table_rows(text)
    assert rows["s4d"] == ["—", "skipped", "—"]
    assert "Parameter budget" not in text
    assert "seeds" not in text  # no numbers, so no statement about them


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"test_accuracy": 55.0}, r"records\[0\]\['test_accuracy'\] = 55.0 is outside \[0, 1\]"),
        ({"status": "done"}, r"records\[0\]\['status'\] = 'done'"),
        ({"task": ""}, r"records\[0\]\['task'\] must be a non-empty string"),
        ({"params": -1}, r"records\[0\]\['params'\]"),
        ({"val_accuracy": float("nan")}, r"records\[0\]\['val_accuracy'\] must be a number"),
    ],
)
def test_bad_records(bad, match):
    with pytest.raises(ValueError, match=match):
        report.results_table([rec(**bad)])


def test_bad_container_and_published():
    with pytest.raises(ValueError, match="records must be a list"):
        report.results_table(rec())
    with pytest.raises(ValueError, match=r"published\['lra/listops'\]\['transformer'\]"):
        report.results_table([rec()], {"lra/listops": {"transformer": 36.37}})
    with pytest.raises(ValueError, match=r"curve'\]\[0\] must be a dict with step"):
        report.plot_curves([rec(curve=[{"step": 1}])], "/nonexistent")


def test_mean_curve_interpolates_onto_the_common_range():
    x, mean, lo, hi = report.mean_curve([([0, 10, 20], [0, 10, 20]), ([5, 15, 25], [0, 0, 0])])
    # Common range [5, 20]; the first curve is y = x there, the second zero.
    np.testing.assert_allclose(x, [5, 10, 15, 20])
    np.testing.assert_allclose(mean, [2.5, 5.0, 7.5, 10.0])
    np.testing.assert_allclose(lo, 0.0)
    np.testing.assert_allclose(hi, [5, 10, 15, 20])


def curve(acc, n=4, t0=0.0):
    return [
        {"step": 25 * (k + 1), "wall_s": t0 + 2.0 * (k + 1), "val_accuracy": acc * (k + 1) / n}
        for k in range(n)
    ]


def has_colour(path, rgb, tol=8):
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return bool((np.abs(img - np.array(rgb)).max(axis=-1) <= tol).any())


def expected_size(figsize):
    return (round(figsize[0] * report.DPI), round(figsize[1] * report.DPI))


def test_plot_curves(tmp_path):
    records = [
        rec(mixer="s4d", seed=0, curve=curve(0.6)),
        rec(mixer="s4d", seed=1, curve=curve(0.5, t0=1.0)),
        rec(mixer="gla", seed=0, curve=curve(0.4)),
        rec(task="lra/image", mixer="s4d", curve=[]),  # no curve: no figure for this task
        skipped("lra/text", "s4d"),
    ]
    paths = report.plot_curves(records, tmp_path)
    assert [p.name for p in paths] == ["curves_lra-listops.png"]
    assert paths[0].stat().st_size > 0
    with Image.open(paths[0]) as img:
        assert img.format == "PNG"
        assert img.size == expected_size(report.CURVES_FIGSIZE)
    assert has_colour(paths[0], TAB10_BLUE)
    assert report.plot_curves([skipped("lra/text", "s4d")], tmp_path / "none") == []


def test_plot_params(tmp_path):
    records = [
        rec(mixer="s4d", params=100_000, test=0.6),
        rec(mixer="gla", params=1_000_000, test=0.5),
        rec(task="lra/image", mixer="s4d", params=300_000, test=0.7),
    ]
    path = report.plot_params(records, tmp_path)
    assert path == tmp_path / "accuracy_vs_params.png"
    with Image.open(path) as img:
        assert img.size == expected_size(report.SCATTER_FIGSIZE)
    assert has_colour(path, TAB10_BLUE)
    assert report.plot_params([skipped("lra/text", "s4d")], tmp_path / "none") is None
    assert not (tmp_path / "none").exists()


def mqar(mixer, d, acc, **kw):
    return rec(task="synthetic/mqar", mixer=mixer, d_model=d, test=acc, **kw)


def test_plot_recall_memory(tmp_path):
    records = [
        mqar("attention", 32, 0.9, recurrent_state_bytes=4096),
        mqar("attention", 64, 1.0, recurrent_state_bytes=16384),
        mqar("mamba", 32, 0.2, recurrent_state_bytes=1024),
        mqar("mamba", 64, 0.4, recurrent_state_bytes=4096),
        rec(task="lra/listops"),  # not MQAR: ignored
    ]
    path = report.plot_recall_memory(records, tmp_path)
    assert path == tmp_path / "recall_vs_state.png"
    with Image.open(path) as img:
        assert img.size == expected_size(report.SCATTER_FIGSIZE)
    assert has_colour(path, TAB10_BLUE)
    assert report.plot_recall_memory([rec()], tmp_path / "none") is None
    with pytest.raises(ValueError, match=r"records\[0\] \(MQAR, mamba\) has no state size"):
        report.plot_recall_memory([mqar("mamba", 32, 0.2)], tmp_path)
    with pytest.raises(ValueError, match="use one unit"):
        report.plot_recall_memory(
            [
                mqar("mamba", 32, 0.2, recurrent_state_bytes=10),
                mqar("mamba", 64, 0.2, recurrent_state_floats=10),
            ],
            tmp_path,
        )


def test_write_report(tmp_path):
    records = [
        rec(mixer="s4d", seed=0, test=0.6, curve=curve(0.6), generated=True),
        rec(mixer="gla", seed=0, test=0.4, params=210_000, curve=curve(0.4), generated=True),
        skipped("lra/text", "s4d", "no data"),
        mqar("attention", 32, 0.9, recurrent_state_bytes=4096, suite="mqar", curve=curve(0.9)),
    ]
    published = {"lra/listops": {"transformer": (36.37, "Tay et al. 2021")}}
    paths = report.write_report(records, tmp_path / "out", published)
    md = paths["results_md"].read_text(encoding="utf-8")
    assert paths["results_md"] == tmp_path / "out" / "results.md"
    assert md.startswith("# effseq compare: results\n\n4 runs: 3 completed, 1 skipped, 0 failed.")
    assert report.results_table(records, published).rstrip() in md
    plot_paths = [*paths["curves"], paths["params"], paths["recall_memory"]]
    assert {p.name for p in plot_paths} == {
        "curves_lra-listops.png",
        "curves_synthetic-mqar.png",
        "accuracy_vs_params.png",
        "recall_vs_state.png",
    }
    for p in plot_paths:
        assert p.parent == tmp_path / "out" and p.stat().st_size > 0
        assert f"]({p.name})" in md


def test_write_report_only_skipped(tmp_path):
    paths = report.write_report([skipped("lra/text", "s4d")], tmp_path)
    assert paths["curves"] == [] and paths["params"] is None and paths["recall_memory"] is None
    md = paths["results_md"].read_text(encoding="utf-8")
    assert "| s4d | — | skipped | — |" in md
    assert "## Plots" not in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_learning_rate_sweep_gets_one_row_per_rate():
    records = [
        rec(mixer="gla", learning_rate=0.001, test=0.3),
        rec(mixer="gla", learning_rate=0.01, test=0.5),
        rec(mixer="attention", learning_rate=0.001, test=0.4),
    ]
    text = report.results_table(records)
    rows = table_rows(text)
    assert list(rows) == ["gla (learning_rate=0.001)", "gla (learning_rate=0.01)", "attention"]
    # Learning rates do not change a model's size: the budget still compares the mixers.
    assert "vary by design" not in text
    assert "at most 1.00× the parameters of the smallest" in text


def _curve(values, steps=100):
    """A validation curve at evenly spaced steps ending at ``steps``."""
    n = len(values)
    return [
        {"step": steps * (i + 1) // n, "wall_s": float(i), "val_accuracy": v}
        for i, v in enumerate(values)
    ]


def test_still_improving_is_a_rise_over_the_last_quarter():
    steps = 100
    # Flat at the end: converged (a plateau is not "improving").
    assert report.still_improving(_curve([0.2, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]), steps) is False
    # Rising by 6 points over the last quarter.
    rising = _curve([0.2, 0.3, 0.4, 0.5, 0.55, 0.57, 0.6, 0.63])
    assert report.still_improving(rising, steps) is True
    # Rising by less than one point: within the threshold.
    slight = _curve([0.5, 0.5, 0.5, 0.5, 0.5, 0.502, 0.504, 0.506])
    assert report.still_improving(slight, steps) is False
    # Too few points in the last quarter to tell.
    assert report.still_improving(_curve([0.1, 0.5, 0.9]), steps) is None


def test_still_improving_cells_are_marked_with_their_count():
    records = [
        rec(mixer="s4d", seed=0, test=0.5, still_improving=True),
        rec(mixer="s4d", seed=1, test=0.6, still_improving=True),
        rec(mixer="gla", seed=0, test=0.5, still_improving=True),
        rec(mixer="gla", seed=1, test=0.5, still_improving=False),
        rec(mixer="attention", seed=0, test=0.5, still_improving=False),
    ]
    rows = table_rows(report.results_table(records))
    assert rows["s4d"][1].endswith("↑")
    assert rows["gla"][1].endswith("↑1/2")
    assert "↑" not in rows["attention"][1]
    assert "Still improving" in report.results_table(records)


def test_baseline_rows_and_the_noise_ranking():
    records = [rec(mixer="s4d", seed=i, test=t) for i, t in enumerate((0.60, 0.62, 0.61))]
    records += [rec(mixer="gla", seed=i, test=t) for i, t in enumerate((0.40, 0.41, 0.42))]
    records += [rec(mixer="attention", seed=i, test=t) for i, t in enumerate((0.39, 0.45, 0.36))]
    baselines = {
        "lra/listops": [
            {"name": "majority class", "accuracy": 0.18, "description": "most frequent label"},
            {"name": "root operator", "accuracy": 0.37, "description": "outermost operator"},
        ]
    }
    text = report.results_table(records, baselines=baselines)
    rows = table_rows(text)
    assert rows["_baseline: majority class_"] == ["—", "_18.00_", "—"]  # no average
    assert rows["_baseline: root operator_"] == ["—", "_37.00_", "—"]
    # s4d is 20 points above gla with stds of 1: apart; gla and attention overlap.
    assert "- ListOps: s4d > gla ≈ attention." in text
    # Above the best trivial baseline (37) by more than two standard errors: s4d and gla
    # (41 +- 0.58); attention's 40 +- 2.6 is not.
    assert "Above the root operator baseline (37.00) beyond seed noise: s4d, gla." in text


def test_best_learning_rates_by_mean_validation_accuracy():
    records = [
        rec(mixer="gla", seed=0, learning_rate=0.001, val=0.30, test=0.9),
        rec(mixer="gla", seed=1, learning_rate=0.001, val=0.34, test=0.9),
        rec(mixer="gla", seed=0, learning_rate=0.01, val=0.50, test=0.1),
        rec(mixer="gla", seed=1, learning_rate=0.01, val=0.40, test=0.1),
        rec(mixer="attention", seed=0, learning_rate=0.001, val=0.5),
    ]
    best = report.best_learning_rates(records)
    assert list(best) == [("lra/listops", "gla")]  # attention ran one rate: no sweep
    assert best[("lra/listops", "gla")]["learning_rate"] == 0.01  # by val, not test
    assert best[("lra/listops", "gla")]["val_accuracy"] == pytest.approx(0.45)
    text = report.results_table(records)
    assert "- ListOps, gla: learning_rate 0.01 (mean validation accuracy 45.00 over 2" in text


def test_params_cell_is_a_range_when_the_tasks_models_differ():
    records = [
        rec(task="lra/listops", mixer="s4d", params=38_800),
        rec(task="synthetic/mqar", mixer="s4d", params=95_360),
        rec(task="lra/listops", mixer="gla", params=64_000),
        rec(task="synthetic/mqar", mixer="gla", params=64_100),  # within 1%: one number
    ]
    rows = table_rows(report.results_table(records))
    assert rows["s4d"][0] == "38.8K–95.4K"
    assert rows["gla"][0] == "64.0K"
