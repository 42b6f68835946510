"""Sequence classifier for LRA-style tasks: encoder, stack, masked pooling, head; dual encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops, sharding
from effseq.layers import params
from effseq.models.blocks import _norm
from effseq.models.registry import BIDIRECTIONAL, parse_pattern
from effseq.models.stack import stack_for

POOLINGS = ("mean", "last", "first")


class SequenceClassifier(nn.Module):
    """inputs (b, t) tokens or (b, t[, c]) values, mask (b, t) -> logits (b, num_classes).

    Padded positions (mask False) are zeroed before every mixer and left out of the pooling,
    so their values never change the output. ``dual=True`` encodes ``inputs`` and ``inputs2``
    with the same weights and classifies [u, v, u * v, u - v] with an MLP (the LRA Retrieval
    setup, Tay et al. 2021, "Long Range Arena", sec. 3.4).

    Attributes beyond the model's width and depth:
      vocab_size: token inputs; None means continuous inputs of ``input_dim`` channels (pixels)
        read by a linear encoder.
      bidirectional: None uses the non-causal form where every mixer of the pattern has one.
      pooling: "mean" over real tokens, "last" real token, or "first".
      denoise_outputs: > 0 adds a per-position head of this many outputs (the vocabulary, or
        the input channels) for self-pretraining on the inputs (:meth:`denoise`).
      short_conv: > 0 puts a causal depthwise convolution of that many taps in front of every
        mixer (Zoology's fairness recipe, Arora et al. 2023).
    """

    num_classes: int
    vocab_size: int | None = None
    d_model: int = 128
    n_layers: int = 4
    mixer: str = "s4d"
    max_len: int = 1024
    input_dim: int = 1
    bidirectional: bool | None = None
    pooling: str = "mean"
    dual: bool = False
    denoise_outputs: int = 0
    norm: str = "layernorm"
    prenorm: bool = True
    mlp: str = "glu"
    mlp_ratio: int = 4
    dropout: float = 0.0
    remat: bool = False
    mixer_options: Mapping[str, Any] | None = None
    short_conv: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling={self.pooling!r}; choose one of {POOLINGS}")
        pattern = parse_pattern(self.mixer, self.n_layers)
        bidirectional = self.bidirectional
        if bidirectional is None:
            bidirectional = all(m in BIDIRECTIONAL for m in pattern)
        pd = self.param_dtype
        if self.vocab_size is not None:
            shape, axes = (self.vocab_size, self.d_model), (sharding.VOCAB, sharding.EMBED)
            self.encoder = params.param(self, "embed", nn.initializers.normal(1.0), shape, axes, pd)
        else:
            shape, axes = (self.input_dim, self.d_model), (sharding.MLP, sharding.EMBED)
            self.encoder = params.param(
                self, "encoder", nn.initializers.lecun_normal(), shape, axes, pd
            )
        self.stack = stack_for(self, causal=not bidirectional)
        self.final_norm = _norm(self.norm, self.dtype, pd, "final_norm")
        init = nn.initializers.lecun_normal()
        if self.denoise_outputs:
            # A pretraining model has only the per-position head: the classification head of
            # the fine-tuned model then starts fresh, not from weights decayed while unused.
            self.denoise_head = params.param(
                self,
                "denoise_head",
                init,
                (self.d_model, self.denoise_outputs),
                (sharding.EMBED, sharding.VOCAB),
                pd,
            )
            return
        head_in = 4 * self.d_model if self.dual else self.d_model
        if self.dual:
            self.hidden = params.param(
                self, "hidden", init, (head_in, self.d_model), (sharding.MLP, sharding.EMBED), pd
            )
        self.head = params.param(
            self,
            "head",
            init,
            (self.d_model, self.num_classes),
            (sharding.EMBED, sharding.CLASSES),
            pd,
        )

    def features(self, inputs, mask=None, deterministic: bool = True):
        """(b, t[, c]) -> (features (b, t, d) after the final norm, mask (b, t))."""
        if self.vocab_size is not None:
            x = jnp.take(self.encoder, inputs, axis=0)
        else:
            values = inputs[..., None] if inputs.ndim == 2 else inputs
            x = ops.dense(values.astype(self.dtype), self.encoder.astype(self.dtype))
        x = x.astype(self.dtype)
        if mask is None:
            mask = jnp.ones(x.shape[:2], bool)
        return self.final_norm(self.stack(x, mask, deterministic)), mask

    def denoise(self, inputs, mask=None, deterministic: bool = True):
        """Per-position outputs (b, t, denoise_outputs) float32 for self-pretraining: token
        logits, or predicted input values for continuous inputs."""
        if not self.denoise_outputs:
            raise ValueError("SequenceClassifier.denoise needs denoise_outputs > 0")
        x, _ = self.features(inputs, mask, deterministic)
        return ops.dense(x, self.denoise_head.astype(self.dtype)).astype(jnp.float32)

    def encode(self, inputs, mask=None, deterministic: bool = True):
        """(b, t[, c]) -> pooled features (b, d)."""
        x, mask = self.features(inputs, mask, deterministic)
        m = mask[..., None].astype(x.dtype)
        if self.pooling == "mean":
            return (x * m).sum(1) / jnp.maximum(m.sum(1), 1)
        if self.pooling == "first":
            return x[:, 0]
        last = jnp.maximum(mask.sum(1) - 1, 0)  # real tokens come first
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]

    def __call__(self, inputs, mask=None, inputs2=None, mask2=None, deterministic: bool = True):
        if self.denoise_outputs:
            raise ValueError(
                "SequenceClassifier(denoise_outputs > 0) is a pretraining model: call denoise"
            )
        u = self.encode(inputs, mask, deterministic)
        if self.dual:
            if inputs2 is None:
                raise ValueError("SequenceClassifier(dual=True) needs `inputs2`")
            v = self.encode(inputs2, mask2, deterministic)
            u = jax.nn.gelu(
                jnp.concatenate([u, v, u * v, u - v], -1) @ self.hidden.astype(self.dtype)
            )
        return (u @ self.head.astype(self.dtype)).astype(jnp.float32)
