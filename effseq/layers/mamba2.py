"""The Mamba-2 block: SSD (a selective SSM with one scalar decay per head) between a short
causal convolution and a gated RMSNorm.

Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", Sec. 7 (the Mamba-2 architecture, Figure 6), as the official
``mamba_ssm/modules/mamba2.py`` builds it. With e = expand * d the inner width, h = e / p heads
of dimension p, g groups of B and C with state size n, for x (b, t, d):

    z, x, B, C, dt = x W_z, x W_x, x W_B, x W_C, x W_dt     (e), (e), (g n), (g n), (h)
    x, B, C = SiLU(conv1d([x, B, C]) + conv_bias)            causal, depthwise, width 4
    dt = softplus(dt + dt_bias)                              (b, t, h), float32
    y = SSD(x, dt, A = -exp(A_log), B, C, D)                 effseq.ops.ssd, per head
    y = RMSNorm_group(y * SiLU(z)) * w                       over each group's e / g channels
    out = y W_out                                            (b, t, d)

All projections come from the input in parallel (unlike Mamba-1, whose B, C and dt are
projections of the conv output), and there are no biases on them (the official bias=False).
The gate multiplies before the norm (the official ``norm_before_gate=False``).

Initialization (the official defaults): A = -U(1, 16) per head (A_log = log A); D = 1 per head;
dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1], floored at 1e-4; the conv's
weight and bias uniform in +-width^-1/2 (PyTorch's Conv1d default, which the official code
keeps unless ``conv_init`` is set); the norm's weight 1. Projections use Flax's LeCun-normal
init (the official code keeps PyTorch's Linear default, uniform in +-fan_in^-1/2, which has
the same variance up to a factor 3). A_log, D and dt_bias are in the "no_decay" group (the
official code marks them ``_no_weight_decay``).

Bidirectional variant (``causal=False``, for classification): as the effseq Mamba does, the
projections, the gate and the norm are shared; the backward branch has its own conv, A_log,
dt_bias and D (``bwd_*``), runs over the time-reversed sequence, and the two branches' SSD
outputs are summed before the gated norm.
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

__all__ = ["Mamba2"]


def _a_log_init(low: float, high: float):
    """log A for A uniform in [low, high] (so A = -exp(A_log) is in [-high, -low])."""

    def init(key, shape, dtype=jnp.float32) -> Array:
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

    return init


class Mamba2(Mixer):
    """Mamba-2 block (Dao & Gu 2024, Sec. 7); see the module docstring for the maths.

    Attributes (the official ``Mamba2`` constructor argument in brackets):
      d_model: width d of the input and output [d_model].
      state_size: SSM state size n [d_state, default 128].
      expand: inner width e = expand * d_model [expand].
      head_dim: per-head width p; e must be a multiple of it [headdim].
      num_groups: groups g of B and C; must divide the number of heads [ngroups].
      conv_width: taps of the causal depthwise convolution [d_conv].
      a_init_range: (low, high) of the uniform initial -A [A_init_range].
      dt_min, dt_max, dt_init_floor: initial step size range and floor [same names].
      norm_eps: epsilon of the gated RMSNorm (the official 1e-5).
      causal: False adds a backward branch over the reversed sequence (then no ``step``).
      chunk_size: chunk length of :func:`effseq.ops.ssd` (None: its default) [chunk_size, which
        changes only the official kernel's speed, not its result].
      scan_impl: ``impl`` of :func:`effseq.ops.ssd` (None: the backend default).
      dtype: compute dtype; the SSD state and the norm run in float32.
      param_dtype: storage dtype of the parameters.

    The official options left at their defaults: ``d_ssm=None`` (the SSM spans the whole inner
    width), ``D_has_hdim=False``, ``rmsnorm=True``, ``norm_before_gate=False``, ``bias=False``,
    ``conv_bias=True``, ``dt_limit=(0, inf)``.
    """

    state_size: int = 128
    expand: int = 2
    head_dim: int = 64
    num_groups: int = 1
    conv_width: int = 4
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    norm_eps: float = 1e-5
    chunk_size: int | None = None
    scan_impl: str | None = None

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def num_heads(self) -> int:
        e, p, g = self.d_inner, self.head_dim, self.num_groups
        if p < 1 or e % p:
            raise ValueError(
                f"Mamba2: inner width expand * d_model = {e} must be a multiple of head_dim = {p}"
            )
        if g < 1 or (e // p) % g:
            raise ValueError(
                f"Mamba2: num_groups = {g} must divide the number of heads "
                f"expand * d_model / head_dim = {e // p}"
            )
        return e // p

    def _branch_params(self, prefix: str) -> dict:
        """Conv and SSM parameters of one scan direction, named ``{prefix}{name}``."""
        e, gn, h, w = (
            self.d_inner,
            self.num_groups * self.state_size,
            self.num_heads,
            self.conv_width,
        )
        low, high = self.a_init_range
        if not 0 < low <= high:
            raise ValueError(
                f"Mamba2: a_init_range must satisfy 0 < low <= high, got {(low, high)}"
            )

        def p(name, init, shape, axes, group=None):
            return params.param(
                self, prefix + name, init, shape, axes, self.param_dtype, group=group
            )

        conv = uniform_init(w**-0.5)
        return dict(
            conv_x=p("conv_x", conv, (e, w), (ax.INNER, ax.CONV)),
            conv_x_bias=p("conv_x_bias", conv, (e,), (ax.INNER,)),
            conv_B=p("conv_B", conv, (gn, w), (ax.STATE, ax.CONV)),
            conv_B_bias=p("conv_B_bias", conv, (gn,), (ax.STATE,)),
            conv_C=p("conv_C", conv, (gn, w), (ax.STATE, ax.CONV)),
            conv_C_bias=p("conv_C_bias", conv, (gn,), (ax.STATE,)),
            dt_bias=p(
                "dt_bias",
                dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                (h,),
                (ax.HEADS,),
                group="no_decay",
            ),
            A_log=p("A_log", _a_log_init(low, high), (h,), (ax.HEADS,), group="no_decay"),
            D=p("D", nn.initializers.ones, (h,), (ax.HEADS,), group="no_decay"),
        )

    def setup(self):
        d, e, h = self.d_model, self.d_inner, self.num_heads
        gn = self.num_groups * self.state_size
        lecun = nn.initializers.lecun_normal()

        def p(name, init, shape, axes):
            return params.param(self, name, init, shape, axes, self.param_dtype)

        self.in_z = p("in_z", lecun, (d, e), (ax.EMBED, ax.INNER))
        self.in_x = p("in_x", lecun, (d, e), (ax.EMBED, ax.INNER))
        self.in_B = p("in_B", lecun, (d, gn), (ax.EMBED, ax.STATE))
        self.in_C = p("in_C", lecun, (d, gn), (ax.EMBED, ax.STATE))
        self.in_dt = p("in_dt", lecun, (d, h), (ax.EMBED, ax.HEADS))
        self.norm_scale = p("norm_scale", nn.initializers.ones, (e,), (ax.INNER,))
        self.out_proj = p("out_proj", lecun, (e, d), (ax.INNER, ax.EMBED))
        self.fwd = self._branch_params("")
        if not self.causal:
            self.bwd = self._branch_params("bwd_")

    # -- pieces shared by the parallel and the recurrent forms -------------------------------

    def _conv_kernel(self, p: dict) -> tuple[Array, Array]:
        """The depthwise kernel (e + 2 g n, w) over [x, B, C] and its bias, compute dtype."""
        cd = self.dtype
        k = jnp.concatenate([p["conv_x"], p["conv_B"], p["conv_C"]], 0).astype(cd)
        bias = jnp.concatenate([p["conv_x_bias"], p["conv_B_bias"], p["conv_C_bias"]], 0)
        return k, bias.astype(cd)

    def _projections(self, x: Array) -> tuple[Array, Array, Array]:
        """x (..., d) -> (z (..., e), [x, B, C] (..., e + 2 g n), raw dt (..., h) float32)."""
        cd = self.dtype
        x = x.astype(cd)
        z = ops.dense(x, self.in_z.astype(cd))
        xbc = jnp.concatenate(
            [ops.dense(x, w.astype(cd)) for w in (self.in_x, self.in_B, self.in_C)], -1
        )
        # dt in float32: it sets the decay exp(dt A), whose error compounds along the sequence.
        dt = ops.dense(x, self.in_dt.astype(cd)).astype(jnp.float32)
        return z, xbc, dt

    def _ssm_inputs(self, p: dict, xbc: Array, dt: Array) -> tuple[Array, ...]:
        """From the activated conv output [x, B, C] (..., e + 2 g n) and the raw dt (..., h):
        x (..., h, p), dt (..., h) float32, A (h,), B, C (..., g, n)."""
        e, g, n = self.d_inner, self.num_groups, self.state_size
        x, B, C = jnp.split(xbc, [e, e + g * n], axis=-1)
        lead = x.shape[:-1]
        dt = jax.nn.softplus(dt + p["dt_bias"].astype(jnp.float32))
        A = -jnp.exp(p["A_log"].astype(jnp.float32))
        return (
            x.reshape(*lead, self.num_heads, self.head_dim),
            dt,
            A,
            B.reshape(*lead, g, n),
            C.reshape(*lead, g, n),
        )

    def _output(self, y: Array, z: Array) -> Array:
        """Gated group RMSNorm of y (..., e) by SiLU(z), then the out-projection."""
        cd, g = self.dtype, self.num_groups
        v = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        grouped = v.reshape(*v.shape[:-1], g, -1)
        rstd = jax.lax.rsqrt(jnp.mean(jnp.square(grouped), -1, keepdims=True) + self.norm_eps)
        v = (grouped * rstd).reshape(v.shape) * self.norm_scale.astype(jnp.float32)
        return ops.dense(v.astype(cd), self.out_proj.astype(cd))

    def _branch(
        self, p: dict, xbc: Array, dt: Array, mask: Array | None, seg: Array | None
    ) -> tuple[Array, Array]:
        """One scan direction over the conv input [x, B, C] (b, t, e + 2 g n) and raw dt ->
        (y (b, t, e), final SSD state (b, h, p, n) float32). ``seg``: the ops' segment ids
        (None: one document per row)."""
        k, bias = self._conv_kernel(p)
        xbc = jax.nn.silu(ops.causal_conv(xbc, k, impl="direct", segment_ids=seg) + bias)
        x, dt, A, B, C = self._ssm_inputs(p, xbc, dt)
        # dt = 0 makes a padded step the identity (exp(0 A) = 1, nothing written), so the
        # backward branch starts at the last real token whatever the padding.
        dt = zero_padding(dt, mask)
        kwargs = {} if self.chunk_size is None else dict(chunk_size=self.chunk_size)
        if seg is not None:
            kwargs["segment_ids"] = seg
        y, h = ops.ssd(x, dt, A, B, C, p["D"], impl=self.scan_impl, **kwargs)
        return y.reshape(*y.shape[:2], self.d_inner), h

    def _forward(
        self, x: Array, mask: Array | None = None, seg: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """x (b, t, d) -> (y (b, t, d), conv input (b, t, e + 2 g n), forward SSD state)."""
        z, xbc, dt = self._projections(zero_padding(x, mask))
        y, h = self._branch(self.fwd, xbc, dt, mask, seg)
        if not self.causal:
            # The backward branch runs over the reversed sequence, its documents reversed too.
            flip = None if mask is None else jnp.flip(mask, 1)
            seg_flip = None if seg is None else jnp.flip(seg, 1)
            y_bwd, _ = self._branch(self.bwd, jnp.flip(xbc, 1), jnp.flip(dt, 1), flip, seg_flip)
            y = y + jnp.flip(y_bwd, 1)
        return self._output(y, z), xbc, h

    # -- the mixer interface -----------------------------------------------------------------

    def __call__(
        self, x: Array, mask: Array | None = None, *, segment_ids: Array | None = None
    ) -> Array:
        """x (b, t, d), mask (b, t) bool or None, segment_ids (b, t) int or None (packed
        documents, 0 = padding) -> (b, t, d) in the compute dtype."""
        mask, seg = packing("Mamba2", x, mask, segment_ids)
        return self._forward(x, mask, seg)[0]

    def init_state(self, batch: int, max_len: int) -> dict:
        """Decoding state before any token: the last ``conv_width - 1`` conv inputs ``conv``
        (b, conv_width - 1, e + 2 g n) and the SSD state ``ssm`` (b, h, p, n), float32 zeros.
        Independent of ``max_len``."""
        del max_len
        c = self.d_inner + 2 * self.num_groups * self.state_size
        return dict(
            conv=jnp.zeros((batch, self.conv_width - 1, c), jnp.float32),
            ssm=jnp.zeros((batch, self.num_heads, self.head_dim, self.state_size), jnp.float32),
        )

    def prefill(
        self, x: Array, max_len: int, *, segment_ids: Array | None = None
    ) -> tuple[Array, dict]:
        """A prompt x (b, t, d) in parallel -> (y (b, t, d), the state ``step`` continues
        from). With ``segment_ids`` (packed documents, 0 = padding), the state of each row's
        last document (trailing padding skipped)."""
        del max_len
        self.check_causal("prefill")
        mask, seg = packing("Mamba2.prefill", x, None, segment_ids)
        y, xbc, h = self._forward(x, mask, seg)
        w = self.conv_width - 1
        if segment_ids is not None:
            return y, dict(conv=segments.last_window(xbc, w, segment_ids), ssm=h)
        # Prompts shorter than the conv window leave zeros in front, as init_state does.
        padded = jnp.pad(xbc.astype(jnp.float32), ((0, 0), (w, 0), (0, 0)))
        return y, dict(conv=padded[:, padded.shape[1] - w :], ssm=h)

    def step(self, x_t: Array, state: dict) -> tuple[Array, dict]:
        """One token: x_t (b, d) -> (y_t (b, d), state), equal to ``__call__`` at that position."""
        self.check_causal("step")
        z, xbc, dt = self._projections(x_t)
        k, bias = self._conv_kernel(self.fwd)
        conv, window = ops.causal_conv_step(state["conv"], xbc, k)
        xbc = jax.nn.silu(conv.astype(self.dtype) + bias)
        x, dt, A, B, C = self._ssm_inputs(self.fwd, xbc, dt)
        h, y = ops.ssd_step(state["ssm"], x, dt, A, B, C, self.fwd["D"])
        return self._output(y.reshape(y.shape[0], self.d_inner), z), dict(conv=window, ssm=h)
