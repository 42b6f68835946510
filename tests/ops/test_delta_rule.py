"""The gated delta rule (GDN, and KDA's per-channel gates): fast paths against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops.delta_rule import (
    gated_delta_rule,
    gated_delta_rule_reference,
    gated_delta_rule_step,
)
from tests.tolerances import assert_close

B, H, DK, DV = 2, 2, 8, 8
NAMES = ("q", "k", "v", "log_g", "beta", "h0")


def _gates(key, shape, kind):
    """Log gates (<= 0) of the kinds a GDN layer meets, and the extremes."""
    k1, k2 = jax.random.split(key)
    if kind == "realistic":
        return jax.nn.log_sigmoid(2.0 * jax.random.normal(k1, shape)) / 4
    if kind == "strong":  # gates of about exp(-20) per step
        return -20.0 + 0.5 * jax.random.uniform(k1, shape)
    if kind == "mixed":  # exp(-20) and ~1 side by side: decays of ~1 right after tiny ones
        tiny = -1e-4 * jax.random.uniform(k1, shape)
        return jnp.where(jax.random.bernoulli(k2, 0.5, shape), -20.0, tiny)
    raise ValueError(kind)


def _keys(key, t, kind):
    """L2-normalised keys (as the layer gives them), random or near-orthogonal."""
    if kind == "random":
        k = jax.random.normal(key, (B, t, H, DK))
    else:  # cycle through the basis with a little noise: the delta rule overwrites slots
        basis = jnp.eye(DK)[jnp.arange(t) % DK][None, :, None, :]
        k = basis + 0.01 * jax.random.normal(key, (B, t, H, DK))
    return k / jnp.linalg.norm(k, axis=-1, keepdims=True)


@functools.cache
def _inputs(t, per_channel=False, gates="realistic", keys="random", beta="uniform", seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, t, H, DK))
    k = _keys(ks[1], t, keys)
    v = jax.random.normal(ks[2], (B, t, H, DV))
    log_g = _gates(ks[3], (B, t, H, DK) if per_channel else (B, t, H), gates)
    if beta == "uniform":
        b = jax.random.uniform(ks[4], (B, t, H))
    else:  # exactly 0 (no write) or 1 (full overwrite)
        b = jax.random.bernoulli(ks[4], 0.5, (B, t, H)).astype(jnp.float32)
    h0 = jax.random.normal(ks[5], (B, H, DK, DV))
    return q, k, v, log_g, b, h0


def _cotangents(t, dtype):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    do = jax.random.normal(k1, (B, t, H, DV)).astype(dtype)
    dS = jax.random.normal(k2, (B, H, DK, DV))  # S_last is float32 whatever the input dtype
    return do, dS


# Module-level jitted value-and-gradient functions, so tests on equal shapes share a compile.
@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _fast_vjp(args, cotangents, impl, chunk_size):
    def fast(q, k, v, log_g, beta, h0):
        return gated_delta_rule(q, k, v, log_g, beta, h0=h0, chunk_size=chunk_size, impl=impl)

    out, vjp = jax.vjp(fast, *args)
    return out, vjp(cotangents)


@jax.jit
def _reference_vjp(args, cotangents):
    def ref(q, k, v, log_g, beta, h0):
        return gated_delta_rule_reference(q, k, v, log_g, beta, h0=h0)

    out, vjp = jax.vjp(ref, *args)
    return out, vjp(cotangents)


@functools.cache
def _reference(t, dtype, *spec):
    """Reference values and gradients on the inputs (rounded to ``dtype``, then upcast)."""
    args = tuple(x.astype(dtype).astype(jnp.float32) for x in _inputs(t, *spec))
    do, dS = _cotangents(t, dtype)
    return _reference_vjp(args, (do.astype(jnp.float32), dS))


def _check(
    t,
    per_channel=False,
    gates="realistic",
    keys="random",
    beta="uniform",
    seed=0,
    *,
    impl="chunked",
    chunk_size=16,
    dtype=jnp.float32,
):
    """Values, final state and the gradient of every input, h0 included, against the reference."""
    spec = (per_channel, gates, keys, beta, seed)
    args = tuple(x.astype(dtype) for x in _inputs(t, *spec))
    (o, S), grads = _fast_vjp(args, _cotangents(t, dtype), impl, chunk_size)
    assert o.dtype == dtype and S.dtype == jnp.float32
    (o_ref, S_ref), grads_ref = _reference(t, dtype, *spec)
    assert_close(o, o_ref, dtype, err_msg="o")
    assert_close(S, S_ref, dtype, err_msg="S_last")
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert g.dtype == dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert_close(g, g_ref, dtype, "grad", err_msg=f"d/d{name}")


@pytest.mark.parametrize(
    "impl,t,chunk_size,per_channel,dtype",
    [
        ("chunked", 1, 16, False, jnp.float32),  # one chunk of one step
        ("chunked", 37, 16, True, jnp.float32),  # prime t: a partial last chunk
        ("chunked", 70, 64, False, jnp.float32),  # the default chunk, one padded chunk
        ("chunked", 37, 16, False, jnp.bfloat16),
        ("recurrent", 37, 16, True, jnp.float32),
    ],
    ids=["chunked-t1", "chunked-kda-t37", "chunked-c64-t70", "chunked-bf16", "recurrent-kda"],
)
def test_matches_reference(impl, t, chunk_size, per_channel, dtype):
    _check(t, per_channel, impl=impl, chunk_size=chunk_size, dtype=dtype)


@pytest.mark.parametrize(
    "per_channel,gates", [(False, "strong"), (False, "mixed"), (True, "mixed")]
)
def test_gates_near_exp_minus_20(per_channel, gates):
    # A naive factorisation exp(cumsum) / exp(cumsum) overflows here, and uncompensated running
    # sums lose 1e-4 of a decay of ~1 after a run of -20s.
    _check(37, per_channel, gates, seed=2)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_beta_0_or_1_and_near_orthogonal_keys(per_channel):
    # beta = 1 with near-orthogonal unit keys overwrites a slot almost exactly (I - k^T k is
    # nearly a projection); beta = 0 skips the write. Both ends of [0, 1] exactly.
    _check(37, per_channel, "realistic", "orthogonal", "binary", seed=3)


def test_step_matches_parallel():
    for per_channel in (False, True):
        q, k, v, log_g, beta, h0 = _inputs(37, per_channel, "mixed", seed=4)
        o, S_last = jax.jit(functools.partial(gated_delta_rule, chunk_size=16))(
            q, k, v, log_g, beta, h0=h0
        )
        step = jax.jit(gated_delta_rule_step)
        S, outs = h0, []
        for t in range(q.shape[1]):
            S, o_t = step(S, q[:, t], k[:, t], v[:, t], log_g[:, t], beta[:, t])
            assert S.dtype == jnp.float32
            outs.append(o_t)
        assert_close(jnp.stack(outs, axis=1), o)
        assert_close(S, S_last)


def test_split_sequence_carries_state_and_scale():
    q, k, v, log_g, beta, h0 = _inputs(37, seed=5)

    fast = jax.jit(functools.partial(gated_delta_rule, chunk_size=16, scale=0.3))

    def run(sl, h):
        return fast(*(x[:, sl] for x in (q, k, v, log_g, beta)), h0=h)

    o, S = run(slice(None), h0)
    o1, S1 = run(slice(0, 20), h0)
    o2, S2 = run(slice(20, None), S1)
    assert_close(jnp.concatenate([o1, o2], axis=1), o)
    assert_close(S2, S)
    reference = jax.jit(functools.partial(gated_delta_rule_reference, scale=0.3))
    o_ref, S_ref = reference(q, k, v, log_g, beta, h0=h0)
    assert_close(o, o_ref)
    assert_close(S, S_ref)


def test_causality():
    # t0 = 20 sits mid chunk in the second chunk (chunk_size 16).
    t0 = 20
    q, k, v, log_g, beta, h0 = _inputs(37, True, "mixed", seed=6)

    def o_at_t0(*args):
        o, _ = gated_delta_rule(*args, h0=h0, chunk_size=16)
        return jnp.sum(o[:, t0] * jnp.arange(1, DV + 1))

    grads = jax.jit(jax.grad(o_at_t0, argnums=range(5)))(q, k, v, log_g, beta)
    for name, g in zip(NAMES, grads, strict=False):
        g = np.asarray(g)
        assert (g[:, t0 + 1 :] == 0).all(), f"d o[{t0}] / d {name}[>{t0}] is not exactly zero"
        assert np.abs(g[:, : t0 + 1]).sum() > 0, name  # the test would catch a dead gradient


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_empty_sequence_returns_h0(impl):
    *args, h0 = _inputs(1)
    o, S = gated_delta_rule(*(x[:, :0] for x in args), h0=h0, impl=impl)
    assert o.shape == (B, 0, H, DV)
    np.testing.assert_array_equal(np.asarray(S), np.asarray(h0))


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("q", jnp.zeros((B, 5, H)), "`q` must have rank 4"),
        ("v", jnp.zeros((B, 5, H, DV, 1)), "`v` must have rank 4"),
        ("beta", jnp.zeros((B, 5, H, 1)), "`beta` must have rank 3"),
        ("log_g", jnp.zeros((B, 5)), "`log_g` must have rank 3 .* or 4"),
        ("k", jnp.zeros((B, 6, H, DK)), "dimension 't'.*`k`"),
        ("v", jnp.zeros((B + 1, 5, H, DV)), "dimension 'b'.*`v`"),
        ("beta", jnp.zeros((B, 5, H + 1)), "dimension 'h'.*`beta`"),
        ("log_g", -jnp.ones((B, 5, H, DK + 1)), "dimension 'k'.*`log_g`"),
        ("h0", jnp.zeros((B, H, DK, DV + 1)), "dimension 'v'.*`h0`"),
        ("h0", jnp.zeros((B, H, DK)), "`h0` must have rank 4"),
        ("q", jnp.zeros((B, 5, H, DK), jnp.complex64), "`q` must be real"),
        ("log_g", jnp.full((B, 5, H), 0.5), "`log_g` .* must be <= 0"),
        ("beta", jnp.full((B, 5, H), 1.5), "`beta` .* must lie in \\[0, 1\\]"),
        ("beta", jnp.full((B, 5, H), -0.1), "`beta` .* must lie in \\[0, 1\\]"),
        ("beta", jnp.zeros((B, 5, H), jnp.int32), "`beta` must be a floating-point"),
    ],
)
def test_bad_inputs_raise(name, value, match):
    kwargs = dict(zip(NAMES, _inputs(5), strict=True))
    kwargs[name] = value
    args = tuple(kwargs.pop(n) for n in NAMES[:5])
    with pytest.raises(ValueError, match=match):
        gated_delta_rule(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        gated_delta_rule_reference(*args, **kwargs)


def test_bad_chunk_size_and_impl_raise():
    q, k, v, log_g, beta, _ = _inputs(5)
    for chunk_size in (0, 16.0, True):
        with pytest.raises(ValueError, match="`chunk_size` must be a positive Python int"):
            gated_delta_rule(q, k, v, log_g, beta, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="unknown impl='triton'"):
        gated_delta_rule(q, k, v, log_g, beta, impl="triton")


def test_step_bad_inputs_raise():
    q, k, v, log_g, beta, h0 = _inputs(1)
    q_t, k_t, v_t, g_t, b_t = q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], beta[:, 0]
    with pytest.raises(ValueError, match="`S` must have rank 4"):
        gated_delta_rule_step(h0[0], q_t, k_t, v_t, g_t, b_t)
    with pytest.raises(ValueError, match="`q_t` must have rank 3"):
        gated_delta_rule_step(h0, q, k_t, v_t, g_t, b_t)
    with pytest.raises(ValueError, match="dimension 'v'.*`v_t`"):
        gated_delta_rule_step(h0, q_t, k_t, v_t[..., :-1], g_t, b_t)
    with pytest.raises(ValueError, match="dimension 'k'.*`log_g_t`"):
        gated_delta_rule_step(h0, q_t, k_t, v_t, -jnp.ones((B, H, DK + 1)), b_t)
    with pytest.raises(ValueError, match="`log_g_t` .* must be <= 0"):
        gated_delta_rule_step(h0, q_t, k_t, v_t, jnp.abs(g_t) + 1, b_t)
    with pytest.raises(ValueError, match="`beta_t` .* must lie in \\[0, 1\\]"):
        gated_delta_rule_step(h0, q_t, k_t, v_t, g_t, b_t + 2)
