import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers import params
from effseq.layers.mamba import Mamba, dt_bias_init
from tests.layers.protocol import abstract_init, init, run_steps
from tests.tolerances import assert_close

D_MODEL = 16


@pytest.mark.parametrize("t", [1, 37])
def test_parallel_equals_step(t):
    # chunk_size 16: t = 37 spans three chunks, the last one partial.
    module = Mamba(d_model=D_MODEL, chunk_size=16)
    variables, x = init(module, t=t)
    y = jax.jit(module.apply)(variables, x)
    y_steps = jax.jit(lambda v, x: run_steps(module, v, x))(variables, x)
    assert y.shape == x.shape
    assert_close(y_steps, y, "float32", "value")


def _jacobian(module, variables, x):
    """d y[0, t] / d x[0, s] summed over channels: (t, s)."""
    jac = jax.jacrev(lambda x: module.apply(variables, x[None])[0])(x[0])  # (t, d, t, d)
    return np.asarray(jnp.abs(jac).sum(axis=(1, 3)))


def test_causal_by_gradient():
    module = Mamba(d_model=D_MODEL, chunk_size=4)
    variables, x = init(module, t=7, b=1)
    jac = _jacobian(module, variables, x)
    assert np.all(jac[np.triu_indices(7, 1)] == 0.0)
    assert np.all(np.diag(jac) > 0)


def test_bidirectional_sees_future_and_step_raises():
    module = Mamba(d_model=D_MODEL, causal=False)
    variables, x = init(module, t=7, b=1)
    jac = _jacobian(module, variables, x)
    assert np.all(jac[np.triu_indices(7, 1)] > 0)
    assert np.all(jac[np.tril_indices(7, -1)] > 0)
    state = module.apply(variables, 1, 7, method="init_state")
    with pytest.raises(ValueError, match="bidirectional"):
        module.apply(variables, x[:, 0], state, method="step")


def test_initialization_matches_paper():
    n = 16
    module = Mamba(d_model=32, state_size=n)
    variables, _ = init(module)
    p = jax.tree.map(np.asarray, nn.unbox(variables))["params"]
    e, r = 64, 2  # expand 2, dt_rank ceil(32 / 16)
    # S4D-Real: A = -(i + 1) for 0-based state index i, the same in every channel.
    A = -np.exp(p["A_log"])
    np.testing.assert_allclose(A, -np.broadcast_to(np.arange(1, n + 1), (e, n)), rtol=1e-6)
    np.testing.assert_array_equal(p["D"], np.ones(e))
    dt = np.asarray(jax.nn.softplus(p["dt_bias"]))
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5)))
    assert p["dt_proj"].shape == (r, e)
    assert np.all(np.abs(p["dt_proj"]) <= r**-0.5)
    assert np.abs(p["dt_proj"]).max() > 0.5 * r**-0.5
    assert np.all(np.abs(p["conv_kernel"]) <= 4**-0.5)


def test_dt_bias_log_uniform_and_floor():
    # softplus(bias) is log-uniform in [dt_min, dt_max]: its log's empirical CDF is linear.
    bias = dt_bias_init(1e-3, 1e-1, 1e-4)(jax.random.key(0), (20000,))
    dt = np.asarray(jax.nn.softplus(bias), np.float64)
    u = np.sort((np.log(dt) - math.log(1e-3)) / (math.log(1e-1) - math.log(1e-3)))
    assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
    assert np.abs(u - np.linspace(0, 1, u.size)).max() < 0.02
    # The floor clamps the small end of the range.
    floored = jax.nn.softplus(dt_bias_init(1e-6, 1e-1, 1e-4)(jax.random.key(1), (20000,)))
    assert float(floored.min()) == pytest.approx(1e-4, rel=1e-4)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_parameter_count(bidirectional):
    d, n, w = 24, 8, 4
    module = Mamba(d_model=d, state_size=n, conv_width=w, causal=not bidirectional)
    variables = abstract_init(module)
    e, r = 2 * d, math.ceil(d / 16)
    branch = e * w + e + e * (r + 2 * n) + r * e + e + e * n + e
    expected = d * 2 * e + e * d + branch * (2 if bidirectional else 1)
    assert sum(x.size for x in jax.tree.leaves(variables)) == expected


@pytest.mark.parametrize("bidirectional", [False, True])
def test_axes_and_ssm_tags(bidirectional):
    module = Mamba(d_model=D_MODEL, causal=not bidirectional)
    variables = abstract_init(module)
    axes = jax.tree.leaves(params.logical_axes(variables), is_leaf=lambda a: isinstance(a, tuple))
    assert axes and all(a is not None and None not in a for a in axes)
    # The Mamba code's recipe: A_log, D (and dt bias) without weight decay at the main rate.
    named = params.groups(variables)["params"]
    tagged = {"A_log", "dt_bias", "D"}
    if bidirectional:
        tagged |= {"bwd_" + name for name in tagged}
    assert {name: g for name, g in named.items() if g} == dict.fromkeys(tagged, "no_decay")
    assert not any(jax.tree.leaves(params.ssm_mask(variables)))


def test_bfloat16_compute_and_param_dtype():
    module = Mamba(d_model=D_MODEL, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables, x = init(module, t=9)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(variables))
    y = module.apply(variables, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))
    state = module.apply(variables, 2, 9, method="init_state")
    assert state["ssm"].dtype == jnp.float32
    y_t, state = module.apply(variables, x[:, 0], state, method="step")
    assert y_t.dtype == jnp.bfloat16 and state["ssm"].dtype == jnp.float32
    # float32 compute over bfloat16-stored parameters.
    y32 = Mamba(d_model=D_MODEL, param_dtype=jnp.bfloat16).apply(variables, x)
    assert y32.dtype == jnp.float32


# -- packed sequences (segment_ids) -----------------------------------------------------------
# The helpers below are shared by the packing tests of mamba2, gdn and rglru (imported from
# here). Two packed rows of t = 15, id 0 = padding: documents of 3, 1, 6 and 2 tokens (then 3
# padding; the id 1 comes back after the length-1 document, and the last document is shorter
# than a width-4 conv's window) and of 5, 2 and 7 tokens (then 1 padding). With chunks of 4,
# documents start inside chunks (3, 5, 7, 10) and at a chunk boundary (4), and t is not a
# multiple of the chunk.
PACKED_IDS = np.array(
    [
        [1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 3, 3, 0, 0, 0],
        [2, 2, 2, 2, 2, 1, 1, 3, 3, 3, 3, 3, 3, 3, 0],
    ],
    np.int32,
)


def packed_documents(ids):
    """[(row, start, length)] of every document of packed rows ``ids`` (b, t), 0 = padding."""
    docs = []
    for r, row in enumerate(np.asarray(ids)):
        start = None
        for i, v in enumerate([*row, 0]):
            if start is not None and (v == 0 or v != row[start]):
                docs.append((r, start, i - start))
                start = None
            if v != 0 and start is None:
                start = i
    return docs


def _place(values, docs, length):
    """Each document's slice of packed values (b, t, ...) as its own row, from position 0,
    zero beyond the document: (len(docs), length, ...), and its mask."""
    out = np.zeros((len(docs), length, *values.shape[2:]), np.float32)
    mask = np.zeros((len(docs), length), bool)
    for i, (r, s, n) in enumerate(docs):
        out[i, :n] = values[r, s : s + n]
        mask[i, :n] = True
    return out, mask


def assert_packed_equals_alone(module, variables, ids=PACKED_IDS, seed=5):
    """Packed rows ``ids`` through ``module``: each document's outputs and the gradients of a
    loss w.r.t. its inputs equal those of the document run alone, and the parameters'
    gradients those of all documents run alone (summed). Alone = one row per document, right
    padded to t and masked (padding invariance is checked by each layer's own tests), so one
    jitted call covers every document."""
    b, t = ids.shape
    kx, kc = jax.random.split(jax.random.key(seed))
    x = np.asarray(jax.random.normal(kx, (b, t, module.d_model)))
    real = (ids != 0)[..., None]
    cot = np.asarray(jax.random.normal(kc, (b, t, module.d_model))) * real
    docs = packed_documents(ids)
    x_alone, mask = _place(x, docs, t)
    cot_alone, _ = _place(cot, docs, t)

    @jax.jit
    def packed(v, x):
        def loss(v, x):
            y = module.apply(v, x, segment_ids=jnp.asarray(ids))
            return jnp.sum(y * cot), y

        return jax.grad(loss, (0, 1), has_aux=True)(v, x)

    @jax.jit
    def alone(v, x):
        def loss(v, x):
            y = module.apply(v, x, jnp.asarray(mask))
            return jnp.sum(y * cot_alone), y

        return jax.grad(loss, (0, 1), has_aux=True)(v, x)

    (gv, gx), y = packed(variables, jnp.asarray(x))
    (gv_alone, gx_alone), y_alone = alone(variables, jnp.asarray(x_alone))
    assert_close(_place(np.asarray(y), docs, t)[0], y_alone * mask[..., None], "float32", "value")
    assert_close(_place(np.asarray(gx), docs, t)[0], gx_alone, "float32", "grad")
    # Padded inputs are never read.
    assert np.all(np.asarray(gx)[~(ids != 0)] == 0)
    for (path, g), g_alone in zip(
        jax.tree_util.tree_leaves_with_path(gv), jax.tree.leaves(gv_alone), strict=True
    ):
        assert_close(g, g_alone, "float32", "grad", err_msg=jax.tree_util.keystr(path))


def assert_packed_prefill_continues(module, variables, ids=PACKED_IDS, steps=3, seed=7):
    """A prefill over packed rows ``ids`` equals the parallel form on them, and ``step`` then
    continues each row's last document exactly as if it had been run alone. Returns the
    prefill's state."""
    b, t = ids.shape
    kx, kc = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (b, t, module.d_model))
    cont = jax.random.normal(kc, (b, steps, module.d_model))
    seg = jnp.asarray(ids)

    @jax.jit
    def run(v, x, cont):
        y0, state = module.apply(v, x, t + steps, method="prefill", segment_ids=seg)

        def body(state, x_t):
            y_t, state = module.apply(v, x_t, state, method="step")
            return state, y_t

        _, ys = jax.lax.scan(body, state, jnp.moveaxis(cont, 1, 0))
        return y0, jnp.moveaxis(ys, 0, 1), state, module.apply(v, x, segment_ids=seg)

    y0, ys, state, y_parallel = run(variables, x, cont)
    real = (ids != 0)[..., None]
    assert_close(np.asarray(y0) * real, np.asarray(y_parallel) * real, "float32", "value")
    # Each row's last document, then the continuation, alone (right padded and masked).
    last = {r: (s, n) for r, s, n in packed_documents(ids)}
    length = max(n for _, n in last.values()) + steps
    x_alone = np.zeros((b, length, module.d_model), np.float32)
    mask = np.zeros((b, length), bool)
    for r, (s, n) in last.items():
        x_alone[r, :n] = np.asarray(x)[r, s : s + n]
        x_alone[r, n : n + steps] = np.asarray(cont)[r]
        mask[r, : n + steps] = True
    y_alone = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(x_alone), mask))
    for r, (s, n) in last.items():
        assert_close(y0[r, s : s + n], y_alone[r, :n], "float32", "value")
        assert_close(ys[r], y_alone[r, n : n + steps], "float32", "value")
    return state


@pytest.mark.parametrize("causal", [True, False])
def test_packed_equals_documents_alone(causal):
    module = Mamba(d_model=D_MODEL, chunk_size=4, causal=causal)
    variables, _ = init(module, t=15)
    assert_packed_equals_alone(module, variables)


def test_packed_prefill_then_step():
    module = Mamba(d_model=D_MODEL, chunk_size=4)
    variables, _ = init(module, t=15)
    assert_packed_prefill_continues(module, variables)
