"""Drives a mixer through the layer protocol's recurrent form (init_state, then step)."""

import jax
import jax.numpy as jnp


def run_steps(module, variables, x, max_len=None):
    """``step`` token by token over x (b, t, d) under a scan; max_len defaults to t."""
    b, t, _ = x.shape
    state = module.apply(variables, b, t if max_len is None else max_len, method="init_state")

    def body(state, x_t):
        y_t, state = module.apply(variables, x_t, state, method="step")
        return state, y_t

    _, ys = jax.lax.scan(body, state, jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(ys, 0, 1)


def init(module, t=5, b=2, seed=0):
    """Initialises ``module`` on random x (b, t, d); returns (variables, x)."""
    x = jax.random.normal(jax.random.key(seed + 1), (b, t, module.d_model))
    # Jitted: run eagerly, the chunked ops' many small ops took seconds per init.
    return jax.jit(module.init)(jax.random.key(seed), x), x


def causality(module, variables, t=9, b=1, seed=3):
    """The parallel form's dependence pattern, by perturbation: dep[i, j] is True when
    changing input j changes output i (t + 1 jitted forwards, cheaper than a jacobian)."""
    x = jax.random.normal(jax.random.key(seed), (b, t, module.d_model))
    apply = jax.jit(module.apply)
    y = apply(variables, x)
    dep = []
    for j in range(t):
        y_j = apply(variables, x.at[:, j].add(1.0))
        dep.append(jnp.any(y_j != y, axis=(0, 2)))
    return jnp.stack(dep, 1)


def abstract_init(module, t=5, b=2):
    """Parameter shapes and boxes without running the initializers (fast)."""
    x = jax.ShapeDtypeStruct((b, t, module.d_model), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)


def assert_causal(module, variables, t=9):
    """Output i depends on every input j <= i and on no later one (exactly)."""
    import numpy as np

    dep = np.asarray(causality(module, variables, t=t))
    assert not np.any(dep[np.triu_indices(t, 1)]), "an output depends on a later input"
    assert np.all(dep[np.tril_indices(t)]), "an output ignores an earlier input"


def assert_right_padding_invariant(module, variables, x, lengths=(8, 13)):
    """x (b, t, d) right-padded with junk to each of ``lengths`` and masked: the real
    positions' outputs equal the unpadded ones (float32 tolerance)."""
    from tests.tolerances import assert_close

    apply = jax.jit(module.apply)
    b, t, _ = x.shape
    real = apply(variables, x)
    for n in lengths:
        padded = jnp.pad(x, ((0, 0), (0, n - t), (0, 0)), constant_values=3.0)
        mask = jnp.arange(n)[None].repeat(b, 0) < t
        assert_close(apply(variables, padded, mask)[:, :t], real, "float32", "value")
