"""Sequence classifier for LRA-style tasks: encoder, stack, masked pooling, head; dual encoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops, sharding
from effseq.layers import params
from effseq.models.backbone import Backbone
from effseq.models.blocks import _norm
from effseq.models.stack import Stack

POOLINGS = ("mean", "last", "first")


class SequenceClassifier(nn.Module):
    """inputs (b, t) tokens or (b, t[, c]) values, mask (b, t) -> logits (b, num_classes).

    Padded positions (mask False) are zeroed before every mixer and left out of the pooling,
    so their values never change the output. ``dual=True`` encodes ``inputs`` and ``inputs2``
    with the same weights and classifies [u, v, u * v, u - v] with an MLP (the LRA Retrieval
    setup, Tay et al. 2021, "Long Range Arena", sec. 3.4).

    Attributes:
      backbone: the stack's settings (:class:`effseq.models.Backbone`); ``causal=False`` for
        the bidirectional form (where every mixer has one).
      num_classes: outputs of the classification head.
      vocab_size: token inputs; None means continuous inputs of ``input_dim`` channels (pixels)
        read by a linear encoder.
      pooling: "mean" over real tokens, "last" real token, or "first".
      denoise_outputs: > 0 adds a per-position head of this many outputs (the vocabulary, or
        the input channels) for self-pretraining on the inputs (:meth:`denoise`).
    """

    backbone: Backbone
    num_classes: int
    vocab_size: int | None = None
    input_dim: int = 1
    pooling: str = "mean"
    dual: bool = False
    denoise_outputs: int = 0

    def setup(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling={self.pooling!r}; choose one of {POOLINGS}")
        bb = self.backbone
        d, pd = bb.d_model, bb.param_dtype
        if self.vocab_size is not None:
            shape, axes = (self.vocab_size, d), (sharding.VOCAB, sharding.EMBED)
            self.encoder = params.param(self, "embed", nn.initializers.normal(1.0), shape, axes, pd)
        else:
            shape, axes = (self.input_dim, d), (sharding.MLP, sharding.EMBED)
            self.encoder = params.param(
                self, "encoder", nn.initializers.lecun_normal(), shape, axes, pd
            )
        self.stack = Stack(bb)
        self.final_norm = _norm(bb.norm, bb.dtype, pd, "final_norm")
        init = nn.initializers.lecun_normal()
        if self.denoise_outputs:
            # A pretraining model has only the per-position head: the classification head of
            # the fine-tuned model then starts fresh, not from weights decayed while unused.
            self.denoise_head = params.param(
                self,
                "denoise_head",
                init,
                (d, self.denoise_outputs),
                (sharding.EMBED, sharding.VOCAB),
                pd,
            )
            return
        if self.dual:
            self.hidden = params.param(
                self, "hidden", init, (4 * d, d), (sharding.MLP, sharding.EMBED), pd
            )
        self.head = params.param(
            self,
            "head",
            init,
            (d, self.num_classes),
            (sharding.EMBED, sharding.CLASSES),
            pd,
        )

    def features(self, inputs, mask=None, deterministic: bool = True):
        """(b, t[, c]) -> (features (b, t, d) after the final norm, mask (b, t))."""
        dtype = self.backbone.dtype
        if self.vocab_size is not None:
            x = jnp.take(self.encoder, inputs, axis=0)
        else:
            values = inputs[..., None] if inputs.ndim == 2 else inputs
            x = ops.dense(values.astype(dtype), self.encoder.astype(dtype))
        x = x.astype(dtype)
        if mask is None:
            mask = jnp.ones(x.shape[:2], bool)
        return self.final_norm(self.stack(x, mask, deterministic)), mask

    def denoise(self, inputs, mask=None, deterministic: bool = True):
        """Per-position outputs (b, t, denoise_outputs) float32 for self-pretraining: token
        logits, or predicted input values for continuous inputs."""
        if not self.denoise_outputs:
            raise ValueError("SequenceClassifier.denoise needs denoise_outputs > 0")
        x, _ = self.features(inputs, mask, deterministic)
        return ops.dense(x, self.denoise_head.astype(self.backbone.dtype)).astype(jnp.float32)

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
            dtype = self.backbone.dtype
            u = jax.nn.gelu(jnp.concatenate([u, v, u * v, u - v], -1) @ self.hidden.astype(dtype))
        return (u @ self.head.astype(self.backbone.dtype)).astype(jnp.float32)

    def forward(self, batch, deterministic: bool = True):
        """The trainer's call, the same for every model: a batch dict (``inputs``, ``mask``,
        and ``inputs2``/``mask2`` for a dual encoder) -> logits (b, num_classes) float32, or
        for a pretraining model (``denoise_outputs`` > 0) the per-position outputs of
        :meth:`denoise`."""
        if self.denoise_outputs:
            return self.denoise(batch["inputs"], batch["mask"], deterministic)
        if self.dual:
            return self(
                batch["inputs"], batch["mask"], batch["inputs2"], batch["mask2"], deterministic
            )
        return self(batch["inputs"], batch["mask"], deterministic=deterministic)
