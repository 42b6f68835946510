"""The Gated DeltaNet layer: the gated delta rule between short convolutions and a gated
RMSNorm.

Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(ICLR 2025), as fla-org's ``fla/layers/gated_deltanet.py`` builds it. With h heads of key
width k and value width v = expand_v * k, for x (b, t, d):

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))   causal, depthwise, no bias
    q, k = q / sqrt(sum q^2 + 1e-6), k / sqrt(sum k^2 + 1e-6)          per head (L2 norm)
    beta = sigmoid(x W_b)                                               (b, t, h)
    log_g = -exp(A_log) * softplus(x W_a + dt_bias)                     (b, t, h), Mamba-2's gate
    o = gated_delta_rule(q, k, v, log_g, beta)                          effseq.ops, scale k^-1/2
    o = RMSNorm_head(o) * w * SiLU(x W_g)                               one w of width v
    y = o W_o                                                           (b, t, d)

The output norm comes before the gate (the opposite order to Mamba-2's). ``gate="channel"``
gives each key channel its own gate, as Kimi Linear's KDA does (Kimi Team 2025): log_g (b, t,
h, k) = -exp(A_log) * softplus(x W_a1 W_a2 + dt_bias) with a low-rank W_a of rank v and a
dt_bias per channel; this option is effseq's own composition (KDA's layer has more parts) and
has no converter.

Initialization (fla's): A = U(0, 16) per head (A_log = log A); dt_bias = softplus^-1(dt) for
dt log-uniform in [1e-3, 0.1], floored at 1e-4; the norm's weight 1; the convs PyTorch's Conv1d
default (uniform in +-width^-1/2). Projections use Flax's LeCun-normal init (fla keeps
PyTorch's Linear default). A_log and dt_bias are in the "no_decay" group (fla marks them
``_no_weight_decay``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops
from effseq import sharding as ax
from effseq.layers import params
from effseq.layers.mamba import dt_bias_init, uniform_init
from effseq.layers.masking import packing, zero_padding
from effseq.layers.mixer import Mixer
from effseq.ops import segments
from effseq.typing import Array

__all__ = ["GATES", "GatedDeltaNet"]

# One gate per head (Gated DeltaNet) or per key channel (KDA-style).
GATES = ("head", "channel")
# The L2 norm's epsilon inside the square root (fla's l2norm).
L2_EPS = 1e-6


def _a_log_init(key, shape, dtype=jnp.float32) -> Array:
    """log A for A uniform in (0, 16]."""
    return jnp.log(16.0 * (1.0 - jax.random.uniform(key, shape, jnp.float32))).astype(dtype)


def _l2_normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + L2_EPS)


class GatedDeltaNet(Mixer):
    """Gated DeltaNet layer (Yang et al. 2025); see the module docstring; causal only.

    Attributes (fla's ``GatedDeltaNet`` constructor argument in brackets):
      d_model: width d of the input and output [hidden_size].
      num_heads: number of heads h [num_heads, default 6; num_v_heads = num_heads].
      head_dim: key width k per head; None: 0.75 * d_model / num_heads, fla's parameter
        budget (its defaults, 6 heads of 256 at hidden size 2048) [head_dim].
      expand_v: value width v = expand_v * head_dim [expand_v, default 2].
      conv_width: taps of the short convolutions [conv_size].
      gate: "head" (GDN) or "channel" (KDA-style, effseq's own; no converter).
      norm_eps: epsilon of the output RMSNorm [norm_eps].
      chunk_size: chunk length of :func:`effseq.ops.gated_delta_rule` (None: its default).
      impl: ``impl`` of :func:`effseq.ops.gated_delta_rule` (None: the backend default).
      dtype: compute dtype; the recurrence and the norms run in float32.
      param_dtype: storage dtype of the parameters.

    fla's options left at their defaults: ``use_gate=True``, ``use_short_conv=True``,
    ``conv_bias=False``, ``allow_neg_eigval=False``.
    """

    num_heads: int = 6
    head_dim: int | None = None
    expand_v: float = 2.0
    conv_width: int = 4
    gate: str = "head"
    norm_eps: float = 1e-5
    chunk_size: int | None = None
    impl: str | None = None

    @property
    def head_k(self) -> int:
        h = self.num_heads
        if h < 1:
            raise ValueError(f"GatedDeltaNet: num_heads must be >= 1, got {h}")
        if self.head_dim is not None:
            if self.head_dim < 1:
                raise ValueError(f"GatedDeltaNet: head_dim must be >= 1, got {self.head_dim}")
            return self.head_dim
        budget = 3 * self.d_model
        if budget % (4 * h):
            raise ValueError(
                f"GatedDeltaNet: head_dim=None means 0.75 * d_model / num_heads = "
                f"{budget / (4 * h):g}, not an integer; set head_dim"
            )
        return budget // (4 * h)

    @property
    def head_v(self) -> int:
        v = self.expand_v * self.head_k
        if v != int(v) or v < 1:
            raise ValueError(
                f"GatedDeltaNet: expand_v * head_dim = {v:g} must be a positive integer"
            )
        return int(v)

    def setup(self):
        self.require_causal()
        if self.gate not in GATES:
            raise ValueError(f"GatedDeltaNet: gate must be one of {GATES}, got {self.gate!r}")
        d, h, dk, dv, w = self.d_model, self.num_heads, self.head_k, self.head_v, self.conv_width
        lecun_heads = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        conv = uniform_init(w**-0.5)

        def p(name, init, shape, axes, group=None):
            return params.param(self, name, init, shape, axes, self.param_dtype, group=group)

        heads = (ax.HEADS, ax.HEAD_DIM)
        self.wq = p("wq", lecun_heads, (d, h, dk), (ax.EMBED, *heads))
        self.wk = p("wk", lecun_heads, (d, h, dk), (ax.EMBED, *heads))
        self.wv = p("wv", lecun_heads, (d, h, dv), (ax.EMBED, *heads))
        self.conv_q = p("conv_q", conv, (h, dk, w), (*heads, ax.CONV))
        self.conv_k = p("conv_k", conv, (h, dk, w), (*heads, ax.CONV))
        self.conv_v = p("conv_v", conv, (h, dv, w), (*heads, ax.CONV))
        self.wb = p("wb", nn.initializers.lecun_normal(), (d, h), (ax.EMBED, ax.HEADS))
        dt = dt_bias_init(1e-3, 1e-1, 1e-4)
        if self.gate == "head":
            self.wa = p("wa", nn.initializers.lecun_normal(), (d, h), (ax.EMBED, ax.HEADS))
            self.dt_bias = p("dt_bias", dt, (h,), (ax.HEADS,), group="no_decay")
        else:
            self.wa_down = p(
                "wa_down", nn.initializers.lecun_normal(), (d, dv), (ax.EMBED, ax.LOW_RANK)
            )
            self.wa_up = p("wa_up", lecun_heads, (dv, h, dk), (ax.LOW_RANK, *heads))
            self.dt_bias = p("dt_bias", dt, (h, dk), heads, group="no_decay")
        self.A_log = p("A_log", _a_log_init, (h,), (ax.HEADS,), group="no_decay")
        self.wg = p("wg", lecun_heads, (d, h, dv), (ax.EMBED, *heads))
        self.norm_scale = p("norm_scale", nn.initializers.ones, (dv,), (ax.HEAD_DIM,))
        self.wo = p(
            "wo",
            nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
            (h, dv, d),
            (*heads, ax.EMBED),
        )

    # -- pieces shared by the parallel and the recurrent forms -------------------------------

    def _conv_kernel(self) -> Array:
        """The depthwise kernel over the concatenated [q, k, v] channels (h (2k + v), w)."""
        w = self.conv_width
        return jnp.concatenate(
            [c.reshape(-1, w) for c in (self.conv_q, self.conv_k, self.conv_v)], 0
        ).astype(self.dtype)

    def _conv_inputs(self, x: Array) -> Array:
        """x (..., d) -> [x W_q, x W_k, x W_v] flattened (..., h (2k + v)), before the conv."""
        cd = self.dtype
        x = x.astype(cd)
        parts = [ops.dense(x, w.astype(cd)) for w in (self.wq, self.wk, self.wv)]
        return jnp.concatenate([z.reshape(*z.shape[:-2], -1) for z in parts], -1)

    def _split(self, qkv: Array) -> tuple[Array, Array, Array]:
        """The activated conv output (..., h (2k + v)) -> L2-normed q, k (..., h, k) float32 and
        v (..., h, v)."""
        h, dk, dv = self.num_heads, self.head_k, self.head_v
        q, k, v = jnp.split(qkv, [h * dk, 2 * h * dk], axis=-1)
        lead = q.shape[:-1]
        q = _l2_normalize(q.reshape(*lead, h, dk))
        k = _l2_normalize(k.reshape(*lead, h, dk))
        return q, k, v.reshape(*lead, h, dv)

    def gates(self, x: Array) -> tuple[Array, Array]:
        """(log_g, beta) from x (..., d): log_g (..., h) or (..., h, k) <= 0 and beta (..., h)
        in (0, 1), both float32."""
        cd, f32 = self.dtype, jnp.float32
        x = x.astype(cd)
        beta = jax.nn.sigmoid(ops.dense(x, self.wb.astype(cd)).astype(f32))
        if self.gate == "head":
            a = ops.dense(x, self.wa.astype(cd))
        else:
            a = ops.dense(ops.dense(x, self.wa_down.astype(cd)), self.wa_up.astype(cd))
        # In float32: log gates are summed along time, so their rounding error compounds.
        a = a.astype(f32) + self.dt_bias.astype(f32)
        A = jnp.exp(self.A_log.astype(f32))
        A = A if self.gate == "head" else A[:, None]
        return -A * jax.nn.softplus(a), beta

    def _output(self, x: Array, o: Array) -> Array:
        """Per-head RMSNorm of o (..., h, v), times w and SiLU(x W_g), then W_o."""
        cd, f32 = self.dtype, jnp.float32
        o = o.astype(f32)
        o = o * jax.lax.rsqrt(jnp.mean(jnp.square(o), -1, keepdims=True) + self.norm_eps)
        g = ops.dense(x.astype(cd), self.wg.astype(cd)).astype(f32)
        o = o * self.norm_scale.astype(f32) * jax.nn.silu(g)
        return ops.dense(o.astype(cd), self.wo.astype(cd), 2)

    def _forward(
        self, x: Array, mask: Array | None, seg: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """x (b, t, d) -> (y (b, t, d), conv inputs (b, t, h (2k + v)), final state).
        ``seg``: the ops' segment ids (None: one document per row)."""
        x = zero_padding(x, mask)
        pre = self._conv_inputs(x)
        # The conv and SiLU in float32: q and k are L2-normalised right after, and rounding to
        # bf16 before that norm made the bf16 layer's relative RMS error 0.6-1.2% (seeds 0-3,
        # tests' sizes) instead of 0.4-0.8%.
        conv = ops.causal_conv(
            pre.astype(jnp.float32), self._conv_kernel(), impl="direct", segment_ids=seg
        )
        q, k, v = self._split(jax.nn.silu(conv))
        log_g, beta = self.gates(x)
        # Padded steps leave the state as it is: no decay (log g = 0), nothing written (beta = 0).
        log_g, beta = zero_padding(log_g, mask), zero_padding(beta, mask)
        kwargs = {} if self.chunk_size is None else dict(chunk_size=self.chunk_size)
        if seg is not None:
            kwargs["segment_ids"] = seg
        o, S = ops.gated_delta_rule(q, k, v, log_g, beta, impl=self.impl, **kwargs)
        return self._output(x, o), pre, S

    # -- the mixer interface -----------------------------------------------------------------

    def __call__(
        self, x: Array, mask: Array | None = None, *, segment_ids: Array | None = None
    ) -> Array:
        """x (b, t, d), mask (b, t) bool or None, segment_ids (b, t) int or None (packed
        documents, 0 = padding) -> (b, t, d) in the compute dtype."""
        mask, seg = packing("GatedDeltaNet", x, mask, segment_ids)
        return self._forward(x, mask, seg)[0]

    def init_state(self, batch: int, max_len: int) -> dict:
        """Decoding state before any token: the last ``conv_width - 1`` conv inputs ``conv``
        (b, conv_width - 1, h (2k + v)) and the delta-rule state ``S`` (b, h, k, v), float32
        zeros. Independent of ``max_len``."""
        del max_len
        h, dk, dv = self.num_heads, self.head_k, self.head_v
        return dict(
            conv=jnp.zeros((batch, self.conv_width - 1, h * (2 * dk + dv)), jnp.float32),
            S=jnp.zeros((batch, h, dk, dv), jnp.float32),
        )

    def prefill(
        self, x: Array, max_len: int, *, segment_ids: Array | None = None
    ) -> tuple[Array, dict]:
        """A prompt x (b, t, d) in parallel -> (y (b, t, d), the state ``step`` continues
        from). With ``segment_ids`` (packed documents, 0 = padding), the state of each row's
        last document (trailing padding skipped)."""
        del max_len
        mask, seg = packing("GatedDeltaNet.prefill", x, None, segment_ids)
        y, pre, S = self._forward(x, mask, seg)
        w = self.conv_width - 1
        if segment_ids is not None:
            return y, dict(conv=segments.last_window(pre, w, segment_ids), S=S)
        # Prompts shorter than the conv window leave zeros in front, as init_state does.
        padded = jnp.pad(pre.astype(jnp.float32), ((0, 0), (w, 0), (0, 0)))
        return y, dict(conv=padded[:, padded.shape[1] - w :], S=S)

    def step(self, x_t: Array, state: dict) -> tuple[Array, dict]:
        """One token: x_t (b, d) -> (y_t (b, d), state), equal to ``__call__`` at that position."""
        conv, window = ops.causal_conv_step(
            state["conv"], self._conv_inputs(x_t).astype(jnp.float32), self._conv_kernel()
        )
        q, k, v = self._split(jax.nn.silu(conv))
        log_g, beta = self.gates(x_t)
        S, o = ops.gated_delta_rule_step(state["S"], q, k, v, log_g, beta)
        return self._output(x_t, o), dict(conv=window, S=S)
