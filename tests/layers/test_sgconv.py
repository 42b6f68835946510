"""SGConv layer: decoding == parallel form, causality, kernel and normalization, params, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq import ops
from effseq.layers import params
from effseq.layers.sgconv import SGConv, num_scales
from tests.layers.packing import (
    assert_packed_equals_alone,
    assert_prefill_continues_last_document,
    layout,
)
from tests.layers.protocol import run_steps
from tests.tolerances import assert_close

D_MODEL = 16
KERNEL_DIM = 4
MAX_LEN = 37


def _module(**kw):
    return SGConv(d_model=D_MODEL, max_len=MAX_LEN, kernel_dim=KERNEL_DIM, **kw)


def _init(module, t=5, b=2, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, module.d_model))
    return x, module.init(jax.random.key(seed + 1), x)


@pytest.mark.parametrize("t", [1, MAX_LEN])
@pytest.mark.parametrize("glu", [True, False])
def test_step_matches_parallel(t, glu):
    module = _module(glu=glu)
    x, variables = _init(module, t=t)
    parallel = jax.jit(module.apply)(variables, x)
    stepped = jax.jit(lambda v, x: run_steps(module, v, x, MAX_LEN))(variables, x)
    assert parallel.shape == (2, t, D_MODEL)
    assert_close(stepped, parallel, "float32", "value")


def test_num_scales():
    # Natural lengths for kernel_dim 4: 4, 8, 16, 32, 64 for s = 1..5.
    assert num_scales(MAX_LEN, KERNEL_DIM) == 5
    assert num_scales(32, KERNEL_DIM) == 4
    assert num_scales(1, KERNEL_DIM) == 1
    assert num_scales(1024, 64) == 5  # 64 * 2**4 = 1024
    for max_len in (1, 5, 37, 100):
        s = num_scales(max_len, KERNEL_DIM)
        assert ops.sgconv_length(s, KERNEL_DIM) >= max_len
        assert s == 1 or ops.sgconv_length(s - 1, KERNEL_DIM) < max_len


def test_kernel_norm_fixed_at_init():
    module = _module()
    x, variables = _init(module)
    unboxed = nn.meta.unbox(variables)
    w = unboxed["params"]["sub_kernels"]
    assert w.shape == (num_scales(MAX_LEN, KERNEL_DIM), D_MODEL, KERNEL_DIM)
    # Z = per-channel L2 norm of the kernel assembled from the initial sub-kernels (reference).
    full = ops.sgconv_kernel_reference(w, ops.sgconv_length(w.shape[0], KERNEL_DIM), 2.0)
    assert_close(unboxed["constants"]["kernel_norm"], np.linalg.norm(full, axis=-1))
    # apply never writes Z, even when allowed to.
    _, mutated = module.apply(variables, x, mutable=["constants"])
    np.testing.assert_array_equal(
        nn.meta.unbox(mutated)["constants"]["kernel_norm"], unboxed["constants"]["kernel_norm"]
    )
    # Z is not recomputed from the current sub-kernels: K / |K| would be scale invariant, so a
    # change of output under scaling shows the fixed Z is used.
    scaled = dict(variables, params=dict(variables["params"]))
    scaled["params"]["sub_kernels"] = nn.meta.replace_boxed(
        variables["params"]["sub_kernels"], 2 * w
    )
    assert not np.allclose(module.apply(scaled, x), module.apply(variables, x))


def test_causal_by_gradient():
    module = _module(conv_impl="direct")
    t = 7
    x, variables = _init(module, t=t, b=1)
    jac = jax.jacrev(lambda x: module.apply(variables, x))(x)[0, :, :, 0]  # (t, d, s, d)
    dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # (t, s)
    assert np.all(dep[np.triu_indices(t, k=1)] == 0.0)
    assert np.all(np.diag(dep) > 0)


def test_bidirectional_sees_future_and_step_raises():
    module = _module(causal=False)
    t = 7
    x, variables = _init(module, t=t, b=1)
    grad = jax.grad(lambda x: module.apply(variables, x)[0, 0].sum())(x)
    assert np.abs(np.asarray(grad[0, 1:])).sum() > 0
    state = module.apply(variables, 1, t, method="init_state")
    with pytest.raises(ValueError, match="bidirectional"):
        module.apply(variables, x[:, 0], state, method="step")


@pytest.mark.parametrize("glu,bidirectional", [(True, False), (False, True)])
def test_param_count(glu, bidirectional):
    module = _module(glu=glu, causal=not bidirectional)
    _, variables = _init(module)
    count = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(variables)["params"]))
    s, h, d = num_scales(MAX_LEN, KERNEL_DIM), D_MODEL, D_MODEL
    width = 2 * d if glu else d
    expected = (2 if bidirectional else 1) * s * h * KERNEL_DIM + h + d * width + width
    assert count == expected
    n_const = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(variables)["constants"]))
    assert n_const == (2 if bidirectional else 1) * h


def test_axes_and_ssm_tags():
    module = _module(causal=False)
    _, variables = _init(module)
    for col in ("params", "constants"):
        axes = params.logical_axes(variables)[col]
        for path, names in jax.tree_util.tree_leaves_with_path(
            axes, is_leaf=lambda x: isinstance(x, tuple) or x is None
        ):
            assert names is not None and None not in names, (col, path)
    # The SGConv code's recipe: sub-kernels at their own rate (with weight decay), D ordinary.
    named = {
        jax.tree_util.keystr(path): group
        for path, group in jax.tree_util.tree_leaves_with_path(params.groups(variables))
        if group
    }
    assert named == {
        "['params']['sub_kernels']": "ssm_decay",
        "['params']['sub_kernels_bwd']": "ssm_decay",
        "['params']['D']": "decay",
    }


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(param_dtype):
    module = _module(dtype=jnp.bfloat16, param_dtype=param_dtype)
    x, variables = _init(module, t=7)
    assert all(p.dtype == param_dtype for p in jax.tree.leaves(nn.meta.unbox(variables)["params"]))
    y = module.apply(variables, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    state = module.apply(variables, 2, MAX_LEN, method="init_state")
    y_t, state = module.apply(variables, x[:, 0], state, method="step")
    assert y_t.dtype == jnp.bfloat16


# Packed rows (segment_ids): a length-1 document, ids reused (1, 2, 1, ...), trailing padding.
PACKED_ROWS = [[3, 1, 4, 11], [8, 6, 2]]


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_equal_each_document_alone(causal):
    # Packed: the masked direct form (no tap crosses a boundary); alone: the FFT convolution.
    module = _module(causal=causal, conv_impl="fft")
    x, variables = _init(module, t=19)
    seg, docs = layout(PACKED_ROWS, 19)
    assert_packed_equals_alone(module, variables, x, seg, docs)


# The conformance suite (tests/conformance) checks this form for every mixer; make test-slow.
@pytest.mark.slow
def test_packed_prefill_keeps_the_last_document_in_the_window():
    module = _module()
    x, variables = _init(module, t=19)
    seg, docs = layout(PACKED_ROWS, 19)
    cont = jax.random.normal(jax.random.key(5), (2, 3, D_MODEL))
    window = assert_prefill_continues_last_document(module, variables, x, seg, docs, cont, MAX_LEN)
    # Its inputs only, zeros before its start, the window ending at its last real token.
    for r in range(2):
        _, s, e = max(d for d in docs if d[0] == r)
        _, alone = module.apply(variables, x[r : r + 1, s:e], MAX_LEN, method="prefill")
        np.testing.assert_array_equal(window[r], alone[0])
