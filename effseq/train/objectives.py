"""Training objectives: from a model's outputs on a batch to weighted loss and accuracy sums.

Every model is called the same way (``model.forward(batch, deterministic)``), so nothing here
knows a model type: a LanguageModel's logits are per position, a classifier's per example, and
:func:`losses` weighs either.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq.data import TaskInfo

OBJECTIVES = ("supervised", "denoise")


def apply_model(model: nn.Module, variables, batch, *, rng=None):
    """``model.forward(batch)``: logits (b, t, classes) per position or (b, classes) per
    example. ``rng`` set means training mode (dropout on)."""
    rngs = {} if rng is None else {"rngs": {"dropout": rng}}
    return model.apply(variables, batch, rng is None, method="forward", **rngs)


def losses(logits, batch, num_classes: int):
    """Weighted sums over the batch: (loss_sum, correct_sum, weight_sum), float32 scalars.

    Classification weighs each example by ``example_weight`` (0 for evaluation padding);
    sequence labelling weighs each position by ``weights`` x ``example_weight``.
    """
    logits = logits.astype(jnp.float32)[..., :num_classes]
    labels = batch["label"]
    w = batch["example_weight"].astype(jnp.float32)
    if labels.ndim == 2:  # per-position labels
        w = w[:, None] * batch["weights"].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(correct * w), jnp.sum(w)


def make_loss_fn(model: nn.Module, info: TaskInfo, objective: str, mask_rate: float):
    """``loss_fn(variables, batch, rng, train) -> (loss_sum, correct_sum, weight_sum)``.

    "supervised": the task's labels (:func:`losses`). "denoise" (self-pretraining, Amos, Berant
    & Gupta 2023, "Never Train from Scratch"): on the task's own inputs, masked-token prediction
    for bidirectional models (a ``mask_rate`` fraction of real tokens replaced by id 0 and
    predicted), next-token prediction for causal ones, and for continuous inputs (pixels) the
    L1 error of masked positions' values (then "correct" counts nothing).
    """
    if objective == "supervised":

        def supervised(variables, batch, rng, train):
            logits = apply_model(model, variables, batch, rng=rng if train else None)
            return losses(logits, batch, info.num_classes)

        return supervised
    causal = model.backbone.causal
    continuous = info.vocab_size is None

    def denoise(variables, batch, rng, train):
        inputs, mask = batch["inputs"], batch["mask"]
        w_example = batch["example_weight"].astype(jnp.float32)[:, None]
        if causal and not continuous:
            corrupted = inputs
            targets = jnp.roll(inputs, -1, axis=1)
            w = (mask & jnp.roll(mask, -1, axis=1)).at[:, -1].set(False)
        else:
            chosen = jax.random.bernoulli(rng, mask_rate, mask.shape) & mask
            fill = jnp.zeros((), inputs.dtype)
            where = chosen if inputs.ndim == 2 else chosen[..., None]
            corrupted = jnp.where(where, fill, inputs)
            targets, w = inputs, chosen
        w = w.astype(jnp.float32) * w_example
        dropout = jax.random.fold_in(rng, 1) if train else None
        out = apply_model(model, variables, {"inputs": corrupted, "mask": mask}, rng=dropout)
        if continuous:
            values = targets if targets.ndim == 3 else targets[..., None]
            l1 = jnp.mean(jnp.abs(out - values.astype(jnp.float32)), axis=-1)
            return jnp.sum(l1 * w), jnp.zeros(()), jnp.sum(w)
        logp = jax.nn.log_softmax(out, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(out, -1) == targets).astype(jnp.float32)
        return jnp.sum(nll * w), jnp.sum(correct * w), jnp.sum(w)

    return denoise
