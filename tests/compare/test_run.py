"""effseq compare end to end on tiny configs: records, table, plots, resume."""

import json
import pathlib

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
        out=out,
        overrides=TINY + ("task.options.seq_len=64",),
        widths=(16, 32),
        devices=jax.devices()[:1],
        log=log or (lambda m: None),
        **{"seeds": 1, "mixers": ("gla", "attention"), **kw},
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


def test_results_keep_every_finished_run_and_a_changed_config_is_not_read_back(finished, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    # Fewer mixers: the table still holds the other mixer's finished runs.
    _run(out, mixers=("gla",))
    saved = json.loads((out / "results.json").read_text())
    assert sorted((r["mixer"], r["d_model"]) for r in saved) == sorted(
        (r["mixer"], r["d_model"]) for r in finished[1]
    )
    assert all(len(r["config_hash"]) == 16 for r in saved)
    assert "| attention (d_model=32) |" in (out / "results.md").read_text()
    # More steps: the finished 4-step runs are not passed off as 6-step ones.
    changed = dict(mixers=("gla",), widths=(16,), overrides=(*TINY, "task.options.seq_len=64",
                   "train.steps=6"))  # fmt: skip
    with pytest.raises(ValueError, match=r"train.steps 4 -> 6.*--rerun"):
        run_compare("mqar", out=out, seeds=1, devices=jax.devices()[:1], log=print, **changed)
    messages = []
    (record,) = run_compare(
        "mqar", out=out, seeds=1, devices=jax.devices()[:1], log=messages.append, rerun=True,
        **changed,
    )  # fmt: skip
    before = next(r for r in saved if (r["mixer"], r["d_model"]) == ("gla", 16))
    assert record["steps"] == 6 and record["config_hash"] != before["config_hash"]
    (old,) = (out / "runs").glob("*.replaced-*")  # moved aside, not deleted
    assert json.loads((old / "summary.json").read_text())["steps"] == 4
    assert any("config changed (train.steps 4 -> 6)" in m for m in messages)


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

    monkeypatch.setitem(run.SUITES, "tiny", (run.Entry("mqar", arg="{mixer}"),))
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


def test_import_registers_a_mixer_for_the_compare(tmp_path, capsys):
    from effseq.models import MIXERS, registry

    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "from effseq.models import register_mixer\n"
        "from tests.models.test_registry import Decay\n"
        "register_mixer('decay_cmp', Decay)\n"
    )
    out = tmp_path / "out"
    args = ["compare", "--suite", "mqar", "--mixers", "decay_cmp", "--widths", "16"]
    args += ["--seeds", "1", "--out", str(out), *(f"--config.{t}" for t in TINY)]
    try:
        assert main(args) == 2 and "unknown mixer 'decay_cmp'" in capsys.readouterr().err
        assert main([*args, "--import", str(plugin)]) == 0
        (record,) = json.loads((out / "results.json").read_text())
        assert record["mixer"] == "decay_cmp" and record["status"] == "completed"
        workdir = out / "runs" / pathlib.Path(record["workdir"]).name
        assert json.loads((workdir / "mixers.json").read_text()) == {"decay_cmp": str(plugin)}
    finally:
        MIXERS.pop("decay_cmp", None)
        registry.BIDIRECTIONAL.discard("decay_cmp")


def test_a_mixers_width_does_not_depend_on_the_other_mixers_named(tmp_path, monkeypatch):
    # Matched to attention at the experiment's width even when attention is not compared, so
    # `--mixers s4d` plans the very run that `--mixers s4d attention` did (and reads it back).
    run = _tiny_suite(monkeypatch)

    def s4d_width(mixers):
        plan = run._plan("tiny", mixers, "cpu", 1, TINY, tmp_path, lambda m: None)
        (item,) = [i for i in plan if i["mixer"] == "s4d"]
        assert item["matched_to"] == "attention"
        return item["config"].model.d_model, run.config_hash(item["config"])

    assert s4d_width(("s4d",)) == s4d_width(("s4d", "attention")) == s4d_width(("s4d", "gla"))
