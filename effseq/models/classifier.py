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
from effseq.ops import segments

POOLINGS = ("mean", "last", "first")


class SequenceClassifier(nn.Module):
    """inputs (b, t) tokens or (b, t[, c]) values, mask (b, t) -> logits (b, num_classes).

    Padded positions (mask False) are zeroed before every mixer and left out of the pooling,
    so their values never change the output. ``dual=True`` encodes ``inputs`` and ``inputs2``
    with the same weights and classifies [u, v, u * v, u - v] with an MLP (the LRA Retrieval
    setup, Tay et al. 2021, "Long Range Arena", sec. 3.4).

    Packed rows: with ``segment_ids`` (b, t) int (:mod:`effseq.ops.segments`; a changed id
    starts a document, 0 is padding) no mixer reaches across a document, and ``encode`` /
    ``__call__`` pool and classify each document: (b, num_segments, ...), document k being the
    k-th run of equal non-zero ids in its row (zeros where a row has fewer).

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

    def features(self, inputs, mask=None, deterministic: bool = True, segment_ids=None):
        """(b, t[, c]) -> (features (b, t, d) after the final norm, mask (b, t)); with
        ``segment_ids`` the mask also excludes padding (id 0)."""
        dtype = self.backbone.dtype
        if self.vocab_size is not None:
            x = jnp.take(self.encoder, inputs, axis=0)
        else:
            values = inputs[..., None] if inputs.ndim == 2 else inputs
            x = ops.dense(values.astype(dtype), self.encoder.astype(dtype))
        x = x.astype(dtype)
        if mask is None:
            mask = jnp.ones(x.shape[:2], bool)
        if segment_ids is not None:
            mask = mask & segments.padding_mask(segment_ids)
        x = self.stack(x, mask, deterministic, segment_ids)
        return self.final_norm(x), mask

    def denoise(self, inputs, mask=None, deterministic: bool = True, segment_ids=None):
        """Per-position outputs (b, t, denoise_outputs) float32 for self-pretraining: token
        logits, or predicted input values for continuous inputs."""
        if not self.denoise_outputs:
            raise ValueError("SequenceClassifier.denoise needs denoise_outputs > 0")
        x, _ = self.features(inputs, mask, deterministic, segment_ids)
        return ops.dense(x, self.denoise_head.astype(self.backbone.dtype)).astype(jnp.float32)

    def _pool(self, x, mask):
        """x (b, t, d), mask (b, t) -> (b, d), over one document per row."""
        m = mask[..., None].astype(x.dtype)
        if self.pooling == "mean":
            return (x * m).sum(1) / jnp.maximum(m.sum(1), 1)
        if self.pooling == "first":
            return x[:, 0]
        last = jnp.maximum(mask.sum(1) - 1, 0)  # real tokens come first
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]

    def _pool_documents(self, x, mask, segment_ids, num_segments: int):
        """x (b, t, d) -> (b, num_segments, d): each document's pooling (the k-th run of equal
        non-zero ids, real positions only); zeros for documents a row does not have."""
        real = mask & segments.padding_mask(segment_ids)
        prev_real = jnp.pad(real[:, :-1], ((0, 0), (1, 0)))
        first = real & (~prev_real | segments.document_starts(segment_ids))
        doc = jnp.where(real, jnp.cumsum(first.astype(jnp.int32), axis=1) - 1, -1)
        member = doc[..., None] == jnp.arange(num_segments)  # (b, t, n)
        if self.pooling == "first":
            member = member & first[..., None]
        elif self.pooling == "last":
            next_first = jnp.pad(first[:, 1:], ((0, 0), (0, 1)), constant_values=True)
            next_real = jnp.pad(real[:, 1:], ((0, 0), (0, 1)))
            member = member & (next_first | ~next_real)[..., None]
        w = member.astype(x.dtype)
        total = jnp.einsum("btn,btd->bnd", w, x)
        return total / jnp.maximum(w.sum(1), 1)[..., None]

    def encode(
        self, inputs, mask=None, deterministic: bool = True, segment_ids=None, num_segments=None
    ):
        """(b, t[, c]) -> pooled features (b, d); with ``segment_ids``, per document
        (b, num_segments, d)."""
        if segment_ids is not None and not (isinstance(num_segments, int) and num_segments > 0):
            raise ValueError(
                "SequenceClassifier: packed rows (segment_ids) need num_segments, the number "
                f"of documents per row to classify (a positive int), got {num_segments!r}"
            )
        x, mask = self.features(inputs, mask, deterministic, segment_ids)
        if segment_ids is None:
            return self._pool(x, mask)
        return self._pool_documents(x, mask, segment_ids, num_segments)

    def __call__(
        self,
        inputs,
        mask=None,
        inputs2=None,
        mask2=None,
        deterministic: bool = True,
        *,
        segment_ids=None,
        num_segments: int | None = None,
    ):
        """-> logits (b, num_classes) float32; with ``segment_ids``, per document
        (b, num_segments, num_classes)."""
        if self.denoise_outputs:
            raise ValueError(
                "SequenceClassifier(denoise_outputs > 0) is a pretraining model: call denoise"
            )
        if self.dual and segment_ids is not None:
            raise ValueError("SequenceClassifier(dual=True) takes no packed rows (segment_ids)")
        u = self.encode(inputs, mask, deterministic, segment_ids, num_segments)
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
            return self.denoise(
                batch["inputs"], batch["mask"], deterministic, batch.get("segment_ids")
            )
        if "segment_ids" in batch:
            raise ValueError(
                "SequenceClassifier.forward: the trainer classifies one document per row; packed "
                "rows (segment_ids) are for denoising pretraining, or call the model with "
                "segment_ids and num_segments"
            )
        if self.dual:
            return self(
                batch["inputs"], batch["mask"], batch["inputs2"], batch["mask2"], deterministic
            )
        return self(batch["inputs"], batch["mask"], deterministic=deterministic)
