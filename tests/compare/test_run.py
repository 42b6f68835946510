"""effseq compare end to end on tiny configs: records, table, plots, resume."""

import json

import jax
import pytest

from effseq.cli import main
from effseq.compare import run_compare
from effseq.configs import override

TINY = (
    "train.steps=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.progress=false",
    "train.batch_size=8",
    "optim.warmup_steps=1",
    "task.options.num_examples=64",
    "task.options.num_eval_examples=16",
)
KEYS = {"task", "mixer", "seed", "params", "steps", "wall_s", "val_accuracy", "test_accuracy"}


def _run(out, log=None, **kw):
    return run_compare(
        "mqar",
        mixers=("gla", "attention"),
        out=out,
        overrides=TINY + ("task.options.seq_len=64",),
        widths=(16, 32),
        devices=jax.devices()[:1],
        log=log or (lambda m: None),
        **{"seeds": 1, **kw},
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, _run(out)


def test_records_table_and_plots(finished):
    out, records = finished
    assert len(records) == 2 * 2  # two mixers x two widths of the MQAR sweep
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(records))
    for r in saved:
        assert KEYS <= set(r) and r["status"] == "completed" and r["steps"] == 4
        assert 0.0 <= r["val_accuracy"] <= 1.0 and 0.0 <= r["test_accuracy"] <= 1.0
        assert r["recurrent_state_bytes"] > 0 and [p["step"] for p in r["curve"]] == [2, 4]
    # A fixed-size state for GLA; attention's KV cache for the same length is larger at
    # every width, and both grow with the width.
    gla = sorted((r["d_model"], r["recurrent_state_bytes"]) for r in saved if r["mixer"] == "gla")
    att = sorted(
        (r["d_model"], r["recurrent_state_bytes"]) for r in saved if r["mixer"] == "attention"
    )
    assert all(g[1] < a[1] for g, a in zip(gla, att, strict=True))
    table = (out / "results.md").read_text()
    assert "| gla (d_model=16) |" in table and "| attention (d_model=32) |" in table
    for name in ("curves_synthetic-mqar.png", "accuracy_vs_params.png", "recall_vs_state.png"):
        assert (out / name).stat().st_size > 1000


def test_rerun_skips_finished_runs(finished):
    out, records = finished
    messages = []
    again = _run(out, log=messages.append)
    assert sum("already finished" in m for m in messages) == len(records)
    assert [r["val_accuracy"] for r in again] == [r["val_accuracy"] for r in records]


def test_missing_data_is_reported_as_skipped(tmp_path):
    records = run_compare(
        "lra",
        mixers=("gla",),
        seeds=1,
        out=tmp_path / "out",
        data_dir=str(tmp_path / "empty"),
        log=lambda m: None,
    )
    assert len(records) == 6
    assert all(
        r["status"] == "skipped" and "listops-1000" in r["reason"] or r["task"] != "lra/listops"
        for r in records
    )
    assert all(r["status"] == "skipped" and r["reason"] for r in records)
    assert "skipped" in (tmp_path / "out" / "results.md").read_text()


def test_cli_errors_name_the_bad_argument(tmp_path, capsys):
    assert main(["compare", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    assert main(["compare", "--mixers", "gla", "lstm", "--out", str(tmp_path)]) == 2
    assert "unknown mixer 'lstm'" in capsys.readouterr().err


def _tiny_suite(monkeypatch):
    from effseq.compare import run

    monkeypatch.setitem(run.SUITES, "tiny", (run.Entry("mqar.py", arg="{mixer}"),))
    return run


@pytest.mark.parametrize("match", ["params", "flops", "width"])
def test_match_modes_choose_widths(tmp_path, monkeypatch, match):
    run = _tiny_suite(monkeypatch)
    plan = run._plan(
        "tiny", ("s4d", "attention"), "cpu", 1, TINY, tmp_path, lambda m: None, match=match
    )
    widths = {item["mixer"]: item["config"].model.d_model for item in plan}
    assert all(item["match"] == match and item["matched_to"] == "attention" for item in plan)
    if match == "width":
        assert widths == {"s4d": 64, "attention": 64}  # the experiment's
        return
    measure = run.MEASURES[match]
    values = {item["mixer"]: measure(item["config"]) for item in plan}
    # The chosen width is the closest multiple of 8: within a step of the target.
    s4d = next(item["config"] for item in plan if item["mixer"] == "s4d")
    wider = override(s4d.copy_and_resolve_references(), [f"model.d_model={widths['s4d'] + 8}"])
    narrower = override(s4d.copy_and_resolve_references(), [f"model.d_model={widths['s4d'] - 8}"])
    gap = abs(values["s4d"] - values["attention"])
    assert gap <= abs(measure(wider) - values["attention"])
    assert gap <= abs(measure(narrower) - values["attention"])


def test_learning_rate_grid_plans_every_rate_seed_and_ssm_rate(tmp_path, monkeypatch):
    run = _tiny_suite(monkeypatch)
    plan = run._plan(
        "tiny",
        ("s4d", "gla"),
        "cpu",
        2,
        TINY,
        tmp_path,
        lambda m: None,
        lr_grid=(0.001, 0.01),
        ssm_lr_grid=(0.0005,),
    )
    got = sorted(
        (
            i["mixer"],
            i["config"].optim.learning_rate,
            i["config"].optim.ssm_learning_rate,
            i["seed"],
        )
        for i in plan
    )
    # GLA has no SSM parameters: its SSM rate is not swept (the experiment's stays).
    gla_ssm = plan[-1]["config"].optim.ssm_learning_rate
    assert got == sorted(
        [("s4d", lr, 0.0005, seed) for lr in (0.001, 0.01) for seed in (0, 1)]
        + [("gla", lr, gla_ssm, seed) for lr in (0.001, 0.01) for seed in (0, 1)]
    )
    assert len({i["id"] for i in plan}) == len(plan)
    assert any("__lr0.01__ssmlr0.0005__seed1" in i["id"] for i in plan)
