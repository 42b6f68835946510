"""The model benchmark end to end on a tiny plan, its slope fit, goals and cache accounting."""

import json
import math

import pytest

from effseq.benchmarks import models
from effseq.benchmarks.timing import loglog_slope

TINY = models.Plan(
    mixers=("s4d", "attention"),
    lengths=(32, 64),
    contexts=(64, 128),
    d_model=16,
    n_layers=1,
    decode_calls=4,
)
PROVENANCE_KEYS = {
    "date",
    "jax",
    "backend",
    "device_kind",
    "device_count",
    "cpu_count",
    "git_commit",
    "git_dirty",
}


@pytest.mark.slow  # about 24 s: compiles and times every mixer of a tiny plan
def test_end_to_end_tiny_plan(tmp_path):
    result = models.run(TINY, log=lambda _: None)
    paths = models.write(result, tmp_path)
    data = json.loads((tmp_path / "models.json").read_text())
    assert PROVENANCE_KEYS <= set(data["provenance"])
    # Every (mixer, length) measured, none skipped at these sizes, times consistent.
    assert [(r["mixer"], r["length"]) for r in data["train"]] == [
        (m, t) for m in TINY.mixers for t in TINY.lengths
    ]
    for r in data["train"]:
        assert "skipped" not in r, r
        assert r["runs"] == TINY.repeats
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["tokens_per_s"] == pytest.approx(TINY.batch * r["length"] / r["median_s"])
        assert r["peak_bytes"] > 0 and r["compile_s"] > 0
        assert r["params"] == data["params"][r["mixer"]][str(r["length"])]
    assert [(r["mixer"], r["context"]) for r in data["decode"]] == [
        (m, c) for m in TINY.mixers for c in TINY.contexts
    ]
    for r in data["decode"]:
        assert "skipped" not in r, r
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
    growth = {g["mixer"]: g for g in data["growth"]}
    assert set(growth) == set(TINY.mixers)
    assert all(isinstance(g["train_exponent"], float) for g in growth.values())
    text = (tmp_path / "models.md").read_text()
    train_header = "| " + " | ".join(models.TRAIN_COLUMNS) + " |"
    decode_header = "| " + " | ".join(models.DECODE_COLUMNS) + " |"
    assert train_header in text and decode_header in text
    assert "| goal | target | measured | worst | met |" in text
    # One table row per measurement.
    assert sum(line.startswith("| s4d | ") for line in text.splitlines()) >= 4
    assert {p.name for p in paths} >= {"models.json", "models.md", "models_train.png"}


@pytest.mark.parametrize("exponent", [1.0, 1.37, 2.0])
def test_loglog_slope_recovers_exponent(exponent):
    xs = [512, 1024, 2048, 4096, 16384]
    ys = [3e-4 * x**exponent for x in xs]
    assert loglog_slope(xs, ys) == pytest.approx(exponent, rel=1e-9)


def test_loglog_slope_is_least_squares_under_noise():
    # Alternating +-10% noise around x^1.5: the fit stays near 1.5, a two-point ratio does not.
    xs = [2**k for k in range(9, 15)]
    ys = [x**1.5 * (1.1 if i % 2 else 0.9) for i, x in enumerate(xs)]
    assert loglog_slope(xs, ys) == pytest.approx(1.5, abs=0.05)
    two_point = math.log(ys[1] / ys[0]) / math.log(2)
    assert abs(two_point - 1.5) > 0.2


def test_loglog_slope_rejects_bad_input():
    with pytest.raises(ValueError, match="two distinct"):
        loglog_slope([8, 8], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        loglog_slope([8, 16], [0.0, 2.0])
    with pytest.raises(ValueError, match="3 x values but 2"):
        loglog_slope([1, 2, 3], [1.0, 2.0])


@pytest.mark.parametrize("mixer", ["gla", "s4d", "mamba"])
def test_decode_state_constant_in_context(mixer):
    sizes = {c: models.decode_cache_bytes(mixer, c, TINY) for c in (64, 1024, 16384)}
    assert sizes[64] > 0
    assert sizes[64] == sizes[1024] == sizes[16384], sizes


def test_attention_kv_cache_grows_linearly():
    plan = TINY
    sizes = {c: models.decode_cache_bytes("attention", c, plan) for c in (64, 1024, 4096)}
    # K and V: 2 x (b, c, d) float32 per layer, plus a few bytes of position counters.
    per_token = 2 * plan.batch * plan.d_model * 4 * plan.n_layers
    assert sizes[4096] - sizes[1024] == per_token * (4096 - 1024)
    assert sizes[1024] - sizes[64] == per_token * (1024 - 64)


def _train(mixer, length, seconds):
    return {
        "mixer": mixer,
        "length": length,
        "median_s": seconds,
        "min_s": seconds,
        "max_s": seconds,
        "tokens_per_s": length / seconds,
    }


def test_goals_from_synthetic_records():
    train = [_train("attention", 8192, 6.0), _train("gla", 8192, 1.0), _train("s4d", 8192, 2.0)]
    # mamba: step time x 8 over 2k -> 16k (exponent 1); sgconv: x 64 (exponent 2).
    train += [_train("mamba", t, t / 2048) for t in (2048, 4096, 8192, 16384)]
    train += [_train("sgconv", t, (t / 2048) ** 2) for t in (2048, 16384)]
    decode = [
        {"mixer": "gla", "context": c, "median_s": s, "min_s": s, "max_s": s}
        for c, s in ((1024, 1e-3), (16384, 1.2e-3))
    ] + [
        {"mixer": "s4d", "context": c, "median_s": s, "min_s": s, "max_s": s}
        for c, s in ((1024, 1e-3), (16384, 2e-3))
    ]
    slopes = models.growth(train, decode, models.MIXERS)
    rows = {(g["kind"], g["mixer"]): g for g in models.goals(train, decode, slopes)}
    assert rows["speedup", "gla"]["measured"] == pytest.approx(6.0)
    assert rows["speedup", "gla"]["met"] is True
    assert rows["speedup", "s4d"]["measured"] == pytest.approx(3.0)
    assert rows["speedup", "s4d"]["met"] is False
    assert rows["speedup", "mamba"]["measured"] == pytest.approx(1.5)  # 4 s vs 6 s
    assert rows["speedup", "sgconv"]["met"] is None  # no 8k point
    assert rows["growth", "mamba"]["measured"] == pytest.approx(1.0)
    assert rows["growth", "mamba"]["met"] is True
    assert rows["growth", "sgconv"]["measured"] == pytest.approx(2.0)
    assert rows["growth", "sgconv"]["met"] is False
    assert rows["growth", "gla"]["met"] is None  # one length in range: no exponent
    assert rows["decode", "gla"]["measured"] == pytest.approx(1.2)
    assert rows["decode", "gla"]["met"] is True
    assert rows["decode", "s4d"]["met"] is False
    assert rows["decode", "mamba"]["met"] is None


def test_matching_budget_names_the_mixer():
    counts = {"attention": 1000, "gla": 1050, "mamba": 1300}
    dev = models.check_matched(counts, strict=False)
    assert dev["gla"] == pytest.approx(0.05) and dev["mamba"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="'mamba'.*30.0%"):
        models.check_matched(counts)


def test_default_model_counts_are_matched():
    plan = models.PLANS["full"]
    for t in (plan.lengths[0], plan.lengths[-1]):
        dev = models.check_matched(models.param_counts(plan, t))
        assert max(abs(d) for d in dev.values()) <= models.MATCH_BUDGET


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        models.parse_args(["--repeats", "3"])
    with pytest.raises(SystemExit):
        models.parse_args(["--mixers", "gla,transformer"])
    with pytest.raises(ValueError, match="context=16"):
        models.measure_decode("gla", 16, TINY, None)
