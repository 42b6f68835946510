"""From a validated config and a task to a model, its example batch and its abstract shapes.

The one place a config's ``model`` section becomes values: :func:`backbone` resolves the
direction and dtypes into a :class:`effseq.models.Backbone`; :func:`build_model` picks the
model for the task; :func:`abstract_model` gives the trainer, compare, the tests and the
benchmarks the model with its variables' shapes (nothing computed).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effseq.data import TaskInfo
from effseq.models import registry
from effseq.models.backbone import Backbone
from effseq.models.classifier import SequenceClassifier
from effseq.models.language_model import LanguageModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def backbone(model_cfg, info: TaskInfo, *, causal: bool | None = None) -> Backbone:
    """``config.model`` -> the Backbone for a task of ``info``'s length. ``causal`` None
    resolves ``model.bidirectional`` (auto: bidirectional where every mixer has the form)."""
    if causal is None:
        choice = model_cfg.bidirectional
        causal = choice == "no" or (
            choice == "auto" and bool(registry.causal_only(registry.names(model_cfg.mixer)))
        )
    return Backbone(
        mixer=model_cfg.mixer,
        d_model=model_cfg.d_model,
        n_layers=model_cfg.n_layers,
        causal=causal,
        max_len=info.max_length,
        norm=model_cfg.norm,
        prenorm=model_cfg.prenorm,
        mlp=model_cfg.mlp,
        mlp_ratio=model_cfg.mlp_ratio,
        dropout=model_cfg.dropout,
        remat=model_cfg.remat,
        short_conv=model_cfg.short_conv,
        mixer_options=model_cfg.mixer_options.to_dict(),
        dtype=DTYPES[model_cfg.dtype],
    )


def build_model(model_cfg, info: TaskInfo, objective: str = "supervised") -> nn.Module:
    """The model for ``info``'s task: a LanguageModel (causal, logits at every position) for
    sequence-labelling tasks, else a SequenceClassifier (dual-encoder for two-sequence tasks).

    ``objective="denoise"`` (self-pretraining) gives the classifier a per-position head over
    the vocabulary or the input channels instead of its classification head."""
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
            backbone(model_cfg, info, causal=True),
            vocab_size=info.vocab_size,
            tie_embeddings=model_cfg.tie_embeddings,
        )
    return SequenceClassifier(
        backbone(model_cfg, info),
        num_classes=info.num_classes,
        vocab_size=info.vocab_size,
        input_dim=info.input_dim or 1,
        pooling=model_cfg.pooling,
        dual=info.two_sequence,
        denoise_outputs=(info.vocab_size or info.input_dim) if objective == "denoise" else 0,
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


def init_variables(model: nn.Module, rng, batch):
    """The model's boxed variables (parameters with logical axis names, constants)."""
    return model.init(rng, batch, method="forward")


def abstract_model(config, info: TaskInfo):
    """``config`` (a validated run config) -> (model, its boxed variables as
    ``jax.ShapeDtypeStruct`` leaves, from ``jax.eval_shape``: nothing is computed)."""
    model = build_model(config.model, info, config.train.objective)
    init = functools.partial(init_variables, model)
    return model, jax.eval_shape(init, jax.random.key(0), example_batch(info))


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
