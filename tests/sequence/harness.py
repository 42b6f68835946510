"""Sharded == unsharded: an op (or any function of arrays) run under a mesh whose ``sequence``
axis splits time, jitted, against the same function with no mesh: outputs and the gradients of
every argument (one random cotangent), on the suite's float32 tolerances.

Every check also asserts that the sharded program contains a ``shard_map`` over the sequence
axis, so a function that silently ran unsharded cannot pass."""

import jax
import numpy as np

from effseq import sharding
from tests.ops.compare import random_cotangent
from tests.tolerances import assert_close


def mesh(sequence, data=1, fsdp=1, tensor=1):
    """A mesh of the first data * fsdp * sequence * tensor of the 8 fake CPU devices."""
    n = data * fsdp * sequence * tensor
    return sharding.make_mesh(data, fsdp, tensor, sequence, devices=jax.devices()[:n])


def _vjp_fn(fn):
    def run(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)

    return run


def compare_sharded(fn, args, sequence, *, data=1, fsdp=1, names=None, kind="grad", batch=()):
    """``fn(*args)`` under ``mesh(sequence, data, fsdp)`` equals it unsharded.

    ``batch``: indices of arguments whose leading (batch) axis is put on data x fsdp first, so
    the shard_map also meets batch-sharded inputs. Returns the sharded outputs and gradients.
    """
    run = _vjp_fn(fn)
    out_r = jax.eval_shape(fn, *args)
    ct = random_cotangent(jax.random.key(11), out_r)
    out_ref, grads_ref = jax.jit(run)(args, ct)
    m = mesh(sequence, data, fsdp)
    with jax.set_mesh(m):
        placed = [
            jax.device_put(a, sharding.batch_sharding(m)) if i in batch else a
            for i, a in enumerate(args)
        ]
        jaxpr = str(jax.make_jaxpr(run)(placed, ct))
        assert "shard_map" in jaxpr and sharding.SEQUENCE in jaxpr, "no sequence shard_map ran"
        out, grads = jax.jit(run)(placed, ct)
    names = names or [f"arg{i}" for i in range(len(args))]
    jax.tree.map(lambda a, b: assert_close(a, b, err_msg="output"), out, out_ref)
    for name, g, gr in zip(names, grads, grads_ref, strict=True):
        for leaf_g, leaf_r in zip(jax.tree.leaves(g), jax.tree.leaves(gr), strict=True):
            assert np.all(np.isfinite(np.asarray(leaf_g))), f"non-finite gradient of {name}"
            assert_close(leaf_g, leaf_r, kind=kind, err_msg=f"gradient w.r.t. {name}")
    return out, grads
