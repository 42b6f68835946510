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


def check_pack(info: TaskInfo, objective: str) -> None:
    """Raises ValueError (naming ``train.pack``) unless ``info``'s task can train on packed
    rows (:mod:`effseq.data.packing`): token inputs of one sequence, trained per position,
    i.e. a sequence-labelling (language-model) task, or ``denoise`` pretraining on a
    classification task's tokens. A classifier's label belongs to a whole example, and pixel
    sequences are all one length, so neither packs."""
    why = None
    if info.vocab_size is None:
        why = "its inputs are continuous (pixels), all of one length"
    elif info.two_sequence:
        why = "its examples are pairs of sequences"
    elif not info.sequence_labels and objective != "denoise":
        why = (
            "it is a classification task (one label per example, not per position); only "
            "train.objective='denoise' pretraining on its tokens packs"
        )
    if why:
        raise ValueError(f"train.pack=True: task {info.name!r} cannot be packed: {why}")


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

    Packed batches (``train.pack``) carry ``segment_ids`` (b, t), 0 on padding: the model reads
    them from the batch, and next-token prediction never scores a document's last token
    against the next document's first.
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
            if "segment_ids" in batch:  # the next token must be in the same document
                seg = batch["segment_ids"]
                w = w & (seg == jnp.roll(seg, -1, axis=1))
        else:
            chosen = jax.random.bernoulli(rng, mask_rate, mask.shape) & mask
            fill = jnp.zeros((), inputs.dtype)
            where = chosen if inputs.ndim == 2 else chosen[..., None]
            corrupted = jnp.where(where, fill, inputs)
            targets, w = inputs, chosen
        w = w.astype(jnp.float32) * w_example
        dropout = jax.random.fold_in(rng, 1) if train else None
        model_batch = {"inputs": corrupted, "mask": mask}
        if "segment_ids" in batch:
            model_batch["segment_ids"] = batch["segment_ids"]
        out = apply_model(model, variables, model_batch, rng=dropout)
        if continuous:
            values = targets if targets.ndim == 3 else targets[..., None]
            l1 = jnp.mean(jnp.abs(out - values.astype(jnp.float32)), axis=-1)
            return jnp.sum(l1 * w), jnp.zeros(()), jnp.sum(w)
        logp = jax.nn.log_softmax(out, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(out, -1) == targets).astype(jnp.float32)
        return jnp.sum(nll * w), jnp.sum(correct * w), jnp.sum(w)

    return denoise
