"""Fast paths against references at realistic lengths. Minutes on 2 cores: `make test-slow`."""

import math

import jax
import jax.numpy as jnp
import pytest

from effseq import ops
from tests.ops.compare import compare_with_reference

pytestmark = pytest.mark.slow


def test_s4d_kernel_at_16k():
    h, n, length = 32, 32, 16384
    k = jax.random.split(jax.random.key(0), 3)
    log_dt = jax.random.uniform(k[0], (h,), minval=math.log(1e-3), maxval=math.log(1e-1))
    A = jnp.broadcast_to(-0.5 + 1j * jnp.pi * jnp.arange(n), (h, n)).astype(jnp.complex64)
    B = jnp.ones((h, n), jnp.complex64)
    C = (jax.random.normal(k[1], (h, n)) + 1j * jax.random.normal(k[2], (h, n))) * 0.5
    compare_with_reference(
        lambda *p: ops.s4d_kernel(*p, length),
        lambda *p: ops.s4d_kernel_reference(*p, length),
        (log_dt, A, B, C.astype(jnp.complex64)),
        jit=True,
        long=True,
    )


def test_fft_conv_at_8k():
    k = jax.random.split(jax.random.key(1), 2)
    u = jax.random.normal(k[0], (2, 8191, 16))
    kern = jax.random.normal(k[1], (16, 8191)) / 90
    compare_with_reference(
        lambda u, kern: ops.causal_conv(u, kern, impl="fft"),
        lambda u, kern: ops.causal_conv(u, kern, impl="direct"),
        (u, kern),
        jit=True,
        long=True,
    )


def test_selective_scan_at_2k():
    b, t, d, n = 2, 2053, 64, 16
    k = jax.random.split(jax.random.key(2), 5)
    args = (
        jax.random.normal(k[0], (b, t, d)),
        jax.nn.softplus(jax.random.normal(k[1], (b, t, d)) - 4.0),
        -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)),
        jax.random.normal(k[2], (b, t, n)),
        jax.random.normal(k[3], (b, t, n)),
        jax.random.normal(k[4], (d,)),
    )
    compare_with_reference(
        lambda *a: ops.selective_scan(*a),
        lambda *a: ops.selective_scan_reference(*a),
        args,
        jit=True,
        long=True,
    )


@pytest.mark.parametrize("gate_scale", [1 / 16, 20.0])
def test_gla_at_2k(gate_scale):
    # log_g = logsigmoid(x) / 16 as the GLA layer uses, and gates near exp(-20) per step.
    b, t, h, dk, dv = 1, 2053, 2, 32, 32
    k = jax.random.split(jax.random.key(3), 4)
    q, kk = (jax.random.normal(x, (b, t, h, dk)) for x in k[:2])
    v = jax.random.normal(k[2], (b, t, h, dv))
    log_g = jax.nn.log_sigmoid(jax.random.normal(k[3], (b, t, h, dk))) * gate_scale
    if gate_scale > 1:
        log_g = jnp.clip(log_g, -20.0, 0.0)
    compare_with_reference(
        lambda *a: ops.gated_linear_attention(*a)[0],
        lambda *a: ops.gated_linear_attention_reference(*a)[0],
        (q, kk, v, log_g),
        jit=True,
        long=True,
    )


def test_blockwise_attention_at_4k():
    k = jax.random.split(jax.random.key(4), 3)
    q, kk, v = (jax.random.normal(x, (1, 4099, 2, 32)) for x in k)
    compare_with_reference(
        lambda *a: ops.attention(*a, impl="blockwise"),
        lambda *a: ops.attention(*a, impl="xla"),
        (q, kk, v),
        jit=True,
        long=True,
    )
