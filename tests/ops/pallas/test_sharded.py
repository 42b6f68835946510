"""The Pallas impls under a device mesh: rows split over ``data``, heads (channels) over
``tensor``, each device running the kernel on its own block (``_common.per_device``).

XLA cannot split a custom call, so without the mapping a Triton kernel under a mesh would get
its operands gathered whole onto every device. Checked here: values and gradients equal the
unsharded call's, the compiled program holds no all-gather, and in the program lowered for a
GPU the Triton call sits inside the manual (per-device) computation.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effseq import ops, sharding
from effseq.ops.pallas import _common
from tests.tolerances import assert_close

pytestmark = pytest.mark.devices(4)

B, T, H, D = 2, 16, 4, 16


def _normal(key, shape):
    return jax.random.normal(key, shape, jnp.float32)


def _gla():
    k = jax.random.split(jax.random.key(0), 4)
    shape = (B, T, H, D)
    log_g = jax.nn.log_sigmoid(_normal(k[3], shape)) / 8
    args = (_normal(k[0], shape), _normal(k[1], shape), _normal(k[2], shape), log_g)
    heads = P("data", None, "tensor", None)

    def fn(q, k, v, log_g):
        return ops.gated_linear_attention(q, k, v, log_g, impl="pallas", chunk_size=16)

    return fn, args, (heads,) * 4


def _delta():
    k = jax.random.split(jax.random.key(1), 5)
    shape = (B, T, H, D)

    def unit(z):
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    log_g = jax.nn.log_sigmoid(_normal(k[3], shape[:3]) + 3.0)
    beta = jax.nn.sigmoid(_normal(k[4], shape[:3]))
    args = (unit(_normal(k[0], shape)), unit(_normal(k[1], shape)), _normal(k[2], shape))
    heads, gates = P("data", None, "tensor", None), P("data", None, "tensor")

    def fn(q, k, v, log_g, beta):
        return ops.gated_delta_rule(q, k, v, log_g, beta, impl="pallas", chunk_size=16)

    return fn, (*args, log_g, beta), (heads, heads, heads, gates, gates)


def _ssd():
    k = jax.random.split(jax.random.key(2), 5)
    x = _normal(k[0], (B, T, H, D))
    dt = jax.nn.softplus(_normal(k[1], (B, T, H)) - 2.0)
    A = -jax.random.uniform(k[2], (H,), minval=0.5, maxval=4.0)
    Bm, Cm = _normal(k[3], (B, T, 1, D)), _normal(k[4], (B, T, 1, D))
    rows = P("data")

    def fn(x, dt, A, B, C):
        return ops.ssd(x, dt, A, B, C, jnp.ones((H,)), impl="pallas", chunk_size=16)

    specs = (P("data", None, "tensor"), P("data", None, "tensor"), P("tensor"), rows, rows)
    return fn, (x, dt, A, Bm, Cm), specs


def _selective():
    k = jax.random.split(jax.random.key(3), 4)
    d, n = 16, 8
    u = _normal(k[0], (B, T, d))
    delta = jax.nn.softplus(_normal(k[1], (B, T, d)) - 2.0)
    A = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n))
    channels = P("data", None, "tensor")

    def fn(u, delta, A, B, C):
        return ops.selective_scan(u, delta, A, B, C, jnp.ones((d,)), impl="pallas", chunk_size=8)

    args = (u, delta, A, _normal(k[2], (B, T, n)), _normal(k[3], (B, T, n)))
    return fn, args, (channels, channels, P("tensor"), P("data"), P("data"))


CASES = {"gla": _gla, "gated_delta_rule": _delta, "ssd": _ssd, "selective_scan": _selective}
# Heads split (GLA) and channels split (selective scan) in the fast set; the gated delta rule
# (mapped like GLA) and SSD (heads split beside an unsplit B/C group) slow.
SLOW = ("gated_delta_rule", "ssd")
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES]


@pytest.mark.parametrize("name", NAMES)
def test_each_device_runs_its_block(name):
    fn, args, specs = CASES[name]()
    cot = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, *args)[0].shape)

    def loss(*a):
        out, final = fn(*a)
        return jnp.sum(out * cot) + jnp.sum(final)

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    want_out, want_grads = jax.jit(fn)(*args), jax.jit(grad)(*args)

    mesh = sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        shardings = [NamedSharding(mesh, s) for s in specs]
        placed = [jax.device_put(x, s) for x, s in zip(args, shardings, strict=True)]
        out = jax.jit(fn)(*placed)
        grads = jax.jit(grad)(*placed)
        compiled = jax.jit(grad).lower(*placed).compile().as_text()
        gpu_text = _common.lower_for_gpu(grad, *placed)
    for got, want in zip(out, want_out, strict=True):
        assert_close(got, want)
    for i, (got, want) in enumerate(zip(grads, want_grads, strict=True)):
        assert_close(got, want, kind="grad", err_msg=f"{name}: gradient {i}")
    assert "all-gather" not in compiled
    manual = gpu_text.index("sdy.manual_computation")
    triton = gpu_text.index("__gpu$xla.gpu.triton")
    assert manual < triton, "the Triton call is outside the per-device computation"


def test_gradient_outside_jit_under_a_mesh():
    # jax.grad called eagerly (no jit) under jax.set_mesh: the per-device mapping is jitted
    # inside, since JAX's eager transpose of a partly manual shard_map fails.
    fn, args, _ = _gla()

    def loss(*a):
        return jnp.sum(fn(*a)[0])

    want = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    with jax.set_mesh(sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])):
        got = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, kind="grad")
