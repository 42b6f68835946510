"""The gated linear attention (GLA) layer.

Yang, Wang, Shen, Panda & Kim 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training", Sec. 4.4 (the GLA layer). With h heads, per-head key width k = expand_k * d / h and
value width v = expand_v * d / h, for x (b, t, d):

    q, k, v = x W_Q, x W_K, x W_V                         (b, t, h, k), (b, t, h, k), (b, t, h, v)
    log_g = logsigmoid(x W_a1 W_a2 + b_a) / tau            (b, t, h, k), low rank 16, tau = 16
    o = GLA(q, k, v, log_g)                                S_t = diag(g_t) S_{t-1} + k_t^T v_t
    o = LayerNorm_head(o)                                  per head's v channels; norm="layer"
      or RMSNorm_head(o)                                   fla-org's choice, norm="rms"
    r = Swish(x W_r + b_r)                                 (b, t, h, v)
    y = (r * o) W_O                                        (b, t, d)

The gate alpha_t = sigmoid(.)^(1/tau) keeps g close to 1 at initialization (the paper's
"gate logit normalizer"); queries are scaled by k^-1/2. The per-head normalization is the
paper's LayerNorm by default, with one scale and bias of width v shared by the heads, as
fla-org's group norm does; ``norm="rms"`` gives fla-org's ``GatedLinearAttention`` instead (an
RMSNorm with one scale of width v and no bias), which :func:`effseq.convert.mixer_params`
needs to reproduce its checkpoints. Projections use Flax's default LeCun-normal
init; biases start at zero and the norm at scale 1, bias 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops
from effseq import sharding as ax
from effseq.layers import params
from effseq.layers.masking import packing, zero_padding
from effseq.layers.mixer import Mixer
from effseq.typing import Array

__all__ = ["GLA", "NORMS"]

# The per-head output norms: the paper's LayerNorm, fla-org's RMSNorm.
NORMS = ("layer", "rms")


class GLA(Mixer):
    """Gated linear attention layer (Yang et al. 2023, Sec. 4.4); causal only.

    Attributes:
      d_model: width d of the input and output.
      num_heads: number of heads h.
      expand_k: total key width = expand_k * d_model (split over the heads).
      expand_v: total value width = expand_v * d_model (split over the heads).
      gate_low_rank: rank of the forget-gate projection.
      gate_logit_normalizer: tau, the divisor of logsigmoid in the log gate.
      norm: "layer" (the paper's per-head LayerNorm, scale and bias) or "rms" (fla-org's
        per-head RMSNorm, scale only).
      norm_eps: epsilon of the per-head norm.
      chunk_size: chunk length of :func:`effseq.ops.gated_linear_attention` (None: its
        backend default).
      impl: ``impl`` of :func:`effseq.ops.gated_linear_attention` (None: the backend default;
        ``"pallas"``: the Pallas kernels, no packed rows).
      dtype: compute dtype; the recurrence accumulates in float32.
      param_dtype: storage dtype of the parameters.
    """

    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank: int = 16
    gate_logit_normalizer: float = 16.0
    norm: str = "layer"
    norm_eps: float = 1e-5
    chunk_size: int | None = None
    impl: str | None = None

    def _head_dim(self, expand: float, name: str) -> int:
        total = int(expand * self.d_model)
        if total < self.num_heads or total % self.num_heads:
            raise ValueError(
                f"GLA: {name} * d_model = {total} must be a positive multiple of "
                f"num_heads = {self.num_heads}"
            )
        return total // self.num_heads

    @property
    def head_k(self) -> int:
        return self._head_dim(self.expand_k, "expand_k")

    @property
    def head_v(self) -> int:
        return self._head_dim(self.expand_v, "expand_v")

    def setup(self):
        self.require_causal()
        d, h, dk, dv, r = self.d_model, self.num_heads, self.head_k, self.head_v, self.gate_low_rank
        lecun = nn.initializers.lecun_normal()
        # Fan-in/out of the (d, h, x) kernels are d and h * x, as for a (d, h * x) Dense.
        lecun_heads = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        zeros, ones = nn.initializers.zeros, nn.initializers.ones

        def p(name, init, shape, axes):
            return params.param(self, name, init, shape, axes, self.param_dtype)

        heads = (ax.HEADS, ax.HEAD_DIM)
        self.wq = p("wq", lecun_heads, (d, h, dk), (ax.EMBED, *heads))
        self.wk = p("wk", lecun_heads, (d, h, dk), (ax.EMBED, *heads))
        self.wv = p("wv", lecun_heads, (d, h, dv), (ax.EMBED, *heads))
        self.gate_down = p("gate_down", lecun, (d, r), (ax.EMBED, ax.LOW_RANK))
        self.gate_up = p("gate_up", lecun_heads, (r, h, dk), (ax.LOW_RANK, *heads))
        self.gate_bias = p("gate_bias", zeros, (h, dk), heads)
        if self.norm not in NORMS:
            raise ValueError(f"GLA: norm must be one of {NORMS}, got {self.norm!r}")
        self.norm_scale = p("norm_scale", ones, (dv,), (ax.HEAD_DIM,))
        if self.norm == "layer":
            self.norm_bias = p("norm_bias", zeros, (dv,), (ax.HEAD_DIM,))
        self.wr = p("wr", lecun_heads, (d, h, dv), (ax.EMBED, *heads))
        self.br = p("br", zeros, (h, dv), heads)
        self.wo = p(
            "wo",
            nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
            (h, dv, d),
            (*heads, ax.EMBED),
        )

    def _proj(self, x: Array, w: Array) -> Array:
        return ops.dense(x, w.astype(self.dtype))

    def log_gate(self, x: Array) -> Array:
        """log_g = logsigmoid(x W_a1 W_a2 + b_a) / tau: x (..., d) -> (..., h, k), float32, <= 0."""
        cd = self.dtype
        logits = self._proj(ops.dense(x.astype(cd), self.gate_down.astype(cd)), self.gate_up)
        # In float32: log gates are summed along time, so their rounding error compounds.
        logits = logits.astype(jnp.float32) + self.gate_bias.astype(jnp.float32)
        return jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer

    def _inputs(self, x: Array) -> tuple[Array, Array, Array, Array]:
        x = x.astype(self.dtype)
        return (
            self._proj(x, self.wq),
            self._proj(x, self.wk),
            self._proj(x, self.wv),
            self.log_gate(x),
        )

    def _output(self, x: Array, o: Array) -> Array:
        """Per-head norm of o (..., h, v), then the swish gate from x (..., d), then W_O."""
        cd = self.dtype
        o32 = o.astype(jnp.float32)
        if self.norm == "layer":
            o32 = o32 - jnp.mean(o32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(o32), axis=-1, keepdims=True)
        o = (o32 * jax.lax.rsqrt(var + self.norm_eps)).astype(cd) * self.norm_scale.astype(cd)
        if self.norm == "layer":
            o = o + self.norm_bias.astype(cd)
        r = jax.nn.silu(self._proj(x.astype(cd), self.wr) + self.br.astype(cd))
        return ops.dense(r * o, self.wo.astype(cd), 2)

    def __call__(
        self, x: Array, mask: Array | None = None, *, segment_ids: Array | None = None
    ) -> Array:
        """x (b, t, d), mask (b, t) bool or None, segment_ids (b, t) int or None (packed
        documents, 0 = padding) -> (b, t, d) in the compute dtype."""
        return self._forward(x, mask, segment_ids)[0]

    def _forward(self, x, mask, segment_ids):
        mask, seg = packing("GLA", x, mask, segment_ids)
        x = zero_padding(x, mask)
        q, k, v, log_g = self._inputs(x)
        # Padded steps keep the state as it is: no decay (log g = 0) and nothing written (k = 0).
        k, log_g = zero_padding(k, mask), zero_padding(log_g, mask)
        o, state = ops.gated_linear_attention(
            q, k, v, log_g, chunk_size=self.chunk_size, impl=self.impl, segment_ids=seg
        )
        return self._output(x, o), state

    def init_state(self, batch: int, max_len: int) -> Array:
        """Decoding state before any token: S (b, h, k, v) float32 zeros, whatever ``max_len``."""
        del max_len
        return jnp.zeros((batch, self.num_heads, self.head_k, self.head_v), jnp.float32)

    def prefill(
        self, x: Array, max_len: int, *, segment_ids: Array | None = None
    ) -> tuple[Array, Array]:
        """A prompt x (b, t, d) in parallel -> (y (b, t, d), S after it (b, h, k, v)); with
        ``segment_ids``, S of each row's last document (its trailing padding is identity steps)."""
        del max_len
        if segment_ids is not None:
            return self._forward(x, None, segment_ids)
        q, k, v, log_g = self._inputs(x)
        o, state = ops.gated_linear_attention(
            q, k, v, log_g, chunk_size=self.chunk_size, impl=self.impl
        )
        return self._output(x, o), state

    def step(self, x_t: Array, state: Array) -> tuple[Array, Array]:
        """One token: x_t (b, d) -> (y_t (b, d), state), equal to ``__call__`` at that position."""
        q, k, v, log_g = self._inputs(x_t)
        state, o = ops.gla_step(state, q, k, v, log_g)
        return self._output(x_t, o), state
