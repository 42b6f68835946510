"""Causal language model: embedding, stack of residual blocks, final norm, head; decoding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops, sharding
from effseq.layers import params
from effseq.models.backbone import Backbone
from effseq.models.blocks import _norm
from effseq.models.stack import Stack


class LanguageModel(nn.Module):
    """tokens (b, t) int32 -> logits (b, t, vocab) float32.

    ``backbone`` (:class:`effseq.models.Backbone`, causal) holds the stack's settings. Decoding:
    ``init_cache(batch, max_len)`` (or ``prefill(prompt, max_len)``, the prompt in parallel)
    then ``decode_step(tokens_t, cache)`` per token; S4D, Mamba and GLA keep a fixed-size
    state, attention a KV cache, SGConv the input window its kernel reaches. A backbone's
    ``short_conv`` keeps its last inputs in the decoding state too.

    Packed rows: ``segment_ids`` (b, t) int (:mod:`effseq.ops.segments`: a changed id starts a
    document, 0 is padding) makes every document's logits, and their gradients, those of the
    document run alone: no state, convolution tap or attention weight crosses a start, and
    rotary positions restart.
    """

    backbone: Backbone
    vocab_size: int
    tie_embeddings: bool = True

    def setup(self):
        bb = self.backbone
        if not bb.causal:
            raise ValueError("LanguageModel needs a causal backbone (Backbone(causal=True))")
        self.embed = params.param(
            self,
            "embed",
            nn.initializers.normal(1.0),
            (self.vocab_size, bb.d_model),
            (sharding.VOCAB, sharding.EMBED),
            bb.param_dtype,
        )
        self.stack = Stack(bb)
        self.final_norm = _norm(bb.norm, bb.dtype, bb.param_dtype, "final_norm")
        if not self.tie_embeddings:
            self.head = params.param(
                self,
                "head",
                nn.initializers.lecun_normal(),
                (bb.d_model, self.vocab_size),
                (sharding.EMBED, sharding.VOCAB),
                bb.param_dtype,
            )

    def _logits(self, x):
        x = self.final_norm(x)
        dtype = self.backbone.dtype
        if self.tie_embeddings:
            # Scale by d^-1/2 so tied logits start at unit scale like an untied lecun head.
            logits = ops.dense(x, self.embed.T.astype(dtype)) * self.backbone.d_model**-0.5
            return logits.astype(jnp.float32)
        return ops.dense(x, self.head.astype(dtype)).astype(jnp.float32)

    def _embed(self, tokens):
        return jnp.take(self.embed, tokens, axis=0).astype(self.backbone.dtype)

    def __call__(
        self, tokens: jax.Array, deterministic: bool = True, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """tokens (b, t) int32 -> logits (b, t, vocab) float32; ``segment_ids`` (b, t) int or
        None: packed documents (0 = padding)."""
        x = self.stack(self._embed(tokens), None, deterministic, segment_ids)
        return self._logits(x)

    def forward(self, batch, deterministic: bool = True) -> jax.Array:
        """The trainer's call, the same for every model: a batch dict (``inputs`` (b, t)
        tokens, optionally ``segment_ids`` (b, t) of packed rows) -> logits (b, t, vocab)
        float32."""
        return self(batch["inputs"], deterministic, batch.get("segment_ids"))

    def init_cache(self, batch: int, max_len: int):
        """Decoding state of every layer, stacked along the scanned layer axis."""
        return self.stack.init_state(batch, max_len)

    def prefill(self, tokens: jax.Array, max_len: int, segment_ids: jax.Array | None = None):
        """A prompt tokens (b, t) in parallel -> (logits (b, t, vocab), cache): the cache
        ``decode_step`` continues from, as if the prompt had been decoded token by token, with
        room for max_len tokens in all. With ``segment_ids`` (packed or right-padded prompts,
        0 = padding) the cache continues each row's last document as if it had been decoded
        alone."""
        x, cache = self.stack.prefill(self._embed(tokens), max_len, segment_ids)
        return self._logits(x), cache

    def decode_step(self, tokens_t: jax.Array, cache):
        """tokens_t (b,) int32 -> (logits (b, vocab) float32, cache)."""
        x, cache = self.stack.step(self._embed(tokens_t), cache)
        return self._logits(x), cache
