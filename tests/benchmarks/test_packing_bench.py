"""The packed-vs-padded benchmark runs end to end on a tiny plan, and its first-fit packer
places every document once without overfilling a row."""

import dataclasses

import numpy as np
import pytest

from effseq.benchmarks import packing


def test_first_fit_places_every_document_once():
    lengths = np.array([5, 3, 8, 1, 7, 2, 8, 4])
    rows = packing.first_fit(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert rows[0] == [0, 1]  # 5 + 3 fills the first row; later documents go elsewhere


@pytest.mark.slow  # five compiled train steps, about 20 s
def test_tiny_run_reports_every_scheme():
    plan = dataclasses.replace(
        packing.PLANS["quick"],
        mixers=("gla",),
        max_len=64,
        d_model=16,
        n_layers=1,
        documents=40,
        median_len=12,
        min_len=2,
        repeats=1,
    )
    result = packing.run(plan, log=lambda *_: None)
    data, (rec,) = result["data"], result["records"]
    assert data["padded_fill"] < data["bucketed_fill"] < data["packed_fill"] <= 1.0
    for key in ("tokens_per_s_packed", "tokens_per_s_padded", "tokens_per_s_bucketed"):
        assert rec[key] > 0
    assert "| gla |" in packing.markdown(result)
