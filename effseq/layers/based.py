"""The Based linear-attention layer: causal linear attention with a second-order Taylor feature map.

Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra & Ré 2024, "Simple linear
attention language models balance the recall-throughput tradeoff" (arXiv:2402.18668), Sec. 4.
With h heads, feature width f per head (the width of each query and key) and value width
p = d / h per head, for x (b, t, d):

    q, k, v = x W_Q, x W_K, x W_V                      (b, t, h, f), (b, t, h, f), (b, t, h, p)
    phi(u) = [1, u', vec(u' u'^T) / sqrt(2)],  u' = u / f^(1/4)     width 1 + f + f^2
    so that phi(q) . phi(k) = 1 + s + s^2 / 2,  s = q . k / sqrt(f)   (Taylor series of exp(s))
    y_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s / (sum_{s<=t} phi(q_t) . phi(k_s) + eps)
    out = y W_O                                        (b, t, d)

The numerator and the normaliser are one causal linear attention (:func:`effseq.ops.
gated_linear_attention` with log gates 0 and query scale 1) over the feature-mapped queries and
keys, with a column of ones appended to the values: its last output channel is the normaliser.
The recurrent form keeps S_t = sum_{s<=t} phi(k_s)^T [v_s, 1], (b, h, 1 + f + f^2, p + 1) in
float32, whatever the compute dtype. Every score 1 + s + s^2 / 2 >= 1/2 is positive, so the
normaliser never vanishes after a real token.

The 1/sqrt(f) inside the Taylor map is the paper's (an approximation of softmax attention's
exp(q . k / sqrt(f))), as in fla-org's TaylorFeatureMap; fla-org's default parallel path
(``parallel_based`` with scale 1) omits it, which :func:`effseq.convert.based.based` absorbs
into the converted query projection. The normaliser's eps defaults to the 1e-6 that the
official parallel path adds.

This is only the linear-attention layer of the Based architecture. The paper's models
interleave it with short sliding-window softmax attention layers (and short gated
convolutions); in effseq those are separate layers of the stack, e.g. the hybrid pattern
``"based,attention"`` with a windowed attention mixer. Projections use Flax's default
LeCun-normal init; there are no biases.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from effseq import ops
from effseq import sharding as ax
from effseq.layers import params
from effseq.layers.masking import packing, zero_padding
from effseq.layers.mixer import Mixer
from effseq.typing import Array

__all__ = ["Based", "taylor_features"]


def taylor_features(u: Array) -> Array:
    """The Based feature map over the last axis: u (..., f) -> (..., 1 + f + f^2).

    phi(u) = [1, u', vec(u' u'^T) / sqrt(2)] with u' = u / f^(1/4), so that for two vectors
    phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(f): the second-order Taylor
    expansion of exp(s). Computed in the dtype of ``u`` (the layer passes float32).
    """
    f = u.shape[-1]
    u = u * (1.0 / math.sqrt(math.sqrt(f)))
    outer = (u[..., :, None] * u[..., None, :]).reshape(*u.shape[:-1], f * f)
    ones = jnp.ones((*u.shape[:-1], 1), u.dtype)
    return jnp.concatenate([ones, u, outer * (1.0 / math.sqrt(2.0))], axis=-1)


class Based(Mixer):
    """Based linear attention with the Taylor feature map (Arora et al. 2024); causal only.

    Attributes:
      d_model: width d of the input and output.
      num_heads: number of heads h; d_model must be a multiple of it (value width d / h).
      feature_dim: width f of each head's queries and keys, before the feature map (the
        state holds 1 + f + f^2 features per head).
      eps: added to the normaliser (the sum of the attention weights) before dividing.
      chunk_size: chunk length of :func:`effseq.ops.gated_linear_attention` (None: its
        backend default).
      dtype: compute dtype of the projections; the feature map, the recurrence and the
        normalisation run in float32.
      param_dtype: storage dtype of the parameters.
    """

    num_heads: int = 12
    feature_dim: int = 16
    eps: float = 1e-6
    chunk_size: int | None = None

    @property
    def head_v(self) -> int:
        """Value width per head, d_model / num_heads."""
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"Based: num_heads must be a positive int, got {self.num_heads!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"Based: d_model = {self.d_model} must be a multiple of num_heads = "
                f"{self.num_heads} (each head's value width is d_model / num_heads)"
            )
        return self.d_model // self.num_heads

    @property
    def num_features(self) -> int:
        """Width 1 + f + f^2 of the feature map, the state's key axis."""
        return 1 + self.feature_dim + self.feature_dim**2

    def setup(self):
        self.require_causal()
        if not isinstance(self.feature_dim, int) or self.feature_dim < 1:
            raise ValueError(f"Based: feature_dim must be a positive int, got {self.feature_dim!r}")
        if not self.eps >= 0:
            raise ValueError(f"Based: eps must be >= 0, got {self.eps!r}")
        d, h, f, p = self.d_model, self.num_heads, self.feature_dim, self.head_v
        # Fan-in/out of the (d, h, x) kernels are d and h * x, as for a (d, h * x) Dense.
        lecun_heads = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))

        def param(name, init, shape, axes):
            return params.param(self, name, init, shape, axes, self.param_dtype)

        heads = (ax.HEADS, ax.HEAD_DIM)
        self.wq = param("wq", lecun_heads, (d, h, f), (ax.EMBED, *heads))
        self.wk = param("wk", lecun_heads, (d, h, f), (ax.EMBED, *heads))
        self.wv = param("wv", lecun_heads, (d, h, p), (ax.EMBED, *heads))
        self.wo = param(
            "wo",
            nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
            (h, p, d),
            (*heads, ax.EMBED),
        )

    def _inputs(self, x: Array) -> tuple[Array, Array, Array]:
        """x (..., d) -> phi(q), phi(k) (..., h, 1 + f + f^2), [v, 1] (..., h, p + 1); float32."""
        cd, f32 = self.dtype, jnp.float32
        x = x.astype(cd)
        q, k, v = (ops.dense(x, w.astype(cd)).astype(f32) for w in (self.wq, self.wk, self.wv))
        v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), f32)], axis=-1)
        return taylor_features(q), taylor_features(k), v1

    def _output(self, o: Array) -> Array:
        """o (..., h, p + 1) float32 (numerator, normaliser) -> (..., d) in the compute dtype."""
        y = o[..., :-1] / (o[..., -1:] + self.eps)
        cd = self.dtype
        return ops.dense(y.astype(cd), self.wo.astype(cd), 2)

    def _attend(
        self, phi_q: Array, phi_k: Array, v1: Array, segment_ids: Array | None = None
    ) -> tuple[Array, Array]:
        log_g = jnp.zeros_like(phi_k)  # no decay: plain causal linear attention
        return ops.gated_linear_attention(
            phi_q, phi_k, v1, log_g, scale=1.0, chunk_size=self.chunk_size, segment_ids=segment_ids
        )

    def __call__(
        self, x: Array, mask: Array | None = None, *, segment_ids: Array | None = None
    ) -> Array:
        """x (b, t, d), mask (b, t) bool or None, segment_ids (b, t) int or None (packed
        documents, 0 = padding) -> (b, t, d) in the compute dtype."""
        return self._forward(x, mask, segment_ids)[0]

    def _forward(self, x, mask, segment_ids):
        mask, seg = packing("Based", x, mask, segment_ids)
        x = zero_padding(x, mask)
        phi_q, phi_k, v1 = self._inputs(x)
        # Padded keys are zeroed whole (the constant feature too): they add nothing to the
        # state or to the normaliser.
        o, state = self._attend(phi_q, zero_padding(phi_k, mask), v1, seg)
        return self._output(o), state

    def init_state(self, batch: int, max_len: int) -> Array:
        """Decoding state before any token: S (b, h, 1 + f + f^2, p + 1) float32 zeros, whatever
        ``max_len``."""
        del max_len
        return jnp.zeros((batch, self.num_heads, self.num_features, self.head_v + 1), jnp.float32)

    def prefill(
        self, x: Array, max_len: int, *, segment_ids: Array | None = None
    ) -> tuple[Array, Array]:
        """A prompt x (b, t, d) in parallel -> (y (b, t, d), S after it); with ``segment_ids``,
        S of each row's last document (its trailing padding adds nothing)."""
        del max_len
        if segment_ids is not None:
            return self._forward(x, None, segment_ids)
        o, state = self._attend(*self._inputs(x))
        return self._output(o), state

    def step(self, x_t: Array, state: Array) -> tuple[Array, Array]:
        """One token: x_t (b, d) -> (y_t (b, d), state), equal to ``__call__`` at that position."""
        phi_q, phi_k, v1 = self._inputs(x_t)
        state, o = ops.gla_step(state, phi_q, phi_k, v1, jnp.zeros_like(phi_k), scale=1.0)
        return self._output(o), state
