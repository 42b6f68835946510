"""Optimizer: parameter groups from the layers' tags, learning-rate schedules, clipping.

Four groups, read from the box each parameter was created in (:mod:`effseq.layers.params`),
never from its name. A layer names the group its published recipe gives a parameter:
  "ssm": ``optim.ssm_learning_rate`` and ``optim.ssm_weight_decay`` (0 by default): S4D's A
    and B, as the S4 recipes train them (Gu et al. 2022; state-spaces/s4's kernel registers
    them with lr 0.001 and weight decay 0): decaying A towards 0 changes the dynamics.
  "ssm_decay": the SSM learning rate with the main weight decay (SGConv's sub-kernels).
  "no_decay": the main learning rate without weight decay (Mamba's A_log, D and dt bias;
    S4D's dt, which the S4 ListOps recipe leaves at the main rate).
  "decay": the main learning rate and weight decay.
Parameters without a named group get "decay" when they are matrices (>= 2 dimensions besides
a scanned stack's "layers" axis) and "no_decay" when vectors (norm scales, biases, which
weight decay would pull towards 0).

The config section ``optim`` has exactly the keys listed in :func:`make_optimizer`; they are
read as attributes, since their defaults live only in the base config.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from effseq import sharding
from effseq.layers.params import GROUPS, group_of

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "wsd", "power")
LABELS = GROUPS


def _label(leaf, decay_vectors: bool) -> str:
    group = group_of(leaf)
    if group is not None:
        return group
    if decay_vectors:
        return "decay"
    if isinstance(leaf, nn.Partitioned):
        # A scanned stack adds a "layers" axis: a stacked bias is 2-D but still a vector.
        dims = sum(name != sharding.LAYERS for name in leaf.names)
    else:
        dims = jnp.ndim(leaf)
    return "decay" if dims >= 2 else "no_decay"


def param_labels(boxed_params, decay_vectors: bool = False):
    """The group of every parameter (:data:`LABELS`): a pytree of strings with the structure
    of ``flax.linen.unbox(boxed_params)``.

    The group a layer named (``GroupedPartitioned``); otherwise "decay" for parameters with at
    least two dimensions not counting the ``sharding.LAYERS`` axis, "no_decay" for the rest.
    With ``decay_vectors`` every parameter without a named group is "decay". An unboxed leaf
    counts all its dimensions (it has no axis names to tell the layers axis apart).
    """
    return jax.tree.map(
        lambda x: _label(x, decay_vectors),
        boxed_params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def _check_unit(optim, key: str) -> None:
    value = getattr(optim, key)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"optim.{key} must be in [0, 1], got {value}")


def _check_schedule(optim, total_steps: int, peak: float) -> None:
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule={optim.schedule!r}; choose one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if optim.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if optim.warmup_steps > total_steps:
        raise ValueError(
            f"optim.warmup_steps={optim.warmup_steps} exceeds the run's total_steps={total_steps}"
        )
    if peak < 0:
        raise ValueError(f"the peak learning rate must be >= 0, got {peak}")
    _check_unit(optim, "min_lr_ratio")
    if optim.schedule in ("wsd", "power"):
        _check_unit(optim, "wsd_decay_fraction")
        decay_steps = optim.wsd_decay_fraction * total_steps
        if optim.warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"optim.warmup_steps={optim.warmup_steps} plus the decay "
                f"(optim.wsd_decay_fraction={optim.wsd_decay_fraction} of {total_steps} steps "
                f"= {decay_steps:g}) exceeds total_steps={total_steps}"
            )
    if optim.schedule == "power" and (optim.power_a <= 0 or optim.power_b <= 0):
        raise ValueError(
            f"optim.power_a and optim.power_b must be > 0 (lr = beta * a * n**-b), "
            f"got {optim.power_a} and {optim.power_b}"
        )


def _fraction(step, start: float, length: float):
    """How far ``step`` is through [start, start + length], clipped to [0, 1]."""
    return jnp.clip((step - start) / max(length, 1e-9), 0.0, 1.0)


def _power_lr(optim, peak: float, tokens, batch_size: int):
    """Shen et al. 2024, eq. for eta_power: min(eta_max, beta * a * n**b) with b = -power_b."""
    tokens = jnp.asarray(tokens, jnp.float32)
    safe = jnp.maximum(tokens, 1.0)
    value = batch_size * optim.power_a * jnp.exp(-optim.power_b * jnp.log(safe))
    # Before any token the power law is unbounded: the cap eta_max applies.
    return jnp.where(tokens > 0, jnp.minimum(peak, value), peak)


def make_schedule(
    optim,
    total_steps: int,
    *,
    tokens_per_step: int | None = None,
    batch_size: int | None = None,
    peak: float | None = None,
) -> optax.Schedule:
    """The learning rate as a function of the update count (0 before the first update).

    With r = ``optim.min_lr_ratio``, W = ``optim.warmup_steps``, S = ``total_steps``, and p the
    peak (``optim.learning_rate`` unless ``peak`` is given; the SSM group passes
    ``optim.ssm_learning_rate``), every schedule but "power" rises linearly from 0 at step 0 to
    p at step W, then with x the fraction of the remaining steps done:
      cosine:   p * (r + (1 - r) * (1 + cos(pi x)) / 2)     (Loshchilov & Hutter 2017, SGDR)
      linear:   p * (r + (1 - r) * (1 - x))
      constant: p
      wsd:      p until the last D = ``optim.wsd_decay_fraction * S`` steps, then with y the
                fraction of those done, p * (r + (1 - r) * (1 - sqrt(y))). Warmup-stable-decay
                (Hu et al. 2024, MiniCPM); the 1-sqrt cooldown is the shape Hägele et al. 2024
                ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations")
                found better than linear at equal cooldown length.
      power:    Shen et al. 2024, "Power Scheduler: A Batch Size and Token Number Agnostic
                Learning Rate Scheduler" (arXiv 2408.13359), sec. 4. With n = step *
                ``tokens_per_step`` tokens seen and beta = ``batch_size`` (sequences per step):
                eta_power(n) = min(p, beta * a * n**-b), a = ``optim.power_a``,
                b = ``optim.power_b`` (the paper writes b = -0.51 as a negative exponent).
                Warmup rises linearly to eta_power at the end of warmup (not to p); the last D
                steps decay exponentially from eta_power at the decay start down to r times it:
                f(y) = r + (1 - r) * (e**(1 - y) - 1) / (e - 1). The paper decays exponentially
                over the last part of training; this rescaled form is chosen so the end point is
                exactly r, like the other schedules.
    After step S the value stays at its final level. Raises ValueError for an unknown
    ``optim.schedule``, ``optim.warmup_steps > total_steps``, and for "power" without
    ``tokens_per_step`` or ``batch_size``.
    """
    peak = optim.learning_rate if peak is None else peak
    _check_schedule(optim, total_steps, peak)
    kind = optim.schedule
    r = optim.min_lr_ratio
    warmup = optim.warmup_steps
    decay_start = total_steps * (1.0 - optim.wsd_decay_fraction)

    if kind == "power":
        if tokens_per_step is None or tokens_per_step <= 0:
            raise ValueError(
                f"optim.schedule='power' needs tokens_per_step > 0 (tokens per optimizer "
                f"update), got {tokens_per_step}"
            )
        if batch_size is None or batch_size <= 0:
            raise ValueError(
                f"optim.schedule='power' needs batch_size > 0 (sequences per optimizer update, "
                f"the paper's beta), got {batch_size}"
            )

        def power(step):
            step = jnp.asarray(step, jnp.float32)
            at_warmup_end = _power_lr(optim, peak, warmup * tokens_per_step, batch_size)
            at_decay_start = _power_lr(optim, peak, decay_start * tokens_per_step, batch_size)
            main = _power_lr(optim, peak, step * tokens_per_step, batch_size)
            y = _fraction(step, decay_start, total_steps - decay_start)
            tail = at_decay_start * (r + (1 - r) * (jnp.exp(1.0 - y) - 1.0) / (math.e - 1.0))
            lr = jnp.where(step >= decay_start, tail, main)
            if warmup > 0:
                lr = jnp.where(step < warmup, at_warmup_end * step / warmup, lr)
            return lr

        return power

    def shape(step):
        """The multiplier of p after warmup."""
        if kind == "constant":
            return jnp.ones_like(step)
        if kind == "wsd":
            y = _fraction(step, decay_start, total_steps - decay_start)
            return r + (1 - r) * (1.0 - jnp.sqrt(y))
        x = _fraction(step, warmup, total_steps - warmup)
        if kind == "cosine":
            return r + (1 - r) * 0.5 * (1.0 + jnp.cos(jnp.pi * x))
        return r + (1 - r) * (1.0 - x)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = peak * shape(step)
        if warmup > 0:
            lr = jnp.where(step < warmup, peak * step / warmup, lr)
        return lr

    return schedule


def _check_optimizer(optim) -> None:
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name={optim.name!r}; choose one of {OPTIMIZERS}")
    for key in ("weight_decay", "ssm_weight_decay", "grad_clip_norm"):
        if getattr(optim, key) < 0:
            raise ValueError(f"optim.{key} must be >= 0, got {getattr(optim, key)}")
    if optim.name == "adam":
        for key in ("weight_decay", "ssm_weight_decay"):
            if getattr(optim, key) > 0:
                raise ValueError(
                    f"optim.name='adam' has no weight decay but optim.{key}="
                    f"{getattr(optim, key)}; set it to 0 or use optim.name='adamw' "
                    f"(decoupled weight decay)"
                )
    if optim.name in ("adamw", "adam"):
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(optim, key) < 1.0:
                raise ValueError(f"optim.{key} must be in [0, 1), got {getattr(optim, key)}")
    if optim.name == "sgd" and not 0.0 <= optim.momentum < 1.0:
        raise ValueError(f"optim.momentum must be in [0, 1), got {optim.momentum}")


def check(optim, total_steps: int) -> None:
    """Every check that :func:`make_optimizer` makes of the ``optim.*`` keys, for a run of
    ``total_steps``; :func:`effseq.configs.base.check_values` runs it before anything is
    built. ValueError naming the key."""
    _check_optimizer(optim)
    for peak in (optim.learning_rate, optim.ssm_learning_rate):
        _check_schedule(optim, total_steps, peak)


def _group(optim, schedule: optax.Schedule, weight_decay: float):
    """One group's optimizer; weight decay is decoupled and scaled by the learning rate, so a
    zero gradient shrinks w by exactly lr * weight_decay * w (Loshchilov & Hutter 2019, AdamW)."""
    if optim.name in ("adamw", "adam"):
        return optax.adamw(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=weight_decay
        )
    # SGDW: the decay is added after the momentum buffer, so it is not accumulated by it.
    return optax.chain(
        optax.trace(decay=optim.momentum),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(
    optim,
    labels,
    total_steps: int,
    *,
    tokens_per_step: int | None = None,
    batch_size: int | None = None,
) -> optax.GradientTransformation:
    """Clipping over all parameters, then one optimizer per group of :func:`param_labels`.

    ``labels`` is the output of :func:`param_labels`; the returned transformation works on the
    unboxed parameters (``flax.linen.unbox``). Config keys (``optim.*``):
      name: "adamw" (Adam with decoupled weight decay), "adam" (no weight decay: raises if
        ``weight_decay`` or ``ssm_weight_decay`` is > 0 rather than ignore them), or "sgd" (heavy
        ball ``momentum`` with decoupled weight decay, i.e. SGDW).
      learning_rate / ssm_learning_rate: peaks of the two schedules (:func:`make_schedule`).
      weight_decay: the "decay" and "ssm_decay" groups'; "no_decay" gets 0; ssm_weight_decay:
        the "ssm" group's.
      b1, b2, eps: Adam's moment decay rates and denominator epsilon. momentum: SGD's.
      grad_clip_norm: clip the global norm of ALL gradients together to this (0 disables).
      schedule, warmup_steps, min_lr_ratio, wsd_decay_fraction, power_a, power_b: the schedule.
      decay_vectors: read by the caller for :func:`param_labels`, not here.
    ``tokens_per_step`` and ``batch_size`` are needed by the "power" schedule only.
    """
    _check_optimizer(optim)
    kw = dict(tokens_per_step=tokens_per_step, batch_size=batch_size)
    lr = make_schedule(optim, total_steps, **kw)
    ssm_lr = make_schedule(optim, total_steps, peak=optim.ssm_learning_rate, **kw)
    groups = {
        "decay": _group(optim, lr, optim.weight_decay),
        "no_decay": _group(optim, lr, 0.0),
        "ssm": _group(optim, ssm_lr, optim.ssm_weight_decay),
        "ssm_decay": _group(optim, ssm_lr, optim.weight_decay),
    }
    unknown = sorted({x for x in jax.tree.leaves(labels) if x not in groups}, key=str)
    if unknown:
        raise ValueError(f"labels has unknown groups {unknown}; expected labels from {LABELS}")
    grouped = optax.multi_transform(groups, labels)
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), grouped)
    return grouped


def learning_rates(
    optim,
    total_steps: int,
    *,
    tokens_per_step: int | None = None,
    batch_size: int | None = None,
) -> Callable[[int], dict]:
    """step -> {"lr": ..., "ssm_lr": ...}: the two groups' learning rates at an update count,
    for logging. "no_decay" shares "lr"."""
    kw = dict(tokens_per_step=tokens_per_step, batch_size=batch_size)
    lr = make_schedule(optim, total_steps, **kw)
    ssm_lr = make_schedule(optim, total_steps, peak=optim.ssm_learning_rate, **kw)
    return lambda step: {"lr": lr(step), "ssm_lr": ssm_lr(step)}
