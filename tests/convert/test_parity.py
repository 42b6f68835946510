"""Converters against the official PyTorch modules themselves, on fresh random weights
(``make test-parity``; skipped where torch or the official sources are missing, see
tests/convert/official.py)."""

import importlib

import numpy as np
import pytest

from effseq.convert import mixer_params
from effseq.models import MIXERS
from tests.convert import official
from tests.tolerances import assert_close

pytestmark = pytest.mark.parity

RUNNERS = {
    "mamba": "official_mamba",
    "mamba2": "official_mamba",
    "gla": "official_fla",
    "gdn": "official_fla",
}
CASES = [
    (name, i)
    for name, runner in RUNNERS.items()
    for i in range(len(importlib.import_module(f"tests.convert.{runner}").CASES[name]))
]


@pytest.mark.parametrize("name, i", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("t", [1, 29])
def test_matches_official_module(name, i, t):
    runner = importlib.import_module(f"tests.convert.{RUNNERS[name]}")
    options = runner.CASES[name][i]
    x = np.random.default_rng(t).standard_normal((3, t, options["d_model"])).astype(np.float32)
    try:
        state, y = runner.run(name, options, seed=100 + i, x=x)
    except official.Unavailable as e:
        pytest.skip(str(e))
    out = MIXERS[name](**options).apply({"params": mixer_params(name, state, **options)}, x)
    assert_close(out, y, "float32", "value")
