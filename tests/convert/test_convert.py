"""The converters against fixtures written from the official modules (tests/convert/
make_fixtures.py), and their errors. No torch needed."""

import json
import pathlib

import jax
import numpy as np
import pytest

from effseq.convert import CONVERTERS, mixer_params
from effseq.models import MIXERS
from tests.tolerances import assert_close

FIXTURES = sorted((pathlib.Path(__file__).parent / "fixtures").glob("*.npz"))


def load(path):
    with np.load(path) as z:
        options = json.loads(str(z["options"]))
        state = {k[len("state/") :]: z[k] for k in z.files if k.startswith("state/")}
        return path.stem.rsplit("-", 1)[0], options, state, z["x"], z["y"]


def test_every_converter_has_fixtures():
    names = {path.stem.rsplit("-", 1)[0] for path in FIXTURES}
    assert set(CONVERTERS) <= names, f"converters without a fixture: {set(CONVERTERS) - names}"


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_equals_the_official_output(path):
    name, options, state, x, y = load(path)
    params = mixer_params(name, state, **options)
    out = jax.jit(MIXERS[name](**options).apply)({"params": params}, x)
    assert_close(out, y, "float32", "value")


def _mamba2():
    return load(next(p for p in FIXTURES if p.stem == "mamba2-0"))


def test_missing_key_is_named():
    _, options, state, _, _ = _mamba2()
    del state["dt_bias"]
    with pytest.raises(ValueError, match="no key 'dt_bias'"):
        mixer_params("mamba2", state, **options)


def test_wrong_shape_is_named():
    # A checkpoint with another state size than the options say.
    _, options, state, _, _ = _mamba2()
    with pytest.raises(ValueError, match=r"state_dict\['in_proj.weight'\] has shape"):
        mixer_params("mamba2", state, **{**options, "state_size": 16})


def test_unused_key_is_named():
    _, options, state, _, _ = _mamba2()
    state["norm.bias"] = np.zeros_like(state["norm.weight"])
    with pytest.raises(ValueError, match="'norm.bias' have no place"):
        mixer_params("mamba2", state, **options)


def test_bad_name_and_options():
    _, options, state, _, _ = _mamba2()
    with pytest.raises(ValueError, match="no converter for mixer 's4d'"):
        mixer_params("s4d", state, **options)
    with pytest.raises(ValueError, match="bad options for Mamba2.*d_state"):
        mixer_params("mamba2", state, **options, d_state=8)
    with pytest.raises(ValueError, match="official Mamba2 is causal"):
        mixer_params("mamba2", state, **options, causal=False)
    with pytest.raises(ValueError, match="must map keys to arrays"):
        mixer_params("mamba2", list(state.items()), **options)


def test_gla_needs_the_rms_norm():
    _, options, state, _, _ = load(next(p for p in FIXTURES if p.stem == "gla-0"))
    with pytest.raises(ValueError, match="pass norm='rms'"):
        mixer_params("gla", state, **{**options, "norm": "layer"})


def test_params_take_the_layer_dtype():
    import jax.numpy as jnp

    _, options, state, _, _ = _mamba2()
    params = mixer_params("mamba2", state, **options, param_dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
