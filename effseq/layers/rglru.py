"""The recurrent block of Hawk and Griffin: a short convolution and the RG-LRU, gated by GeLU.

De, Smith, Fernando et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention
for Efficient Language Models", Sec. 2.4 (the RG-LRU) and Figure 2 (the recurrent block), as
the official code computes it (google-deepmind/recurrentgemma, ``torch/modules.py``
``RecurrentBlock`` and ``torch/layers.py`` ``RGLRU``, ``Conv1D``, ``BlockDiagonalLinear``;
``jax/`` is its twin). With e the RG-LRU width (``lru_width``), h blocks of width e / h and
c = 8, for x (b, t, d):

    y = GeLU_tanh(x W_y + b_y)                                  (b, t, e)
    u = conv1d(x W_x + b_x) + b_conv                            causal, depthwise, width 4
    i_t = sigmoid(BlockDiag_i(u_t)),  r_t = sigmoid(BlockDiag_a(u_t))   input and a gates
    log a_t = -c * r_t * softplus(a_param)                      a_t in (0, 1)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)          for t > 0
    h_0 = i_0 * u_0                                             the first token (see below)
    out = (h * y) W_out + b_out                                 (b, t, d)

BlockDiag(u) splits u into h blocks and applies to each its own (e/h, e/h) matrix and bias.

The first token: the official code resets the recurrence where ``segment_pos == 0``, dropping
the previous state and leaving the input unscaled by sqrt(1 - a^2). A sequence here always
starts at position 0, so h_0 = i_0 * u_0; ``step`` applies the same rule to the first token
after ``init_state`` (the state counts tokens). Packed rows (``segment_ids``) apply it at every
document start, where the official code's ``segment_pos`` is 0 too.

Numerics: the gates, a and the recurrence are float32 whatever the compute dtype; 1 - a^2 is
-expm1(2 log a) (no cancellation as a -> 1), and its square root has its gradient bounded at
1000 as in the official code (``SqrtBoundDerivative``), which keeps bfloat16 training finite.

Initialization (the official ``reset_parameters``): W_x and W_y normal with variance 1 / d,
W_out with variance ``out_init_scale / e``, the block-diagonal matrices with variance
1 / (e / h), the conv taps with variance 0.01 / conv_width; every bias zero. ``a_param`` is
softplus^-1(-log a0) with a0^2 uniform in [0.9^2, 0.999^2] (uniform on the ring's area;
``rnn_param_init``), so the base decay a0 = exp(-softplus(a_param)) lies in [0.9, 0.999] and
a_t = a0^(c r_t).

Optimizer groups: the official fine-tuning recipe (recurrentgemma's ``colabs/
fine_tuning_tutorial_jax.ipynb``, ``griffin_weight_decay_mask``) exempts every parameter of the
RG-LRU (``a_param`` and both gates' matrices and biases) and every bias from weight decay, so
those are "no_decay" here; the projections and the conv taps are decayed (the default for
matrices) and the other biases are vectors (never decayed by default).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops
from effseq import sharding as ax
from effseq.layers import params
from effseq.layers.masking import packing, zero_padding
from effseq.layers.mixer import Mixer
from effseq.ops import segments
from effseq.typing import Array

__all__ = ["RGLRU", "a_param_init", "sqrt_bounded_grad"]

# log a_t = -C * r_t * softplus(a_param) (the paper's c).
C = 8.0
# The bound on d sqrt(x) / dx of the input normalization (the official _MAX_SQRT_GRADIENT).
MAX_SQRT_GRADIENT = 1000.0


@jax.custom_vjp
def sqrt_bounded_grad(x: Array) -> Array:
    """sqrt(x), whose gradient 1 / (2 sqrt(x)) is capped at :data:`MAX_SQRT_GRADIENT` (x is
    floored at 1 / (4 * 1000^2) in the backward pass only)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
    floor = 1.0 / (4.0 * MAX_SQRT_GRADIENT**2)
    return (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, floor)),)


sqrt_bounded_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def a_param_init(min_rad: float = 0.9, max_rad: float = 0.999):
    """The RG-LRU's ``a_param`` (the official ``rnn_param_init``): a0^2 uniform in
    [min_rad^2, max_rad^2] (uniform on the ring's area), stored as softplus^-1(-log a0), so
    exp(-softplus(a_param)) = a0 in [min_rad, max_rad]."""

    def init(key, shape, dtype=jnp.float32) -> Array:
        a0_sq = jax.random.uniform(key, shape, jnp.float32, min_rad**2, max_rad**2)
        y = -0.5 * jnp.log(a0_sq)  # -log a0 > 0
        # softplus^-1(y) = log(exp(y) - 1), through expm1 for small y.
        return jnp.log(jnp.expm1(y)).astype(dtype)

    return init


class RGLRU(Mixer):
    """Griffin's recurrent block with the RG-LRU (De et al. 2024); causal only. See the module
    docstring for the maths.

    Attributes (the official ``RecurrentBlock`` constructor argument in brackets):
      d_model: width d of the input and output [``width``].
      num_heads: number of diagonal blocks h of the input and a gates; must divide the RG-LRU
        width [``num_heads``, which has no default there].
      lru_width: RG-LRU width e (None: d_model) [``lru_width``, None: ``width``].
      conv_width: taps of the causal depthwise convolution [``conv1d_temporal_width``, 4].
      out_init_scale: variance scale of W_out's initialization, variance out_init_scale / e
        [``final_w_init_variance_scale``, 1.0]; initialization only.
      dtype: compute dtype of the projections and the conv; gates and recurrence are float32.
      param_dtype: storage dtype of the parameters.
    """

    num_heads: int = 4
    lru_width: int | None = None
    conv_width: int = 4
    out_init_scale: float = 1.0

    @property
    def width(self) -> int:
        """The RG-LRU width e."""
        return self.d_model if self.lru_width is None else self.lru_width

    @property
    def block_width(self) -> int:
        e, h = self.width, self.num_heads
        if not isinstance(h, int) or h < 1 or e % h:
            raise ValueError(
                f"RGLRU: num_heads = {h!r} must be a positive divisor of the RG-LRU width "
                f"(lru_width or d_model) = {e}"
            )
        return e // h

    def setup(self):
        self.require_causal()
        if self.lru_width is not None and (
            not isinstance(self.lru_width, int) or self.lru_width < 1
        ):
            raise ValueError(
                f"RGLRU: lru_width must be None or an int >= 1, got {self.lru_width!r}"
            )
        if not isinstance(self.conv_width, int) or self.conv_width < 1:
            raise ValueError(f"RGLRU: conv_width must be an int >= 1, got {self.conv_width!r}")
        d, e, h, w = self.d_model, self.width, self.num_heads, self.conv_width
        bw = self.block_width
        normal = nn.initializers.normal
        zeros = nn.initializers.zeros

        def p(name, init, shape, axes, group=None):
            return params.param(self, name, init, shape, axes, self.param_dtype, group=group)

        self.linear_x = p("linear_x", normal(math.sqrt(1.0 / d)), (d, e), (ax.EMBED, ax.INNER))
        self.linear_x_bias = p("linear_x_bias", zeros, (e,), (ax.INNER,))
        self.linear_y = p("linear_y", normal(math.sqrt(1.0 / d)), (d, e), (ax.EMBED, ax.INNER))
        self.linear_y_bias = p("linear_y_bias", zeros, (e,), (ax.INNER,))
        self.linear_out = p(
            "linear_out", normal(math.sqrt(self.out_init_scale / e)), (e, d), (ax.INNER, ax.EMBED)
        )
        self.linear_out_bias = p("linear_out_bias", zeros, (d,), (ax.EMBED,))
        # Tap s multiplies the input s steps back (effseq.ops.causal_conv's layout).
        self.conv_kernel = p(
            "conv_kernel", normal(math.sqrt(0.01 / w)), (e, w), (ax.INNER, ax.CONV)
        )
        self.conv_bias = p("conv_bias", zeros, (e,), (ax.INNER,))
        blocks = (ax.HEADS, ax.HEAD_DIM, ax.HEAD_DIM)
        gate_init = normal(math.sqrt(1.0 / bw))
        no_decay = "no_decay"
        self.input_gate = p("input_gate", gate_init, (h, bw, bw), blocks, no_decay)
        self.input_gate_bias = p("input_gate_bias", zeros, (h, bw), blocks[:2], no_decay)
        self.a_gate = p("a_gate", gate_init, (h, bw, bw), blocks, no_decay)
        self.a_gate_bias = p("a_gate_bias", zeros, (h, bw), blocks[:2], no_decay)
        self.a_param = p("a_param", a_param_init(), (e,), (ax.INNER,), no_decay)

    def _block_diag(self, u: Array, w: Array, b: Array) -> Array:
        """u (..., e) in compute dtype -> (..., e) float32: each block times its matrix, plus
        its bias."""
        cd = self.dtype
        h, bw = self.num_heads, self.block_width
        ub = u.reshape(*u.shape[:-1], h, bw)
        out = jnp.einsum("...hi,hij->...hj", ub, w.astype(cd)).astype(jnp.float32)
        out = out + b.astype(jnp.float32)
        return out.reshape(*u.shape)

    def _rg_lru_inputs(self, u: Array, first: Array) -> tuple[Array, Array]:
        """The recurrence h_t = a_t h_{t-1} + b_t from the conv output u (..., e): (a, b)
        float32. ``first`` (broadcasting to u's leading dims) marks first tokens: a = 0 there
        and the input is not scaled."""
        gate_x = jax.nn.sigmoid(self._block_diag(u, self.input_gate, self.input_gate_bias))
        gate_a = jax.nn.sigmoid(self._block_diag(u, self.a_gate, self.a_gate_bias))
        log_a = -C * gate_a * jax.nn.softplus(self.a_param.astype(jnp.float32))
        a = jnp.exp(log_a)
        # 1 - a^2 = -expm1(2 log a): exact as a -> 1, where 1 - exp(.) cancels.
        scale = sqrt_bounded_grad(-jnp.expm1(2.0 * log_a))
        first = first[..., None]
        scale = jnp.where(first, 1.0, scale)
        a = jnp.where(first, 0.0, a)
        return a, u.astype(jnp.float32) * gate_x * scale

    def _branches(self, x: Array) -> tuple[Array, Array]:
        """x (..., d) -> (conv input x W_x + b_x, the GeLU gate y), both (..., e) compute dtype."""
        cd = self.dtype
        x = x.astype(cd)
        x_in = ops.dense(x, self.linear_x.astype(cd)) + self.linear_x_bias.astype(cd)
        y = ops.dense(x, self.linear_y.astype(cd)) + self.linear_y_bias.astype(cd)
        return x_in, jax.nn.gelu(y, approximate=True)

    def _output(self, h: Array, y: Array) -> Array:
        cd = self.dtype
        out = ops.dense(h.astype(cd) * y, self.linear_out.astype(cd))
        return out + self.linear_out_bias.astype(cd)

    def _forward(
        self, x: Array, mask: Array | None, seg: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """x (b, t, d) -> (out (b, t, d), conv input (b, t, e), final RG-LRU state (b, e)).
        ``seg``: the ops' segment ids (None: one document per row)."""
        cd = self.dtype
        x_in, y = self._branches(zero_padding(x, mask))
        u = ops.causal_conv(x_in, self.conv_kernel.astype(cd), impl="direct", segment_ids=seg)
        u = u + self.conv_bias.astype(cd)
        first = (jnp.arange(x.shape[1]) == 0)[None]
        if seg is not None:
            # The first-token rule at every document start (a = 0 there already resets h).
            first = first | segments.document_starts(seg)
        a, b = self._rg_lru_inputs(u, first)
        # Padded steps leave the state as it is: a = 1 and nothing added.
        if mask is not None:
            a = jnp.where(mask[..., None], a, 1.0)
            b = zero_padding(b, mask)
        packed = {} if seg is None else dict(segment_ids=seg)
        h, h_last = ops.linear_scan(a, b, **packed)
        return self._output(h, y), x_in, h_last

    def __call__(
        self, x: Array, mask: Array | None = None, *, segment_ids: Array | None = None
    ) -> Array:
        """x (b, t, d), mask (b, t) bool or None, segment_ids (b, t) int or None (packed
        documents, 0 = padding) -> (b, t, d) in the compute dtype."""
        mask, seg = packing("RGLRU", x, mask, segment_ids)
        return self._forward(x, mask, seg)[0]

    def init_state(self, batch: int, max_len: int) -> dict:
        """Decoding state before any token, whatever ``max_len``: the last ``conv_width - 1``
        conv inputs ``conv`` (b, conv_width - 1, e) and the RG-LRU state ``rnn`` (b, e), float32
        zeros, and ``index`` () int32, the number of tokens seen (0: the next is the first)."""
        del max_len
        e = self.width
        return dict(
            conv=jnp.zeros((batch, self.conv_width - 1, e), jnp.float32),
            rnn=jnp.zeros((batch, e), jnp.float32),
            index=jnp.zeros((), jnp.int32),
        )

    def prefill(
        self, x: Array, max_len: int, *, segment_ids: Array | None = None
    ) -> tuple[Array, dict]:
        """A prompt x (b, t, d) in parallel -> (y (b, t, d), the state ``step`` continues
        from, as if the t tokens had been stepped one by one).

        With ``segment_ids`` (packed documents, 0 = padding), the state of each row's last
        document as if it alone had been stepped (trailing padding skipped); ``index`` is then
        per row, (b,) int32: the number of that document's tokens (0 for a row of padding)."""
        self.check_causal("prefill")
        del max_len
        mask, seg = packing("RGLRU.prefill", x, None, segment_ids)
        y, x_in, h = self._forward(x, mask, seg)
        w = self.conv_width - 1
        if segment_ids is not None:
            t = x.shape[1]
            last = jnp.max(jnp.where(mask, jnp.arange(t, dtype=jnp.int32), -1), axis=1)
            pos = segments.positions(seg)
            pos_last = jnp.take_along_axis(pos, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
            index = jnp.where(last >= 0, pos_last + 1, 0).astype(jnp.int32)
            window = segments.last_window(x_in, w, segment_ids)
            return y, dict(conv=window, rnn=h, index=index)
        # Prompts shorter than the conv window leave zeros in front, as init_state does.
        padded = jnp.pad(x_in.astype(jnp.float32), ((0, 0), (w, 0), (0, 0)))
        window = padded[:, padded.shape[1] - w :]
        return y, dict(conv=window, rnn=h, index=jnp.asarray(x.shape[1], jnp.int32))

    def step(self, x_t: Array, state: dict) -> tuple[Array, dict]:
        """One token: x_t (b, d) -> (y_t (b, d), state), equal to ``__call__`` at that position."""
        self.check_causal("step")
        cd = self.dtype
        x_in, y = self._branches(x_t)
        u, window = ops.causal_conv_step(state["conv"], x_in, self.conv_kernel.astype(cd))
        u = u.astype(cd) + self.conv_bias.astype(cd)
        a, b = self._rg_lru_inputs(u, state["index"] == 0)
        h = a * state["rnn"] + b
        return self._output(h, y), dict(conv=window, rnn=h, index=state["index"] + 1)
