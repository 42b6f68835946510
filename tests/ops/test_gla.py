"""Gated linear attention: fast paths against the step-by-step reference (Yang et al. 2023)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops.gla import (
    gated_linear_attention,
    gated_linear_attention_reference,
    gla_step,
)
from tests.tolerances import assert_close

B, H, DK, DV = 2, 2, 8, 6
IMPLS = ("chunked", "recurrent")


def _gates(key, shape, kind):
    """Log forget gates (<= 0) of the kinds a GLA layer meets."""
    k1, k2 = jax.random.split(key)
    if kind == "realistic":  # the GLA layer: logsigmoid(x W) / 16
        return jax.nn.log_sigmoid(2.0 * jax.random.normal(k1, shape)) / 16
    if kind == "strong":  # gates of exp(-20) per step: the naive factorisation overflows
        return jnp.full(shape, -20.0)
    if kind == "mixed":  # -20 and ~0 side by side: decays of ~1 right after tiny ones
        tiny = -1e-4 * jax.random.uniform(k1, shape)
        return jnp.where(jax.random.bernoulli(k2, 0.5, shape), -20.0, tiny)
    raise ValueError(kind)


def _inputs(t, gates="realistic", dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, t, H, DK))
    k = jax.random.normal(ks[1], (B, t, H, DK))
    v = jax.random.normal(ks[2], (B, t, H, DV))
    log_g = _gates(ks[3], (B, t, H, DK), gates)
    h0 = jax.random.normal(ks[4], (B, H, DK, DV))
    return tuple(x.astype(dtype) for x in (q, k, v, log_g, h0))


def _cotangents(t, dtype, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    do = jax.random.normal(k1, (B, t, H, DV)).astype(dtype)
    dS = jax.random.normal(k2, (B, H, DK, DV))  # S_last is float32 whatever the input dtype
    return do, dS


@functools.cache
def _reference(t, gates, dtype, seed, scale):
    """Reference outputs and gradients on the inputs of ``_inputs`` (upcast to float32)."""
    args = tuple(x.astype(jnp.float32) for x in _inputs(t, gates, dtype, seed))

    def ref(q, k, v, log_g, h0):
        return gated_linear_attention_reference(q, k, v, log_g, h0=h0, scale=scale)

    (o, S), ref_vjp = jax.vjp(ref, *args)
    do, dS = _cotangents(t, dtype)
    return o, S, ref_vjp((do.astype(jnp.float32), dS))


def _check_against_reference(fast, t, gates="realistic", dtype=jnp.float32, seed=0, scale=None):
    """Values and the gradient w.r.t. every input (q, k, v, log_g, h0) against the reference."""
    (o, S), fast_vjp = jax.vjp(fast, *_inputs(t, gates, dtype, seed))
    assert o.dtype == dtype and S.dtype == jnp.float32
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(S)).all()
    o_ref, S_ref, grads_ref = _reference(t, gates, dtype, seed, scale)
    assert_close(o, o_ref, dtype)
    assert_close(S, S_ref, dtype)
    grads = fast_vjp(_cotangents(t, dtype))
    for name, g, g_ref in zip(("q", "k", "v", "log_g", "h0"), grads, grads_ref, strict=True):
        assert g.dtype == dtype
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert_close(g, g_ref, dtype, "grad", err_msg=f"d/d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "impl,t,chunk_size",
    [
        # t < chunk_size runs as one shorter chunk; the others leave a partial last chunk, and
        # t = 300 runs several scan iterations of several chunks (with padding chunks).
        ("chunked", 1, 16),
        ("chunked", 37, 16),
        ("chunked", 37, 64),
        ("chunked", 300, 16),
        ("chunked", 37, None),  # the backend default
        # chunk_size does not apply; t = 300 spans several rematerialised segments.
        ("recurrent", 1, 16),
        ("recurrent", 37, 16),
        ("recurrent", 300, 16),
    ],
)
def test_matches_reference(impl, t, chunk_size, dtype):
    def fast(q, k, v, log_g, h0):
        return gated_linear_attention(q, k, v, log_g, h0=h0, chunk_size=chunk_size, impl=impl)

    _check_against_reference(fast, t, dtype=dtype)


@pytest.mark.parametrize(
    "impl,t,chunk_size,dtype",
    [
        ("chunked", 1, 16, jnp.float32),
        ("chunked", 37, 16, jnp.bfloat16),
        ("chunked", 300, 32, jnp.float32),
        ("recurrent", 37, 64, jnp.bfloat16),
        ("recurrent", 100, 64, jnp.float32),
    ],
)
def test_matches_reference_under_jit(impl, t, chunk_size, dtype):
    fast = jax.jit(
        lambda q, k, v, log_g, h0: gated_linear_attention(
            q, k, v, log_g, h0=h0, chunk_size=chunk_size, impl=impl
        )
    )
    _check_against_reference(fast, t, dtype=dtype, seed=3)


@pytest.mark.parametrize(
    "impl,gates,chunk_size",
    [
        ("chunked", "strong", 16),
        ("chunked", "strong", 64),
        ("chunked", "mixed", 16),
        ("chunked", "mixed", 64),
        ("recurrent", "mixed", 16),
    ],
)
def test_strong_decay_is_finite_and_exact(impl, gates, chunk_size):
    # Values, gradients (finite and equal to the reference's) with gates of exp(-20) per step.
    def fast(q, k, v, log_g, h0):
        return gated_linear_attention(q, k, v, log_g, h0=h0, chunk_size=chunk_size, impl=impl)

    _check_against_reference(jax.jit(fast), 100, gates, seed=2)


def test_odd_chunk_size_and_scale():
    # A chunk of 20 tiles into sub-chunks of 5; t = 37 leaves a partial last chunk.
    def fast(q, k, v, log_g, h0):
        return gated_linear_attention(q, k, v, log_g, h0=h0, chunk_size=20, scale=0.3)

    _check_against_reference(fast, 37, "mixed", seed=4, scale=0.3)


def test_without_h0_starts_from_zero():
    q, k, v, log_g, _ = _inputs(37)
    o, S = gated_linear_attention(q, k, v, log_g, chunk_size=16)
    zeros = jnp.zeros((B, H, DK, DV))
    o_ref, S_ref = gated_linear_attention_reference(q, k, v, log_g, h0=zeros)
    assert_close(o, o_ref)
    assert_close(S, S_ref)


@pytest.mark.parametrize("gates", ["realistic", "mixed"])
def test_step_matches_parallel(gates):
    q, k, v, log_g, h0 = _inputs(37, gates=gates)
    o, S_last = gated_linear_attention(q, k, v, log_g, h0=h0, chunk_size=16)
    step = jax.jit(gla_step)
    S, outs = h0, []
    for t in range(q.shape[1]):
        S, o_t = step(S, q[:, t], k[:, t], v[:, t], log_g[:, t])
        assert S.dtype == jnp.float32
        outs.append(o_t)
    assert_close(jnp.stack(outs, axis=1), o)
    assert_close(S, S_last)


def test_step_dtype_and_scale():
    q, k, v, log_g, h0 = _inputs(1, dtype=jnp.bfloat16)
    S, o_t = gla_step(h0, q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], scale=0.5)
    assert o_t.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    o_ref, S_ref = gated_linear_attention_reference(
        *(x.astype(jnp.float32) for x in (q, k, v, log_g)), h0=h0.astype(jnp.float32), scale=0.5
    )
    assert_close(o_t, o_ref[:, 0], jnp.bfloat16)
    assert_close(S, S_ref, jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_split_sequence_carries_state(impl):
    q, k, v, log_g, h0 = _inputs(100, seed=5)
    run = lambda sl, h: gated_linear_attention(  # noqa: E731
        q[:, sl], k[:, sl], v[:, sl], log_g[:, sl], h0=h, chunk_size=16, impl=impl
    )
    o, S = run(slice(None), h0)
    o1, S1 = run(slice(0, 45), h0)
    o2, S2 = run(slice(45, None), S1)
    assert_close(jnp.concatenate([o1, o2], axis=1), o)
    assert_close(S2, S)


@pytest.mark.parametrize(
    "impl,t0", [("chunked", 0), ("chunked", 10), ("chunked", 21), ("recurrent", 21)]
)
def test_causality(impl, t0):
    # t0 = 10 sits mid sub-chunk and mid chunk, t0 = 21 in the second chunk (chunk_size 16).
    q, k, v, log_g, h0 = _inputs(37, gates="mixed", seed=6)

    def o_at_t0(q, k, v, log_g):
        o, _ = gated_linear_attention(q, k, v, log_g, h0=h0, chunk_size=16, impl=impl)
        return o[:, t0]

    grads = jax.grad(lambda *a: jnp.sum(o_at_t0(*a) * jnp.arange(1, DV + 1)), argnums=(0, 1, 2, 3))(
        q, k, v, log_g
    )
    for name, g in zip(("q", "k", "v", "log_g"), grads, strict=True):
        g = np.asarray(g)
        assert (g[:, t0 + 1 :] == 0).all(), f"d o[{t0}] / d {name}[>{t0}] is not exactly zero"
        assert np.abs(g[:, : t0 + 1]).sum() > 0, name  # the test would catch a dead gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequence_returns_h0(impl):
    q, k, v, log_g, h0 = _inputs(5)
    o, S = gated_linear_attention(q[:, :0], k[:, :0], v[:, :0], log_g[:, :0], h0=h0, impl=impl)
    assert o.shape == (B, 0, H, DV)
    np.testing.assert_array_equal(np.asarray(S), np.asarray(h0))


def test_impl_default_is_chunked_result():
    args = _inputs(37)
    o_default, _ = gated_linear_attention(*args[:4], h0=args[4], chunk_size=16)
    o_chunked, _ = gated_linear_attention(*args[:4], h0=args[4], chunk_size=16, impl="chunked")
    np.testing.assert_array_equal(np.asarray(o_default), np.asarray(o_chunked))


def _bad(name, value):
    q, k, v, log_g, h0 = _inputs(5)
    kwargs = dict(q=q, k=k, v=v, log_g=log_g, h0=h0)
    kwargs[name] = value
    return kwargs


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("q", jnp.zeros((B, 5, H)), "`q` must have rank 4"),
        ("v", jnp.zeros((B, 5, H, DV, 1)), "`v` must have rank 4"),
        ("k", jnp.zeros((B, 6, H, DK)), "dimension 't'.*`k`"),
        ("v", jnp.zeros((B + 1, 5, H, DV)), "dimension 'b'.*`v`"),
        ("log_g", -jnp.ones((B, 5, H + 1, DK)), "dimension 'h'.*`log_g`"),
        ("k", jnp.zeros((B, 5, H, DK + 1)), "dimension 'k'.*`k`"),
        ("h0", jnp.zeros((B, H, DK, DV + 1)), "dimension 'v'.*`h0`"),
        ("h0", jnp.zeros((B, H, DK)), "`h0` must have rank 4"),
        ("q", jnp.zeros((B, 5, H, DK), jnp.complex64), "`q` must be real"),
        ("log_g", jnp.full((B, 5, H, DK), 0.5), "`log_g` .* must be <= 0"),
        ("log_g", jnp.zeros((B, 5, H, DK), jnp.int32), "`log_g` must be a floating-point"),
    ],
)
def test_bad_inputs_raise(name, value, match):
    kwargs = _bad(name, value)
    args = (kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("log_g"))
    with pytest.raises(ValueError, match=match):
        gated_linear_attention(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        gated_linear_attention_reference(*args, **kwargs)


@pytest.mark.parametrize("chunk_size", [0, -16, 16.0, True])
def test_bad_chunk_size_raises(chunk_size):
    q, k, v, log_g, _ = _inputs(5)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive Python int"):
        gated_linear_attention(q, k, v, log_g, chunk_size=chunk_size)


def test_unknown_impl_raises():
    q, k, v, log_g, _ = _inputs(5)
    with pytest.raises(ValueError, match="unknown impl='triton'"):
        gated_linear_attention(q, k, v, log_g, impl="triton")


def test_step_bad_inputs_raise():
    q, k, v, log_g, h0 = _inputs(1)
    q_t, k_t, v_t, g_t = q[:, 0], k[:, 0], v[:, 0], log_g[:, 0]
    with pytest.raises(ValueError, match="`S` must have rank 4"):
        gla_step(h0[0], q_t, k_t, v_t, g_t)
    with pytest.raises(ValueError, match="`q_t` must have rank 3"):
        gla_step(h0, q, k_t, v_t, g_t)
    with pytest.raises(ValueError, match="dimension 'v'.*`v_t`"):
        gla_step(h0, q_t, k_t, v_t[..., :-1], g_t)
    with pytest.raises(ValueError, match="dimension 'k'.*`k_t`"):
        gla_step(h0, q_t, k_t[..., :-1], v_t, g_t)
    with pytest.raises(ValueError, match="`log_g_t` .* must be <= 0"):
        gla_step(h0, q_t, k_t, v_t, jnp.abs(g_t) + 1)
    with pytest.raises(ValueError, match="`k_t` must be real"):
        gla_step(h0, q_t, k_t.astype(jnp.complex64), v_t, g_t)


def test_traced_gates_are_not_checked():
    # Under jit the sign of log_g cannot be inspected; the op must still trace.
    q, k, v, log_g, h0 = _inputs(5)
    o, _ = jax.jit(lambda g: gated_linear_attention(q, k, v, g, h0=h0))(log_g)
    o_ref, _ = gated_linear_attention_reference(q, k, v, log_g, h0=h0)
    assert_close(o, o_ref)
