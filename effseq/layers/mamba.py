"""The Mamba block: a selective SSM (S6) between a short causal convolution and a SiLU gate.

Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", Sec. 3.4
(Figure 3, the Mamba block) and Sec. 3.6 / Appendix (parameterization and initialization). With
e the inner width (``expand * d``), n the state size and r the rank of the dt projection, for
x (b, t, d):

    [x, z] = x W_in                                   (b, t, e) each
    x = SiLU(conv1d(x) + conv_bias)                    causal, depthwise, width 4
    [dt, B, C] = x W_x                                 (b, t, r), (b, t, n), (b, t, n)
    delta = softplus(dt W_dt + dt_bias)                (b, t, e)
    y = selective_scan(x, delta, A = -exp(A_log), B, C, D)
    out = (y * SiLU(z)) W_out                          (b, t, d)

Initialization (the paper's Sec. 3.6 and the reference implementation): A_log = log(1..n) per
channel (S4D-Real, so A = -(1..n)); D = 1; dt_bias = softplus^-1(dt) with dt log-uniform in
[dt_min, dt_max] and floored at dt_init_floor, so delta starts in that range; W_dt uniform in
+-r^-1/2. Projections use Flax's default LeCun-normal init; the conv's weight and bias are
uniform in +-width^-1/2 (PyTorch's Conv1d default, which the reference uses).

Bidirectional variant (for classification, as in Vision Mamba, Zhu et al. 2024): W_in, W_out
and the gate z are shared; the backward branch has its own conv, x/dt projections, A_log, dt_bias
and D (``bwd_*`` parameters), runs over the time-reversed x, and the two branches' scan
outputs are summed before the gate and out-projection.
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

__all__ = ["Mamba", "dt_bias_init", "s4d_real_a_log_init", "uniform_init"]


def s4d_real_a_log_init(key, shape, dtype=jnp.float32) -> Array:
    """S4D-Real (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State
    Space Models", Sec. 4): A_log[e, i] = log(i + 1) for shape (e, n), so A = -exp(A_log) = -(i+1).
    """
    del key
    e, n = shape
    return jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32)), (e, n)).astype(dtype)


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float):
    """Mamba's dt bias (Gu & Dao 2023, Sec. 3.6 and the reference code): softplus^-1(dt) for dt
    log-uniform in [dt_min, dt_max], floored at ``dt_init_floor``; so softplus(bias) = dt at init.
    """

    def init(key, shape, dtype=jnp.float32) -> Array:
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, dt_init_floor)
        # softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), stable for small dt.
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def uniform_init(scale: float):
    """Uniform in [-scale, scale]."""

    def init(key, shape, dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


class Mamba(Mixer):
    """Mamba block (Gu & Dao 2023, Sec. 3.4); see the module docstring for the maths.

    Attributes:
      d_model: width d of the input and output.
      state_size: SSM state size n per inner channel.
      expand: inner width e = expand * d_model.
      conv_width: taps of the causal depthwise convolution.
      dt_rank: rank r of the dt projection; "auto" is ceil(d_model / 16).
      dt_min, dt_max: range of the log-uniform initial step size.
      dt_init_floor: lower clamp of the initial step size.
      causal: False adds a backward branch over the reversed sequence (then no ``step``).
      scan_impl: ``impl`` of :func:`effseq.ops.selective_scan` (None: the backend default).
      chunk_size: chunk length of the chunked selective scan (None: sized by
        :func:`effseq.ops.selective_scan.default_chunk_size`).
      dtype: compute dtype; the scan itself accumulates in float32.
      param_dtype: storage dtype of the parameters.
    """

    state_size: int = 16
    expand: int = 2
    conv_width: int = 4
    dt_rank: int | str = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    scan_impl: str | None = None
    chunk_size: int | None = None

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        if self.dt_rank == "auto":
            return math.ceil(self.d_model / 16)
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(f"Mamba: dt_rank must be 'auto' or an int >= 1, got {self.dt_rank!r}")
        return self.dt_rank

    def _branch_params(self, prefix: str) -> dict:
        """Conv and SSM parameters of one scan direction, named ``{prefix}{name}``."""
        e, n, r, w = self.d_inner, self.state_size, self.rank, self.conv_width
        pd = self.param_dtype

        lecun = nn.initializers.lecun_normal()

        def p(name, init, shape, axes, group=None):
            return params.param(self, prefix + name, init, shape, axes, pd, group=group)

        return dict(
            conv_kernel=p("conv_kernel", uniform_init(w**-0.5), (e, w), (ax.INNER, ax.CONV)),
            conv_bias=p("conv_bias", uniform_init(w**-0.5), (e,), (ax.INNER,)),
            # W_x split by output (dt, B, C) so each part gets its own logical axis name.
            x_proj_dt=p("x_proj_dt", lecun, (e, r), (ax.INNER, ax.LOW_RANK)),
            x_proj_B=p("x_proj_B", lecun, (e, n), (ax.INNER, ax.STATE)),
            x_proj_C=p("x_proj_C", lecun, (e, n), (ax.INNER, ax.STATE)),
            dt_proj=p("dt_proj", uniform_init(r**-0.5), (r, e), (ax.LOW_RANK, ax.INNER)),
            dt_bias=p(
                "dt_bias",
                dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                (e,),
                (ax.INNER,),
                group="no_decay",
            ),
            # The Mamba code marks A_log and D _no_weight_decay (Mamba-2 also dt_bias), with no
            # learning rate of their own.
            A_log=p("A_log", s4d_real_a_log_init, (e, n), (ax.INNER, ax.STATE), group="no_decay"),
            D=p("D", nn.initializers.ones, (e,), (ax.INNER,), group="no_decay"),
        )

    def setup(self):
        d, e = self.d_model, self.d_inner
        lecun = nn.initializers.lecun_normal()
        self.in_proj = params.param(
            self, "in_proj", lecun, (d, 2 * e), (ax.EMBED, ax.INNER), self.param_dtype
        )
        self.out_proj = params.param(
            self, "out_proj", lecun, (e, d), (ax.INNER, ax.EMBED), self.param_dtype
        )
        self.fwd = self._branch_params("")
        if not self.causal:
            self.bwd = self._branch_params("bwd_")

    def _ssm_inputs(self, p: dict, x: Array) -> tuple[Array, Array, Array, Array]:
        """From the activated conv output x (b, t, e): delta (b, t, e) float32, A (e, n), B, C
        (b, t, n)."""
        cd = self.dtype
        dt = ops.dense(x, p["x_proj_dt"].astype(cd))
        B = ops.dense(x, p["x_proj_B"].astype(cd))
        C = ops.dense(x, p["x_proj_C"].astype(cd))
        # The softplus and bias add in float32, as the reference kernel does (delta_softplus):
        # delta sets the decay exp(delta * A), whose error compounds along the sequence.
        delta = jax.nn.softplus(
            ops.dense(dt, p["dt_proj"].astype(cd)).astype(jnp.float32)
            + p["dt_bias"].astype(jnp.float32)
        )
        A = -jnp.exp(p["A_log"].astype(jnp.float32))
        return delta, A, B, C

    def _branch(
        self, p: dict, x: Array, mask: Array | None, seg: Array | None
    ) -> tuple[Array, Array]:
        """One scan direction over x (b, t, e) in compute dtype -> (y (b, t, e), final SSM
        state (b, e, n) float32). ``seg``: the ops' segment ids (None: one document)."""
        cd = self.dtype
        x = ops.causal_conv(x, p["conv_kernel"].astype(cd), impl="direct", segment_ids=seg)
        x = jax.nn.silu(x + p["conv_bias"].astype(cd))
        delta, A, B, C = self._ssm_inputs(p, x)
        # delta = 0 makes a padded step the identity (exp(0 A) = 1, nothing added), so the
        # backward branch starts at the last real token whatever the padding.
        delta = zero_padding(delta, mask)
        packed = {} if seg is None else dict(segment_ids=seg)
        return ops.selective_scan(
            x, delta, A, B, C, p["D"], impl=self.scan_impl, chunk_size=self.chunk_size, **packed
        )

    def _forward(
        self, x: Array, mask: Array | None = None, seg: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """x (b, t, d) -> (y (b, t, d), conv input x_in (b, t, e), forward SSM state)."""
        cd = self.dtype
        xz = ops.dense(zero_padding(x.astype(cd), mask), self.in_proj.astype(cd))
        x_in, z = jnp.split(xz, 2, axis=-1)
        y, h = self._branch(self.fwd, x_in, mask, seg)
        if not self.causal:
            # The backward branch runs over the reversed sequence, its documents reversed too.
            flip = None if mask is None else jnp.flip(mask, 1)
            seg_flip = None if seg is None else jnp.flip(seg, 1)
            y_bwd = self._branch(self.bwd, jnp.flip(x_in, 1), flip, seg_flip)[0]
            y = y + jnp.flip(y_bwd, 1)
        return ops.dense(y * jax.nn.silu(z), self.out_proj.astype(cd)), x_in, h

    def __call__(
        self, x: Array, mask: Array | None = None, *, segment_ids: Array | None = None
    ) -> Array:
        """x (b, t, d), mask (b, t) bool or None, segment_ids (b, t) int or None (packed
        documents, 0 = padding) -> (b, t, d) in the compute dtype."""
        mask, seg = packing("Mamba", x, mask, segment_ids)
        return self._forward(x, mask, seg)[0]

    def prefill(
        self, x: Array, max_len: int, *, segment_ids: Array | None = None
    ) -> tuple[Array, dict]:
        """A prompt x (b, t, d) in parallel -> (y (b, t, d), the state ``step`` continues
        from: the last conv_width - 1 conv inputs and the final SSM state). With
        ``segment_ids``, the state of each row's last document (trailing padding skipped)."""
        self.check_causal("prefill")
        mask, seg = packing("Mamba.prefill", x, mask=None, segment_ids=segment_ids)
        y, x_in, h = self._forward(x, mask, seg)
        w = self.conv_width - 1
        if segment_ids is not None:
            return y, dict(conv=segments.last_window(x_in, w, segment_ids), ssm=h)
        # Prompts shorter than the conv window leave zeros in front, as init_state does.
        padded = jnp.pad(x_in.astype(jnp.float32), ((0, 0), (w, 0), (0, 0)))
        window = padded[:, padded.shape[1] - w :]
        return y, dict(conv=window, ssm=h)

    def init_state(self, batch: int, max_len: int) -> dict:
        """Decoding state before any token: the last ``conv_width - 1`` conv inputs
        ``conv`` (b, conv_width - 1, e) and the SSM state ``ssm`` (b, e, n), both float32 and
        zero. Independent of ``max_len`` (constant cost per token)."""
        del max_len
        e = self.d_inner
        return dict(
            conv=jnp.zeros((batch, self.conv_width - 1, e), jnp.float32),
            ssm=jnp.zeros((batch, e, self.state_size), jnp.float32),
        )

    def step(self, x_t: Array, state: dict) -> tuple[Array, dict]:
        """One token: x_t (b, d) -> (y_t (b, d), state), equal to ``__call__`` at that position."""
        self.check_causal("step")
        cd = self.dtype
        p = self.fwd
        xz = x_t.astype(cd) @ self.in_proj.astype(cd)
        x_in, z = jnp.split(xz, 2, axis=-1)
        conv, window = ops.causal_conv_step(state["conv"], x_in, p["conv_kernel"].astype(cd))
        x_c = jax.nn.silu(conv.astype(cd) + p["conv_bias"].astype(cd))
        delta, A, B, C = self._ssm_inputs(p, x_c[:, None])
        h, y = ops.selective_scan_step(state["ssm"], x_c, delta[:, 0], A, B[:, 0], C[:, 0], p["D"])
        y_t = (y * jax.nn.silu(z)) @ self.out_proj.astype(cd)
        return y_t, dict(conv=window, ssm=h)
