"""Parity of the ``rglru`` converter with recurrentgemma's official PyTorch ``RecurrentBlock``,
on modules built fresh here (the fixture test in tests/layers/test_rglru.py replays stored
ones without torch). Needs torch and the official source (tests/convert/official.py); skips
otherwise. Run with

    EFFSEQ_OFFICIAL_SRC=/path/to/checkouts pytest -m parity tests/convert/test_parity_rglru.py
"""

import jax
import numpy as np
import pytest

from effseq.convert import mixer_params
from effseq.models import MIXERS
from tests.convert import official, official_rglru
from tests.tolerances import assert_close

CASES = official_rglru.CASES["rglru"] + [
    # The official defaults: lru_width = width, conv1d_temporal_width = 4; a longer sequence.
    dict(d_model=32, num_heads=4),
]


@pytest.mark.parity
@pytest.mark.parametrize("i", range(len(CASES)))
def test_rglru_matches_official(i):
    options = CASES[i]
    seed = 100 + i  # not the fixtures' seeds
    x = np.random.default_rng(seed).standard_normal((2, 29, options["d_model"]))
    x = x.astype(np.float32)
    try:
        state, y = official_rglru.run("rglru", options, seed, x)
    except official.Unavailable as e:
        pytest.skip(str(e))
    params = mixer_params("rglru", state, **options)
    got = jax.jit(MIXERS["rglru"](**options).apply)({"params": params}, x)
    assert_close(got, y, "float32", "value")
