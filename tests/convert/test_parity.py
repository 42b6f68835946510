"""Converters against the official PyTorch modules themselves, on fresh random weights
(``make test-parity``; skipped where torch or the official sources are missing, see
tests/convert/official.py). For example, with torch in another virtualenv:

    EFFSEQ_OFFICIAL_SRC=/path/to/checkouts \\
    PYTHONPATH=.:/path/to/torch-venv/lib/python3.11/site-packages \\
    .venv/bin/python -m pytest -q -m parity tests/convert
"""

import importlib

import jax
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
    "rglru": "official_rglru",
    "based": "official_based",
}
# Beyond the fixtures' cases: the official defaults where they fit a CPU test.
EXTRA = {
    "rglru": [dict(d_model=32, num_heads=4)],  # lru_width = width, conv width 4
    "based": [dict(d_model=32, num_heads=2, feature_dim=16)],  # the official feature_dim
    # The official defaults but the width: d_state 128, headdim 64, expand 2, d_conv 4.
    "mamba2": [dict(d_model=32, state_size=128, expand=2, head_dim=64, num_groups=1, conv_width=4)],
}


def _cases(name):
    return importlib.import_module(f"tests.convert.{RUNNERS[name]}").CASES[name] + EXTRA.get(
        name, []
    )


CASES = [(name, i) for name in RUNNERS for i in range(len(_cases(name)))]


@pytest.mark.parametrize("name, i", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("t", [1, 29])
def test_matches_official_module(name, i, t):
    options = _cases(name)[i]
    x = np.random.default_rng(t).standard_normal((3, t, options["d_model"])).astype(np.float32)
    try:
        official.require_torch()
        runner = importlib.import_module(f"tests.convert.{RUNNERS[name]}")
        state, y = runner.run(name, options, 100 + i, x)
    except official.Unavailable as e:
        pytest.skip(str(e))
    params = mixer_params(name, state, **options)
    out = jax.jit(MIXERS[name](**options).apply)({"params": params}, x)
    assert_close(out, y, "float32", "value")
