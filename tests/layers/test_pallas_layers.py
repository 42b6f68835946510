"""The layers whose op has a Pallas impl take it through their impl option (the way a config
reaches it: ``model.mixer_options.scan_impl`` / ``impl``) and compute what their default does:
outputs, and (slow) the gradients of the input and every parameter and the bidirectional
forms where the layer has one. Interpret mode on a CPU."""

import jax
import jax.numpy as jnp
import pytest

from effseq.layers.gdn import GatedDeltaNet
from effseq.layers.gla import GLA
from effseq.layers.mamba import Mamba
from effseq.layers.mamba2 import Mamba2
from tests.tolerances import assert_close

D_MODEL, T = 32, 16

# layer class, option name, extra options (small heads, chunks the kernels accept), causal forms
CASES = {
    "gla": (GLA, "impl", {"num_heads": 2, "chunk_size": 16}, (True,)),
    "gdn": (GatedDeltaNet, "impl", {"num_heads": 2, "chunk_size": 16}, (True,)),
    "mamba": (Mamba, "scan_impl", {"state_size": 8, "chunk_size": 8}, (True, False)),
    "mamba2": (
        Mamba2,
        "scan_impl",
        {"head_dim": 16, "state_size": 16, "chunk_size": 16},
        (True, False),
    ),
}
# Fast: the causal outputs of GLA, Mamba and Mamba-2 (the option reaches the kernels; the
# kernels' gradients are checked op by op in tests/ops/pallas). Slow (make test-slow): GDN's
# (its impl option is older and already passed through), the gradients of the input and every
# parameter, and the bidirectional forms (the same kernels on flipped inputs).
PARAMS = [
    pytest.param(
        name,
        causal,
        grads,
        marks=() if causal and not grads and name != "gdn" else pytest.mark.slow,
    )
    for name, case in CASES.items()
    for causal in case[3]
    for grads in (False, True)
]


def _id(p):
    name, causal, grads = p.values
    return f"{name}-{'causal' if causal else 'bidirectional'}{'-grads' if grads else ''}"


@pytest.mark.parametrize("name,causal,grads", PARAMS, ids=[_id(p) for p in PARAMS])
def test_pallas_layer_equals_the_default(name, causal, grads):
    cls, option, extra, _ = CASES[name]
    base = cls(d_model=D_MODEL, causal=causal, **extra)
    fast = cls(d_model=D_MODEL, causal=causal, **extra, **{option: "pallas"})
    x = jax.random.normal(jax.random.key(0), (2, T, D_MODEL))
    variables = base.init(jax.random.key(1), x)
    if not grads:
        assert_close(jax.jit(fast.apply)(variables, x), jax.jit(base.apply)(variables, x))
        return
    cot = jax.random.normal(jax.random.key(2), (2, T, D_MODEL))

    def loss(module):
        def f(variables, x):
            return jnp.sum(module.apply(variables, x) * cot)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    (want, (want_p, want_x)) = loss(base)(variables, x)
    (got, (got_p, got_x)) = loss(fast)(variables, x)
    assert_close(got, want)
    assert_close(got_x, want_x, kind="grad")
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got_p), jax.tree.leaves(want_p), strict=True
    ):
        assert_close(g, w, kind="grad", err_msg=jax.tree_util.keystr(path))
