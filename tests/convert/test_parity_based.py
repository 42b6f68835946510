"""Parity of the converted Based layer with fla-org's BasedLinearAttention, run live (needs
torch and the official sources; skipped otherwise). For example:

    EFFSEQ_OFFICIAL_SRC=/work/official \\
    PYTHONPATH=/work/main:/work/parity-venv/lib/python3.11/site-packages \\
    .venv/bin/python -m pytest -q tests/convert/test_parity_based.py -p no:cacheprovider -m parity
"""

import jax
import numpy as np
import pytest

from effseq.convert import mixer_params
from effseq.models import MIXERS
from tests.convert import official
from tests.tolerances import assert_close

CASES = [
    {"d_model": 16, "num_heads": 2, "feature_dim": 8},
    {"d_model": 24, "num_heads": 3, "feature_dim": 8},
    {"d_model": 32, "num_heads": 2, "feature_dim": 16},  # the official feature_dim
]


@pytest.mark.parity
@pytest.mark.parametrize("i", range(len(CASES)))
def test_converted_module_matches_the_official_forward(i):
    try:
        from tests.convert import official_based

        options = CASES[i]
        x = np.random.default_rng(7 + i).standard_normal((2, 29, options["d_model"]))
        state, y = official_based.run("based", options, 1234 + i, x.astype(np.float32))
    except official.Unavailable as e:
        pytest.skip(str(e))
    params = mixer_params("based", state, **options)
    out = jax.jit(MIXERS["based"](**options).apply)({"params": params}, x.astype(np.float32))
    assert_close(out, y, "float32", "value")
