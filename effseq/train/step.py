"""The train state and the pure step functions that ``jax.jit`` compiles once.

``train_step(state, batch) -> (state, metrics)`` and ``eval_step(state, batch) -> sums`` are
module-level pure functions; what they need besides their arguments (model, optimizer, ...)
is bound with ``functools.partial`` by the loop, never passed as static arguments.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from effseq.models.build import init_variables


@struct.dataclass
class TrainState:
    """step: updates applied (int32); params and constants (non-trained variables such as
    SGConv's kernel norm): unboxed pytrees; opt_state: the optimizer's."""

    step: jax.Array
    params: Any
    constants: Any
    opt_state: Any

    def variables(self):
        if self.constants:
            return {"params": self.params, "constants": self.constants}
        return {"params": self.params}


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng, batch) -> TrainState:
    """The state at step 0 (call under ``jax.jit`` with ``out_shardings``)."""
    variables = nn.unbox(init_variables(model, rng, batch))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        constants=variables.get("constants", {}),
        opt_state=tx.init(params),
    )


def _split_micro(batch, n: int):
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def _nonfinite_leaf(tree) -> jax.Array:
    """Index (in ``jax.tree.leaves`` order) of the first leaf with a non-finite value, or -1."""
    bad = jnp.stack([~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
    return jnp.where(bad.any(), jnp.argmax(bad), -1)


def train_step(
    state: TrainState,
    batch,
    *,
    loss_fn,
    tx: optax.GradientTransformation,
    micro_batches: int,
    base_rng: jax.Array,
):
    """One update from ``batch`` (accumulated over ``micro_batches`` sequential parts).

    The loss is the weighted mean over the whole batch, so accumulation gives the full-batch
    gradient. A step whose loss or gradients are not finite consumes its batch and counts as a
    step, but its update is not applied: parameters and optimizer state come back unchanged
    and ``metrics["train/bad_leaf"]`` names the first bad gradient leaf (-1 when finite). So
    the step count never depends on values, and the loop need not wait for a step to finish
    before dispatching the next.
    """
    rng = jax.random.fold_in(base_rng, state.step)
    params = state.params

    def loss_sums(p, micro, key):
        variables = {"params": p, **({"constants": state.constants} if state.constants else {})}
        loss, correct, weight = loss_fn(variables, micro, key, True)
        return loss, (correct, weight)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def accumulate(carry, xs):
        g_acc, loss_acc, corr_acc, w_acc = carry
        i, micro = xs
        (loss, (correct, weight)), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        return (g_acc, loss_acc + loss, corr_acc + correct, w_acc + weight), None

    if micro_batches == 1:
        # No loop: XLA keeps a one-trip while loop, whose carried buffers cost copies.
        (loss_sum, (correct, weight)), g = grad_fn(params, batch, jax.random.fold_in(rng, 0))
        g_sum = jax.tree.map(lambda x: x.astype(jnp.float32), g)
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, 0.0, 0.0, 0.0)
        micro = _split_micro(batch, micro_batches)
        (g_sum, loss_sum, correct, weight), _ = jax.lax.scan(
            accumulate, init, (jnp.arange(micro_batches), micro)
        )
    weight = jnp.maximum(weight, 1e-9)
    grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), g_sum, params)
    loss = loss_sum / weight
    bad_leaf = _nonfinite_leaf(grads)
    ok = jnp.isfinite(loss) & (bad_leaf < 0)

    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, params),
        opt_state=keep(opt_state, state.opt_state),
    )
    metrics = {
        "train/loss": loss,
        "train/accuracy": correct / weight,
        "train/grad_norm": optax.tree.norm(grads),
        "train/weight": weight,
        "train/finite": ok,
        "train/bad_leaf": bad_leaf,
    }
    return new_state, metrics


def train_steps(state: TrainState, batches, **kwargs):
    """``train_step`` over the leading axis of ``batches`` (k stacked batches), in one call:
    returns the state after all k and the metrics stacked (k,). Fewer dispatches and host
    round trips per step, the same updates (the scan body is ``train_step`` itself)."""
    return jax.lax.scan(lambda s, batch: train_step(s, batch, **kwargs), state, batches)


def eval_step(state: TrainState, batch, *, loss_fn):
    """Weighted sums (loss, correct, weight) over ``batch``; padding rows weigh 0. Random
    corruption (self-pretraining) uses one fixed key, so every evaluation sees the same."""
    loss, correct, weight = loss_fn(state.variables(), batch, jax.random.key(0), False)
    return {"loss": loss, "correct": correct, "weight": weight}
