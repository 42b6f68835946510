"""From a config and a task to a model and the functions that run it on a batch."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effseq.data import TaskInfo
from effseq.models import LanguageModel, SequenceClassifier

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BIDIRECTIONAL = {"auto": None, "yes": True, "no": False}


def _choice(key: str, value, choices):
    if value not in choices:
        raise ValueError(
            f"config key {key!r}: unknown value {value!r}; choose one of {list(choices)}"
        )
    return choices[value]


def build_model(model_cfg, info: TaskInfo) -> nn.Module:
    """The model for ``info``'s task: a LanguageModel (causal, logits at every position) for
    sequence-labelling tasks, else a SequenceClassifier (dual-encoder for two-sequence tasks)."""
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
        mixer_options=dict(model_cfg.mixer_options) or None,
        dtype=dtype,
    )
    if info.sequence_labels:
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


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def model_summary(model: nn.Module) -> dict:
    """Flat dict of the model's hyper-parameters for logs."""
    fields = dataclasses.fields(model)
    return {f.name: getattr(model, f.name) for f in fields if f.name not in ("parent", "name")}
