"""S4D layer: recurrent step == parallel form, causality, paper initialization, params, dtypes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers import params
from effseq.layers.s4d import S4D
from tests.layers.packing import (
    assert_packed_equals_alone,
    assert_prefill_continues_last_document,
    layout,
)
from tests.layers.protocol import run_steps
from tests.tolerances import assert_close

D_MODEL = 16
N = 8


def _init(module, t=5, b=2, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, module.d_model))
    return x, module.init(jax.random.key(seed + 1), x)


def _unboxed(variables):
    return nn.meta.unbox(variables)["params"]


@pytest.mark.parametrize("t", [1, 13])
@pytest.mark.parametrize(
    "config",
    [
        dict(init_method="legs", discretization="zoh"),
        dict(init_method="lin", discretization="bilinear", glu=False, trainable_B=False),
    ],
)
def test_step_matches_parallel(t, config):
    module = S4D(d_model=D_MODEL, state_size=N, **config)
    x, variables = _init(module, t=t)
    parallel = jax.jit(module.apply)(variables, x)
    stepped = jax.jit(lambda v, x: run_steps(module, v, x))(variables, x)
    assert parallel.shape == (2, t, D_MODEL)
    assert_close(stepped, parallel, "float32", "value")


def test_causal_by_gradient():
    module = S4D(d_model=D_MODEL, state_size=N, conv_impl="direct")
    t = 7
    x, variables = _init(module, t=t, b=1)
    jac = jax.jacrev(lambda x: module.apply(variables, x))(x)[0, :, :, 0]  # (t, d, s, d)
    dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # (t, s)
    assert np.all(dep[np.triu_indices(t, k=1)] == 0.0)
    assert np.all(np.diag(dep) > 0)


def test_bidirectional_sees_future_and_step_raises():
    module = S4D(d_model=D_MODEL, state_size=N, causal=False)
    t = 7
    x, variables = _init(module, t=t, b=1)
    grad = jax.grad(lambda x: module.apply(variables, x)[0, 0].sum())(x)
    assert np.abs(np.asarray(grad[0, 1:])).sum() > 0
    state = module.apply(variables, 1, t, method="init_state")
    with pytest.raises(ValueError, match="bidirectional"):
        module.apply(variables, x[:, 0], state, method="step")


def _legs_skew(N_real):
    """The skew part of HiPPO-LegS's normal part, built entry by entry (S4 paper, sec. 3.3)."""
    S = np.zeros((N_real, N_real))
    for i in range(N_real):
        for j in range(N_real):
            if i > j:
                S[i, j] = -0.5 * math.sqrt((2 * i + 1) * (2 * j + 1))
            elif i < j:
                S[i, j] = 0.5 * math.sqrt((2 * i + 1) * (2 * j + 1))
    return S


def _kernel_params(init_method, n=N, **kw):
    module = S4D(d_model=D_MODEL, state_size=n, init_method=init_method, **kw)
    _, variables = _init(module)
    return _unboxed(variables)["kernel"]


def test_init_lin_and_inv():
    k = np.arange(N)
    lin = _kernel_params("lin")
    np.testing.assert_allclose(lin["A_imag"], np.broadcast_to(np.pi * k, (D_MODEL, N)), rtol=1e-6)
    inv = _kernel_params("inv")
    Nr = 2 * N  # N real states = n conjugate pairs of complex modes
    expected = Nr / np.pi * (Nr / (2 * k + 1) - 1)
    np.testing.assert_allclose(inv["A_imag"], np.broadcast_to(expected, (D_MODEL, N)), rtol=1e-6)
    # Re A = -1/2 for every initialization, stored as log(-Re A).
    for p in (lin, inv):
        np.testing.assert_allclose(-np.exp(p["log_A_real"]), -0.5, rtol=1e-6)


def test_init_legs():
    np.testing.assert_allclose(_kernel_params("legs", n=1)["A_imag"], math.sqrt(3) / 2, rtol=1e-6)
    p = _kernel_params("legs")
    w = np.asarray(p["A_imag"][0], np.float64)
    np.testing.assert_array_equal(p["A_imag"], np.broadcast_to(p["A_imag"][0], (D_MODEL, N)))
    assert np.all(w > 0) and np.all(np.diff(w) > 0)
    S = _legs_skew(2 * N)
    for lam in w:
        # i*lam is an eigenvalue of S: S - i*lam*I is singular.
        smallest = np.linalg.svd(S - 1j * lam * np.eye(2 * N), compute_uv=False)[-1]
        assert smallest < 1e-4 * max(1.0, lam)
    np.testing.assert_allclose(-np.exp(p["log_A_real"]), -0.5, rtol=1e-6)


def test_init_dt_B_C():
    module = S4D(d_model=32, state_size=64, dt_min=1e-3, dt_max=1e-1)
    _, variables = _init(module)
    p = _unboxed(variables)["kernel"]
    dt = np.exp(np.asarray(p["log_dt"]))
    assert dt.shape == (32,)
    assert np.all(dt >= 1e-3 * (1 - 1e-6)) and np.all(dt <= 1e-1 * (1 + 1e-6))
    # Log-uniform: log dt spreads over the range, not clustered at one end.
    assert np.log(dt).min() < math.log(1e-2) < np.log(dt).max()
    np.testing.assert_array_equal(p["B"][..., 0], 1.0)
    np.testing.assert_array_equal(p["B"][..., 1], 0.0)
    C = np.asarray(p["C"])
    # C ~ CN(0, 1): E|C|^2 = 1 split evenly; 2048 samples give a standard error near 0.02.
    assert abs(np.mean(C[..., 0] ** 2 + C[..., 1] ** 2) - 1.0) < 0.15
    assert abs(np.mean(C[..., 0] ** 2) - np.mean(C[..., 1] ** 2)) < 0.15


def test_unknown_init_method_raises():
    with pytest.raises(ValueError, match="init_method"):
        _init(S4D(d_model=D_MODEL, state_size=N, init_method="hippo"))


@pytest.mark.parametrize(
    "glu,trainable_B,bidirectional", [(True, True, False), (False, False, True)]
)
def test_param_count(glu, trainable_B, bidirectional):
    h, n, d = D_MODEL, N, D_MODEL
    module = S4D(
        d_model=d, state_size=n, glu=glu, trainable_B=trainable_B, causal=not bidirectional
    )
    _, variables = _init(module)
    count = sum(x.size for x in jax.tree.leaves(_unboxed(variables)))
    # log_dt, log_A_real + A_imag, (B), C as real pairs, per kernel; D; projection.
    per_kernel = h + 2 * h * n + (2 * h * n if trainable_B else 0) + 2 * h * n
    width = 2 * d if glu else d
    expected = (2 if bidirectional else 1) * per_kernel + h + d * width + width
    assert count == expected
    assert ("B" in _unboxed(variables)["kernel"]) == trainable_B


def test_axes_and_ssm_tags():
    module = S4D(d_model=D_MODEL, state_size=N, causal=False)
    _, variables = _init(module)
    axes = params.logical_axes(variables)["params"]
    for path, names in jax.tree_util.tree_leaves_with_path(
        axes, is_leaf=lambda x: isinstance(x, tuple) or x is None
    ):
        assert names is not None and None not in names, path
    # The S4 recipe: A and B (and dt, by default) at the SSM rate; D an ordinary parameter.
    named = {
        jax.tree_util.keystr(path): group
        for path, group in jax.tree_util.tree_leaves_with_path(params.groups(variables)["params"])
        if group
    }
    ssm = ("log_dt", "log_A_real", "A_imag", "B")
    expected = {f"['{k}']['{p}']": "ssm" for k in ("kernel", "kernel_bwd") for p in ssm}
    assert named == {**expected, "['D']": "decay"}
    # With the ListOps recipe's dt: null, dt trains at the main rate without weight decay.
    _, listops = _init(S4D(d_model=D_MODEL, state_size=N, dt_group="no_decay"))
    assert params.groups(listops)["params"]["kernel"]["log_dt"] == "no_decay"


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(param_dtype):
    module = S4D(d_model=D_MODEL, state_size=N, dtype=jnp.bfloat16, param_dtype=param_dtype)
    x, variables = _init(module, t=7)
    assert all(p.dtype == param_dtype for p in jax.tree.leaves(_unboxed(variables)))
    y = module.apply(variables, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    state = module.apply(variables, 2, 7, method="init_state")
    y_t, state = module.apply(variables, x[:, 0], state, method="step")
    assert y_t.dtype == jnp.bfloat16 and state.dtype == jnp.complex64


# Packed rows (segment_ids): a length-1 document, ids reused (1, 2, 1, ...), trailing padding.
PACKED_ROWS = [[3, 1, 4, 11], [8, 6, 2]]


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_packed_recurrence_equals_the_fft_convolution_per_document(causal):
    # Packed rows run through the SSM recurrence with resets; each document alone through the
    # FFT convolution (both directions' kernels without causal).
    module = S4D(d_model=D_MODEL, state_size=N, causal=causal, conv_impl="fft")
    x, variables = _init(module, t=19)
    seg, docs = layout(PACKED_ROWS, 19)
    assert_packed_equals_alone(module, variables, x, seg, docs)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_prefill_continues_the_last_document():
    module = S4D(d_model=D_MODEL, state_size=N)
    x, variables = _init(module, t=19)
    seg, docs = layout(PACKED_ROWS, 19)
    cont = jax.random.normal(jax.random.key(5), (2, 3, D_MODEL))
    assert_prefill_continues_last_document(module, variables, x, seg, docs, cont, max_len=32)
