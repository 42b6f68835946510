"""From a config and a task to a model and the functions that run it on a batch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effseq.data import TaskInfo
from effseq.models import LanguageModel, SequenceClassifier
from effseq.models.registry import BIDIRECTIONAL as BIDIRECTIONAL_MIXERS
from effseq.models.registry import parse_pattern

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BIDIRECTIONAL = {"auto": None, "yes": True, "no": False}


def _choice(key: str, value, choices):
    if value not in choices:
        raise ValueError(
            f"config key {key!r}: unknown value {value!r}; choose one of {list(choices)}"
        )
    return choices[value]


OBJECTIVES = ("supervised", "denoise")


def build_model(model_cfg, info: TaskInfo, objective: str = "supervised") -> nn.Module:
    """The model for ``info``'s task: a LanguageModel (causal, logits at every position) for
    sequence-labelling tasks, else a SequenceClassifier (dual-encoder for two-sequence tasks).

    ``objective="denoise"`` (self-pretraining) adds the classifier's per-position head over the
    vocabulary or the input channels."""
    if objective not in OBJECTIVES:
        raise ValueError(
            f"config key 'train.objective': unknown value {objective!r}; "
            f"choose one of {list(OBJECTIVES)}"
        )
    dtype = _choice("model.dtype", model_cfg.dtype, DTYPES)
    common = dict(
        d_model=model_cfg.d_model,
        n_layers=model_cfg.n_layers,
        mixer=model_cfg.mixer,
        max_len=info.max_length,
        norm=model_cfg.norm,
        prenorm=model_cfg.prenorm,
        mlp=model_cfg.mlp,
        mlp_ratio=model_cfg.mlp_ratio,
        dropout=model_cfg.dropout,
        remat=model_cfg.remat,
        mixer_options=model_cfg.mixer_options.to_dict() or None,
        short_conv=model_cfg.short_conv,
        dtype=dtype,
    )
    if info.sequence_labels:
        if objective != "supervised":
            raise ValueError(
                f"train.objective={objective!r}: self-pretraining applies to classification "
                f"tasks; {info.name!r} is already a sequence (language-model) task"
            )
        if info.vocab_size is None:
            raise ValueError(f"task {info.name!r}: sequence labelling needs token inputs")
        if info.num_classes > info.vocab_size:
            raise ValueError(
                f"task {info.name!r}: {info.num_classes} label classes exceed the vocabulary "
                f"({info.vocab_size}); the language-model head predicts tokens"
            )
        return LanguageModel(
            vocab_size=info.vocab_size, tie_embeddings=model_cfg.tie_embeddings, **common
        )
    if objective == "denoise":
        common["denoise_outputs"] = info.vocab_size or info.input_dim
    return SequenceClassifier(
        num_classes=info.num_classes,
        vocab_size=info.vocab_size,
        input_dim=info.input_dim or 1,
        bidirectional=_choice("model.bidirectional", model_cfg.bidirectional, BIDIRECTIONAL),
        pooling=model_cfg.pooling,
        dual=info.two_sequence,
        **common,
    )


def example_batch(info: TaskInfo, batch: int = 1) -> dict[str, np.ndarray]:
    """Zeros shaped like a batch of ``info``'s task (to initialise or trace the model)."""
    t = info.max_length
    if info.vocab_size is None:
        inputs = np.zeros((batch, t, info.input_dim), np.float32)
    else:
        inputs = np.zeros((batch, t), np.int32)
    out = {"inputs": inputs, "mask": np.ones((batch, t), bool)}
    if info.two_sequence:
        out["inputs2"], out["mask2"] = inputs, out["mask"]
    return out


def _inputs(model: nn.Module, batch) -> tuple[tuple, dict]:
    if isinstance(model, LanguageModel):
        return (batch["inputs"],), {}
    kwargs = dict(mask=batch["mask"])
    if model.dual:
        kwargs.update(inputs2=batch["inputs2"], mask2=batch["mask2"])
    return (batch["inputs"],), kwargs


def init_variables(model: nn.Module, rng, batch):
    """The model's boxed variables (parameters with logical axis names, constants)."""
    if getattr(model, "denoise_outputs", 0):
        return model.init(rng, batch["inputs"], mask=batch["mask"], method="denoise")
    args, kwargs = _inputs(model, batch)
    return model.init(rng, *args, **kwargs)


def apply_model(model: nn.Module, variables, batch, *, rng=None):
    """logits for ``batch``: (b, t, classes) for a LanguageModel, (b, classes) otherwise.
    ``rng`` set means training mode (dropout on)."""
    args, kwargs = _inputs(model, batch)
    kwargs["deterministic"] = rng is None
    if rng is not None:
        kwargs["rngs"] = {"dropout": rng}
    return model.apply(variables, *args, **kwargs)


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


def is_causal(model: nn.Module) -> bool:
    """Whether the model's stack is causal (a LanguageModel, or a classifier resolved to the
    causal form)."""
    if isinstance(model, LanguageModel):
        return True
    if model.bidirectional is not None:
        return not model.bidirectional
    return not all(m in BIDIRECTIONAL_MIXERS for m in parse_pattern(model.mixer, model.n_layers))


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
    if not 0 < mask_rate < 1:
        raise ValueError(f"config key 'train.mask_rate' must be in (0, 1), got {mask_rate}")
    causal = is_causal(model)
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
        kwargs = {"mask": mask, "deterministic": not train}
        if train:
            kwargs["rngs"] = {"dropout": jax.random.fold_in(rng, 1)}
        out = model.apply(variables, corrupted, method="denoise", **kwargs)
        if continuous:
            values = targets if targets.ndim == 3 else targets[..., None]
            l1 = jnp.mean(jnp.abs(out - values.astype(jnp.float32)), axis=-1)
            return jnp.sum(l1 * w), jnp.zeros(()), jnp.sum(w)
        logp = jax.nn.log_softmax(out, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(out, -1) == targets).astype(jnp.float32)
        return jnp.sum(nll * w), jnp.sum(correct * w), jnp.sum(w)

    return denoise


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
