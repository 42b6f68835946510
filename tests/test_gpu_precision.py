"""The precision users get by default: each fast path at JAX's default matmul precision against
its per-step reference at "highest", by relative RMS error (the "tf32" tier of
tests/tolerances.py).

On a GPU the default lets float32 products run with TF32 operands; this is the suite's one
check of that setting (conftest pins everything else to "highest"), and `make test-gpu` runs
it. On a CPU both settings are the same float32 arithmetic, which tests/ops already compares
entrywise at the tighter float32 tolerances, so there the file is marked slow (28 s of CPU time
on the 2-core EPYC, 11 cases) and runs with `make test-slow`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq import ops
from effseq.ops._impl import IMPLEMENTATIONS
from tests.tolerances import TF32_REL_RMS

B, T, H, D = 2, 48, 2, 32
pytestmark = [pytest.mark.slow] if jax.default_backend() == "cpu" else []


def _normal(key, shape, scale=1.0):
    return jax.random.normal(key, shape, jnp.float32) * scale


def _gla():
    k = jax.random.split(jax.random.key(0), 4)
    shape = (B, T, H, D)
    log_g = jax.nn.log_sigmoid(_normal(k[3], shape) + 2.0) / 4
    args = (_normal(k[0], shape), _normal(k[1], shape), _normal(k[2], shape), log_g)

    def run(impl):
        return lambda *a: ops.gated_linear_attention(*a, impl=impl, chunk_size=16)[0]

    return run, args


def _ssd():
    k = jax.random.split(jax.random.key(1), 5)
    x = _normal(k[0], (B, T, H, D))
    dt = jax.nn.softplus(_normal(k[1], (B, T, H)) - 2.0)
    A = -jax.random.uniform(k[2], (H,), minval=0.5, maxval=4.0)
    args = (x, dt, A, _normal(k[3], (B, T, 1, D)), _normal(k[4], (B, T, 1, D)))

    def run(impl):
        return lambda *a: ops.ssd(*a, impl=impl, chunk_size=16)[0]

    return run, args


def _delta():
    k = jax.random.split(jax.random.key(2), 5)
    shape = (B, T, H, D)

    def unit(z):
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    log_g = jax.nn.log_sigmoid(_normal(k[3], shape[:3]) + 3.0)
    beta = jax.nn.sigmoid(_normal(k[4], shape[:3]))
    args = (unit(_normal(k[0], shape)), unit(_normal(k[1], shape)), _normal(k[2], shape))

    def run(impl):
        return lambda *a: ops.gated_delta_rule(*a, impl=impl, chunk_size=16)[0]

    return run, (*args, log_g, beta)


def _selective():
    k = jax.random.split(jax.random.key(3), 4)
    d, n = 64, 16
    u = _normal(k[0], (B, T, d))
    delta = jax.nn.softplus(_normal(k[1], (B, T, d)) - 2.0)
    A = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n))
    args = (u, delta, A, _normal(k[2], (B, T, n)), _normal(k[3], (B, T, n)))

    def run(impl):
        if impl == "reference":
            return lambda *a: ops.selective_scan_reference(*a)[0]
        return lambda *a: ops.selective_scan(*a, impl=impl, chunk_size=16)[0]

    return run, args


def _attention():
    k = jax.random.split(jax.random.key(4), 3)
    args = tuple(_normal(kk, (B, T, H, D)) for kk in k)

    def run(impl):
        return lambda q, k, v: ops.attention(q, k, v, causal=True, impl=impl)

    return run, args


def _conv():
    k = jax.random.split(jax.random.key(5), 2)
    args = (_normal(k[0], (B, T, 8)), _normal(k[1], (8, T), 0.2))

    def run(impl):
        return lambda u, w: ops.causal_conv(u, w, impl=impl)

    return run, args


# family -> (inputs and a function of impl, the op's name in IMPLEMENTATIONS, the reference)
FAMILIES = {
    "gla": (_gla, "gated_linear_attention", "recurrent"),
    "ssd": (_ssd, "ssd", "recurrent"),
    "gated_delta_rule": (_delta, "gated_delta_rule", "recurrent"),
    "selective_scan": (_selective, "selective_scan", "reference"),
    "attention": (_attention, "attention", "xla"),
    "causal_conv": (_conv, "causal_conv", "direct"),
}
CASES = [
    (family, impl)
    for family, (_, op, reference) in FAMILIES.items()
    for impl in IMPLEMENTATIONS[op]
    # The per-step reference itself is what the others are measured against.
    if impl != reference
]


def _value_and_grads(fn, args):
    cot = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, *args).shape)

    def loss(*a):
        return jnp.sum(fn(*a) * cot)

    out = jax.jit(fn)(*args)
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
    return out, grads


def _rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family,impl", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_default_precision_within_the_tf32_tier(family, impl):
    build, _, reference = FAMILIES[family]
    run, args = build()
    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = _value_and_grads(run(reference), args)
    with jax.default_matmul_precision("default"):
        out, grads = _value_and_grads(run(impl), args)
    err = _rel_rms(out, ref_out)
    assert err <= TF32_REL_RMS["value"], f"{family} impl={impl}: value error {err:.2e}"
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        err = _rel_rms(g, rg)
        assert err <= TF32_REL_RMS["grad"], f"{family} impl={impl}: grad {i} error {err:.2e}"
