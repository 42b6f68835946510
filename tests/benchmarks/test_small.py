"""effseq bench --plan small on tiny configs: step, FLOPs, loop overhead, the table."""

import json

import pytest

from effseq.benchmarks import models, small
from effseq.configs import load_config, override
from tests.train.test_loop import SMOKE


def _tiny(mixer):
    c = load_config(f"{SMOKE}:{mixer}")
    items = [
        "task.options.num_examples=256",
        "task.options.num_eval_examples=32",
        "model.d_model=16",
        "train.batch_size=8",
        "train.steps_per_call=5",
    ]
    return override(c, items)


@pytest.mark.slow  # about 23 s: a timed step and a training loop per model
def test_run_measures_step_flops_and_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(
        small,
        "suite_configs",
        lambda mixers, root, log: [("synthetic/mqar", m, _tiny(m)) for m in mixers],
    )
    monkeypatch.setattr(small, "MATMUL_N", 256)
    monkeypatch.setattr(small, "QUICK_RESULTS", tmp_path)
    assert models.main(["--plan", "small", "--mixers", "gla", "--steps", "100"]) == 0
    result = json.loads((tmp_path / "small.json").read_text())
    (rec,) = result["records"]
    assert rec["mixer"] == "gla" and rec["d_model"] == 16 and rec["steps_per_call"] == 5
    assert rec["flops"] > 0 and rec["step_ms_min"] <= rec["step_ms"] <= rec["step_ms_max"]
    assert rec["gflops_per_s"] == pytest.approx(rec["flops"] / rec["step_ms"] / 1e6)
    assert rec["loop_ms"] > 0
    assert rec["loop_overhead"] == pytest.approx(rec["loop_ms"] / rec["step_ms"] - 1)
    assert result["matmul_gflops"] > 0 and result["provenance"]["backend"]
    table = (tmp_path / "small.md").read_text()
    assert "| synthetic/mqar | gla | 16 |" in table


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        small.main(["--steps", "10"])
    with pytest.raises(SystemExit):
        small.main(["--mixers", "lstm"])
