"""The sequence-parallelism benchmark: its longest-length search and memory slope on fake
figures (fast), and a tiny end-to-end run on the fake CPU devices (slow)."""

import pytest

from effseq.benchmarks import sequence as bench

PLAN = bench.Plan(("gla",), (256, 512), shards=(1, 2), repeats=1, time_up_to=256, budget_mib=64)


def _rows(peaks):
    return [{"length": t, "peak_mib": p} for t, p in peaks.items()]


def test_longest_doubles_from_the_measured_lengths(monkeypatch):
    # 1 MiB per 16 tokens: 512 -> 32 MiB, 1024 -> 64 (fits), 2048 -> 128 (does not).
    monkeypatch.setattr(bench, "peak_mib", lambda mixer, t, n, plan: t / 16)
    found = bench.longest("gla", 1, PLAN, _rows({256: 16.0, 512: 32.0}))
    assert found == {"longest": 1024, "peak_mib_at_longest": 64.0, "search_capped": False}


def test_longest_stops_at_the_measured_lengths_when_a_longer_one_did_not_fit(monkeypatch):
    monkeypatch.setattr(bench, "peak_mib", lambda *a: pytest.fail("nothing to search"))
    assert bench.longest("gla", 1, PLAN, _rows({256: 60.0, 512: 70.0}))["longest"] == 256
    assert bench.longest("gla", 1, PLAN, _rows({256: 65.0, 512: 70.0}))["longest"] is None


def test_search_cap_is_reported(monkeypatch):
    monkeypatch.setattr(bench, "peak_mib", lambda *a: 1.0)
    plan = bench.Plan(("gla",), (256, 512), budget_mib=64, max_search=2048)
    found = bench.longest("gla", 1, plan, _rows({256: 1.0, 512: 1.0}))
    assert found["longest"] == 2048 and found["search_capped"]


def test_slope_is_bytes_per_token():
    rows = _rows({1024: 10.0, 2048: 12.0})  # 2 MiB more for 1024 more tokens
    assert bench.slope_bytes_per_token(rows) == pytest.approx(2 * 2**20 / 1024)


@pytest.mark.slow
def test_tiny_run_end_to_end():
    result = bench.run(PLAN, log=lambda *a: None)
    recs = {(r["length"], r["shards"]): r for r in result["records"]}
    assert set(recs) == {(256, 1), (512, 1), (256, 2), (512, 2)}
    assert recs[(256, 1)]["step_s"] > 0 and recs[(512, 1)]["step_s"] is None
    # Two shards hold half of every row's activations: less per device at the longer length.
    assert recs[(512, 2)]["peak_mib"] < recs[(512, 1)]["peak_mib"]
    text = bench.markdown(result)
    assert "| gla |" in text and "sequence=2" in text
