"""effseq compare end to end on tiny configs: records, table, plots, resume."""

import json

import jax
import pytest

from effseq.cli import main
from effseq.compare import run_compare

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
        **kw,
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
