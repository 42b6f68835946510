"""The residual block around a mixer: norm, mixer, optional MLP, dropout, residual adds."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops, sharding
from effseq.layers import params
from effseq.models.backbone import Backbone
from effseq.models.registry import make_mixer
from effseq.ops import segments


@functools.cache
def takes_segment_ids(cls: type, method: str = "__call__") -> bool:
    """Whether mixer class ``cls``'s ``method`` accepts a ``segment_ids`` keyword (every
    built-in does; a registered mixer written before packing may not)."""
    params = inspect.signature(getattr(cls, method)).parameters
    return "segment_ids" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def _norm(kind: str, dtype, param_dtype, name: str) -> nn.Module:
    ones = nn.with_logical_partitioning(nn.initializers.ones, (sharding.EMBED,))
    if kind == "rmsnorm":
        return nn.RMSNorm(dtype=dtype, param_dtype=param_dtype, scale_init=ones, name=name)
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, (sharding.EMBED,))
    return nn.LayerNorm(
        dtype=dtype, param_dtype=param_dtype, scale_init=ones, bias_init=zeros, name=name
    )


class MLP(nn.Module):
    """Position-wise MLP: "gelu" (Dense-GELU-Dense), "glu" (SwiGLU, Shazeer 2020), or "sqrelu"
    (squared ReLU, Primer, So et al. 2021 sec. 3)."""

    d_model: int
    kind: str = "glu"
    ratio: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden = self.ratio * self.d_model
        init = nn.initializers.lecun_normal()
        axes_in, axes_out = (sharding.EMBED, sharding.MLP), (sharding.MLP, sharding.EMBED)
        w_in = params.param(self, "w_in", init, (self.d_model, hidden), axes_in, self.param_dtype)
        w_out = params.param(
            self, "w_out", init, (hidden, self.d_model), axes_out, self.param_dtype
        )
        x = x.astype(self.dtype)
        h = ops.dense(x, w_in.astype(self.dtype))
        if self.kind == "glu":
            gate = params.param(
                self, "w_gate", init, (self.d_model, hidden), axes_in, self.param_dtype
            )
            h = jax.nn.silu(ops.dense(x, gate.astype(self.dtype))) * h
        elif self.kind == "sqrelu":
            h = jnp.square(jax.nn.relu(h))
        else:
            h = jax.nn.gelu(h)
        return ops.dense(h, w_out.astype(self.dtype))


class ResidualBlock(nn.Module):
    """x -> x + mixer(norm(x)) [-> x + mlp(norm(x))] (pre-norm), or the post-norm order; the
    settings come from ``backbone`` (:class:`effseq.models.Backbone`), ``mixer`` names this
    block's mixer.

    Padded positions are zeroed (re-masked) before the mixer, so no mixer, bidirectional ones
    included, ever reads a padded token's value. ``segment_ids`` (b, t) marks packed documents
    (:mod:`effseq.ops.segments`; 0 = padding): the short convolution and the mixer then never
    reach across a document start.
    """

    mixer: str
    backbone: Backbone

    def setup(self):
        bb = self.backbone
        dtype, pd = bb.dtype, bb.param_dtype
        self.mix = make_mixer(self.mixer, bb)
        self.norm_mix = _norm(bb.norm, dtype, pd, "norm_mix")
        if bb.mlp != "none":
            self.ffn = MLP(bb.d_model, bb.mlp, bb.mlp_ratio, dtype, pd)
            self.norm_mlp = _norm(bb.norm, dtype, pd, "norm_mlp")
        self.drop = nn.Dropout(bb.dropout)
        if bb.short_conv:
            # Zoology's (Arora et al. 2023) ShortConvolution: a depthwise causal Conv1d with a
            # bias, initialised as torch initialises Conv1d (uniform in +-1/sqrt(taps)).
            bound = bb.short_conv**-0.5

            def uniform(key, shape, dtype):
                return jax.random.uniform(key, shape, dtype, -bound, bound)

            self.conv_kernel = params.param(
                self,
                "short_conv",
                uniform,
                (bb.d_model, bb.short_conv),
                (sharding.EMBED, sharding.CONV),
                pd,
            )
            self.conv_bias = params.param(
                self, "short_conv_bias", uniform, (bb.d_model,), (sharding.EMBED,), pd
            )

    def _residual(self, x, fn, norm, deterministic):
        if self.backbone.prenorm:
            return x + self.drop(fn(norm(x)), deterministic=deterministic)
        return norm(x + self.drop(fn(x), deterministic=deterministic))

    def _mlp(self, x, deterministic):
        if self.backbone.mlp == "none":
            return x
        return self._residual(x, self.ffn, self.norm_mlp, deterministic)

    def _conv(self, h, segment_ids=None):
        """The short causal convolution in front of the mixer (identity when off); with
        ``segment_ids`` no tap reaches across a document start."""
        if not self.backbone.short_conv:
            return h
        dtype = self.backbone.dtype
        kwargs = {}
        if segment_ids is not None:
            kwargs["segment_ids"] = segments.fill_padding(segment_ids)
        y = ops.causal_conv(h, self.conv_kernel.astype(dtype), impl="direct", **kwargs)
        return (y + self.conv_bias.astype(dtype)).astype(dtype)

    def _mixer_kwargs(self, segment_ids, method: str = "__call__") -> dict:
        if segment_ids is None:
            return {}
        if not takes_segment_ids(type(self.mix), method):
            raise ValueError(
                f"mixer {self.mixer!r} ({type(self.mix).__name__}.{method}) takes no "
                "segment_ids, so it cannot run packed sequences; add a keyword "
                "segment_ids=None to its __call__ and prefill (see effseq.layers.mixer)"
            )
        return {"segment_ids": segment_ids}

    def __call__(self, x, mask=None, deterministic: bool = True, segment_ids=None):
        """x (b, t, d); mask (b, t) bool, True = real token, or None; segment_ids (b, t)
        int or None (packed documents, 0 = padding, which then needs no mask)."""
        if segment_ids is not None:
            real = segments.padding_mask(segment_ids)
            mask = real if mask is None else mask & real
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0)
        kwargs = self._mixer_kwargs(segment_ids)
        # The mixer masks its own (normalised) input: a norm's bias would refill zeroed padding.
        # A causal convolution of right-padded input never lets padding reach a real token.
        x = self._residual(
            x,
            lambda h: self.mix(self._conv(h, segment_ids), mask, **kwargs),
            self.norm_mix,
            deterministic,
        )
        return self._mlp(x, deterministic).astype(self.backbone.dtype)

    def init_state(self, batch: int, max_len: int):
        """The mixer's decoding state; with a short convolution, (its last inputs, that)."""
        state = self.mix.init_state(batch, max_len)
        bb = self.backbone
        if not bb.short_conv:
            return state
        window = jnp.zeros((batch, bb.short_conv - 1, bb.d_model), jnp.float32)
        return (window, state)

    def _with_state(self, x, mix, deterministic=True):
        """The block around a mixer call ``mix(h) -> (y, state)``; returns (out, state)."""
        out = {}

        def mixed(h):
            y, out["state"] = mix(h)
            return y

        x = self._residual(x, mixed, self.norm_mix, deterministic)
        return self._mlp(x, deterministic).astype(self.backbone.dtype), out["state"]

    def step(self, x_t, state):
        """One token x_t (b, d) -> (y_t (b, d), state)."""
        if not self.backbone.short_conv:
            return self._with_state(x_t, lambda h: self.mix.step(h, state))
        window, mix_state = state
        dtype = self.backbone.dtype

        def mix(h):
            c, new_window = ops.causal_conv_step(window, h, self.conv_kernel.astype(dtype))
            c = (c + self.conv_bias.astype(dtype)).astype(dtype)
            y, new_state = self.mix.step(c, mix_state)
            return y, (new_window, new_state)

        return self._with_state(x_t, mix)

    def prefill(self, x, max_len: int, segment_ids=None):
        """A prompt x (b, t, d) in parallel -> (y (b, t, d), the mixer's state after it); with
        ``segment_ids``, the state of each row's last document (trailing padding skipped)."""
        kwargs = self._mixer_kwargs(segment_ids, "prefill")
        if segment_ids is not None:
            x = jnp.where(segments.padding_mask(segment_ids)[..., None], x, 0)
        if not self.backbone.short_conv:
            return self._with_state(x, lambda h: self.mix.prefill(h, max_len, **kwargs))

        def mix(h):
            y, state = self.mix.prefill(self._conv(h, segment_ids), max_len, **kwargs)
            # Prompts shorter than the window leave zeros in front, as init_state does.
            window = segments.last_window(h, self.backbone.short_conv - 1, segment_ids)
            return y, (window, state)

        return self._with_state(x, mix)
