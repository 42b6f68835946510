"""`effseq bench --plan gpu`: its bookkeeping on fake figures, and a tiny run of a few rows on
this backend (on a CPU the cuDNN row must be recorded as unavailable, not fail the run)."""

import json
import subprocess
import sys

import jax
import pytest

from effseq.benchmarks import gpu

TINY = gpu.PLANS["tiny"]


def test_device_folder_names():
    assert gpu.device_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu.device_slug("") == "device"


def _rec(row, t, seconds, mode="fwd_bwd", chunk=None):
    return {"row": row, "t": t, "mode": mode, "chunk_size": chunk, "median_s": seconds}


def test_goals_divide_the_baselines_time_by_the_rows():
    records = [
        _rec("attention/cudnn", 8192, 3.0),
        _rec("gla/pallas", 8192, 2.0),  # 1.5x: meets >= 1x
        _rec("attention/cudnn", 16384, 3.0),
        _rec("gla/pallas", 16384, 2.0),  # 1.5x: misses >= 2x
        _rec("gla/pallas", 16384, 4.0),  # a slower chunk size of the same row is not the best
    ]
    by = {(g["row"], g["t"]): g for g in gpu.goals(records)}
    assert by[("gla/pallas", 8192)]["speedup"] == pytest.approx(1.5)
    assert by[("gla/pallas", 8192)]["met"] is True
    assert by[("gla/pallas", 16384)]["met"] is False
    assert by[("mamba2/pallas", 8192)] == {**by[("mamba2/pallas", 8192)], "speedup": None}
    assert by[("mamba2/pallas", 8192)]["met"] is None


def test_tuning_picks_the_fastest_chunk_per_row_and_length():
    records = [
        _rec("gla/chunked", 4096, 2.0, chunk=32),
        _rec("gla/chunked", 4096, 1.0, chunk=64),
        _rec("gla/chunked", 4096, 1.5, chunk=128),
        {**_rec("gla/chunked", 8192, None, chunk=32), "error": "x"},
    ]
    for r in records[3:]:
        del r["median_s"]
    assert gpu.tuning(records) == [
        {"row": "gla/chunked", "t": 4096, "mode": "fwd_bwd", "chunk_size": 64}
    ]


def test_rates_against_the_ceilings():
    rec = {**_rec("gla/chunked", 1024, 0.5), "flops": 1e12, "min_bytes": 2e9}
    out = gpu.rates(rec, {"matmul_bf16_tflops": 8.0, "copy_bytes_per_s": 8e9})
    assert out == pytest.approx(
        {"tflops": 2.0, "tflops_share": 0.25, "gb_per_s": 4.0, "bandwidth_share": 0.5}
    )
    assert gpu.rates({**rec, "flops": None}, {}) == {"gb_per_s": 4.0}


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setitem(gpu.ROWS, "gla/chunked", (broken, "chunked", True))
    plan = gpu.dataclasses.replace(
        TINY, rows=("gla/chunked", "rglru/sequential"), lengths=(16,), modes=("fwd",)
    )
    result = gpu.run(plan, tmp_path, log=lambda *_: None)
    bad, good = result["records"]
    assert bad["error"] == "RuntimeError: kernel exploded"
    assert good["median_s"] > 0 and good["runs"] == TINY.repeats
    assert "kernel exploded" in (tmp_path / "gpu.md").read_text()


def test_tiny_run_of_the_baselines_and_a_chunked_op(tmp_path):
    rows = ("attention/cudnn", "attention/xla-dpa", "gla/chunked", "mamba2/chunked")
    plan = gpu.dataclasses.replace(TINY, rows=rows, lengths=(16,))
    result = gpu.run(plan, tmp_path, log=lambda *_: None)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["records"] == json.loads(json.dumps(result["records"]))
    recs = {(r["row"], r["mode"]): r for r in result["records"]}
    assert len(recs) == len(rows) * 2
    cudnn = recs[("attention/cudnn", "fwd")]
    if jax.default_backend() != "gpu":
        assert "needs a CUDA GPU" in cudnn["skipped"]
        assert "median_s" not in cudnn
    for row in rows[1:]:
        for mode in ("fwd", "fwd_bwd"):
            r = recs[(row, mode)]
            assert "error" not in r, r.get("error")
            assert r["median_s"] > 0 and r["compile_s"] > 0 and r["min_bytes"] > 0
            assert r["batch"] * r["t"] == TINY.tokens
            if jax.default_backend() != "tpu":
                assert r["peak_bytes"] >= r["min_bytes"] // 2
    # Counted FLOPs: causal attention 2 b h t^2 d forward, 3.5x that with the backward.
    att = recs[("attention/xla-dpa", "fwd")]
    assert att["flops"] == 2 * 4 * 2 * 16 * 16 * 16
    assert recs[("attention/xla-dpa", "fwd_bwd")]["flops"] == pytest.approx(3.5 * att["flops"])
    assert recs[("gla/chunked", "fwd")]["tflops"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "| gla/chunked |" in md and "gla/pallas vs attention/cudnn at T=8192" in md


def test_lower_only_lowers_every_kind_of_row_for_cuda(tmp_path):
    rows = ("attention/xla-dpa", "gla/pallas", "mamba/chunked")
    plan = gpu.dataclasses.replace(TINY, rows=rows, lengths=(16,), lower_only=True)
    result = gpu.run(plan, tmp_path, log=lambda *_: None)
    recs = {(r["row"], r["mode"]): r for r in result["records"]}
    assert all("error" not in r and "median_s" not in r for r in recs.values())
    assert recs[("gla/pallas", "fwd")]["triton_calls"] == 1
    assert recs[("gla/pallas", "fwd_bwd")]["triton_calls"] >= 2  # forward and backward kernels
    assert recs[("mamba/chunked", "fwd_bwd")]["triton_calls"] == 0


def test_cli_rejects_an_unknown_row():
    run = subprocess.run(
        [sys.executable, "-m", "effseq.cli", "bench", "--plan", "gpu", "--rows", "gla/cuda"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "unknown row(s) ['gla/cuda']" in run.stderr


@pytest.mark.slow
def test_the_whole_tiny_plan_runs(tmp_path):
    result = gpu.run(TINY, tmp_path, log=lambda *_: None)
    errors = [(r["row"], r["t"], r["mode"], r["error"]) for r in result["records"] if "error" in r]
    assert not errors
    assert len(result["records"]) == len(gpu.ROWS) * len(TINY.lengths) * len(TINY.modes)
