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
