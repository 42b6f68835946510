"""Causal language model: embedding, stack of residual blocks, final norm, head; decoding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops, sharding
from effseq.layers import params
from effseq.models.blocks import _norm
from effseq.models.stack import stack_for


class LanguageModel(nn.Module):
    """tokens (b, t) int32 -> logits (b, t, vocab) float32.

    ``mixer`` is one of ``effseq.models.MIXERS`` or a comma pattern over the depth. Decoding:
    ``init_cache(batch, max_len)`` (or ``prefill(prompt, max_len)``, the prompt in parallel)
    then ``decode_step(tokens_t, cache)`` per token; S4D, Mamba and
    GLA keep a fixed-size state, attention a KV cache, SGConv the input history.
    ``short_conv`` > 0 puts a causal depthwise convolution of that many taps in front of every
    mixer (Zoology's fairness recipe); its last inputs join the decoding state.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    mixer: str = "gla"
    max_len: int = 2048
    norm: str = "layernorm"
    prenorm: bool = True
    mlp: str = "glu"
    mlp_ratio: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True
    remat: bool = False
    mixer_options: Mapping[str, Any] | None = None
    short_conv: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embed = params.param(
            self,
            "embed",
            nn.initializers.normal(1.0),
            (self.vocab_size, self.d_model),
            (sharding.VOCAB, sharding.EMBED),
            self.param_dtype,
        )
        self.stack = stack_for(self, causal=True)
        self.final_norm = _norm(self.norm, self.dtype, self.param_dtype, "final_norm")
        if not self.tie_embeddings:
            self.head = params.param(
                self,
                "head",
                nn.initializers.lecun_normal(),
                (self.d_model, self.vocab_size),
                (sharding.EMBED, sharding.VOCAB),
                self.param_dtype,
            )

    def _logits(self, x):
        x = self.final_norm(x)
        if self.tie_embeddings:
            # Scale by d^-1/2 so tied logits start at unit scale like an untied lecun head.
            logits = ops.dense(x, self.embed.T.astype(self.dtype)) * self.d_model**-0.5
            return logits.astype(jnp.float32)
        return ops.dense(x, self.head.astype(self.dtype)).astype(jnp.float32)

    def _embed(self, tokens):
        return jnp.take(self.embed, tokens, axis=0).astype(self.dtype)

    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        return self._logits(self.stack(self._embed(tokens), None, deterministic))

    def init_cache(self, batch: int, max_len: int):
        """Decoding state of every layer, stacked along the scanned layer axis."""
        return self.stack.init_state(batch, max_len)

    def prefill(self, tokens: jax.Array, max_len: int):
        """A prompt tokens (b, t) in parallel -> (logits (b, t, vocab), cache): the cache
        ``decode_step`` continues from, as if the prompt had been decoded token by token, with
        room for max_len tokens in all."""
        x, cache = self.stack.prefill(self._embed(tokens), max_len)
        return self._logits(x), cache

    def decode_step(self, tokens_t: jax.Array, cache):
        """tokens_t (b,) int32 -> (logits (b, vocab) float32, cache)."""
        x, cache = self.stack.step(self._embed(tokens_t), cache)
        return self._logits(x), cache
