"""Fast-vs-reference comparison of values and of every input's gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.tolerances import assert_close


def random_cotangent(key, like):
    """A fixed random cotangent per output leaf (real or complex)."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, x in zip(keys, leaves, strict=True):
        if jnp.iscomplexobj(x):
            k1, k2 = jax.random.split(k)
            out.append(
                (jax.random.normal(k1, x.shape) + 1j * jax.random.normal(k2, x.shape)).astype(
                    x.dtype
                )
            )
        else:
            out.append(jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


def upcast(x):
    return x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x


def compare_with_reference(
    fast, reference, args, dtype="float32", jit=False, names=None, long=False
):
    """Checks outputs and the gradients w.r.t. every argument of ``fast`` against ``reference``.

    ``args`` are the fast path's inputs (possibly bfloat16); the reference sees them upcast to
    float32. Tolerances come from the suite's single table, keyed by ``dtype``; ``long`` selects
    its scale-relative entry for realistic sequence lengths.
    """
    fast_fn = jax.jit(fast) if jit else fast
    out_f, vjp_f = jax.vjp(fast_fn, *args)
    out_r, vjp_r = jax.vjp(reference, *[upcast(a) for a in args])
    value_kind, grad_kind = ("long", "long") if long else ("value", "grad")
    jax.tree.map(lambda a, b: assert_close(a, b, dtype, value_kind, err_msg="output"), out_f, out_r)
    # One cotangent for both sides, rounded to the fast output's dtype so both see equal values.
    ct_f = jax.tree.map(
        lambda c, o: c.astype(o.dtype), random_cotangent(jax.random.key(7), out_r), out_f
    )
    ct = jax.tree.map(lambda c, r: c.astype(r.dtype), ct_f, out_r)
    grads_f = vjp_f(ct_f)
    grads_r = vjp_r(ct)
    names = names or [f"arg{i}" for i in range(len(args))]
    for name, gf, gr in zip(names, grads_f, grads_r, strict=True):
        assert np.all(np.isfinite(np.asarray(gf, dtype=np.complex64))), f"non-finite grad {name}"
        assert_close(gf, gr, dtype, grad_kind, err_msg=f"gradient w.r.t. {name}")
    return out_f, grads_f
