"""Converters from fla-org's flash-linear-attention layers (github.com/fla-org/
flash-linear-attention): ``gla`` and ``gdn``.

PyTorch's ``nn.Linear`` stores its weight as (out, in), effseq's kernels are (in, out), split
by head where the layer has heads. fla's ``ShortConvolution`` is a causal depthwise
``Conv1d`` that multiplies the newest input by its last tap; effseq's kernels hold tap s for
the input s steps back, so the taps are reversed.
"""

from __future__ import annotations

import numpy as np

from effseq.convert.common import StateDict, register_converter

__all__ = ["gdn", "gla"]


def _linear(state: StateDict, key: str, d_in: int, *out: int) -> np.ndarray:
    """An nn.Linear weight (prod(out), d_in) as an effseq kernel (d_in, *out)."""
    return state.take(key, (int(np.prod(out)), d_in)).T.reshape(d_in, *out)


def _heads_out(state: StateDict, key: str, h: int, dv: int, d: int) -> np.ndarray:
    """An out-projection weight (d, h dv) as an effseq kernel (h, dv, d)."""
    return state.take(key, (d, h * dv)).T.reshape(h, dv, d)


@register_converter("gla")
def gla(state: StateDict, layer) -> dict:
    """``fla.layers.gla.GatedLinearAttention`` -> :class:`effseq.layers.GLA` with ``norm="rms"``.

    Options (effseq field <- fla constructor argument): ``d_model`` <- hidden_size,
    ``num_heads`` <- num_heads, ``expand_k`` <- expand_k, ``expand_v`` <- expand_v,
    ``gate_low_rank`` <- gate_low_rank_dim, ``gate_logit_normalizer`` <-
    gate_logit_normalizer, ``norm_eps`` <- norm_eps, and ``norm="rms"`` (fla's per-head
    RMSNorm; required). Supported as fla's defaults set them: ``num_kv_heads=None``,
    ``feature_map=None``, ``use_short_conv=False``, ``use_output_gate=True``,
    ``gate_fn="swish"``, ``elementwise_affine=True``, ``clamp_min=None`` (``mode`` and
    ``fuse_norm`` only pick kernels). fla's output gate has no bias: effseq's ``br`` is set to
    zero.
    """
    if layer.norm != "rms":
        raise ValueError(
            "mixer_params('gla'): fla's GatedLinearAttention normalises with RMSNorm; pass "
            f"norm='rms' (got norm={layer.norm!r})"
        )
    d, h, dk, dv, r = (
        layer.d_model,
        layer.num_heads,
        layer.head_k,
        layer.head_v,
        layer.gate_low_rank,
    )
    return dict(
        wq=_linear(state, "q_proj.weight", d, h, dk),
        wk=_linear(state, "k_proj.weight", d, h, dk),
        wv=_linear(state, "v_proj.weight", d, h, dv),
        gate_down=_linear(state, "gk_proj.0.weight", d, r),
        gate_up=_linear(state, "gk_proj.1.weight", r, h, dk),
        gate_bias=state.take("gk_proj.1.bias", (h * dk,)).reshape(h, dk),
        norm_scale=state.take("g_norm_swish_gate.weight", (dv,)),
        wr=_linear(state, "g_proj.weight", d, h, dv),
        br=np.zeros((h, dv), np.float32),
        wo=_heads_out(state, "o_proj.weight", h, dv, d),
    )


@register_converter("gdn")
def gdn(state: StateDict, layer) -> dict:
    """``fla.layers.gated_deltanet.GatedDeltaNet`` -> :class:`effseq.layers.GatedDeltaNet`.

    Options (effseq field <- fla constructor argument): ``d_model`` <- hidden_size,
    ``num_heads`` <- num_heads (with num_v_heads None, i.e. equal), ``head_dim`` <- head_dim,
    ``expand_v`` <- expand_v, ``conv_width`` <- conv_size, ``norm_eps`` <- norm_eps. Supported
    as fla's defaults set them: ``use_gate=True``, ``use_short_conv=True``,
    ``conv_bias=False``, ``allow_neg_eigval=False`` (``mode`` only picks a kernel). Only the
    per-head gate (``gate="head"``) has an official counterpart.
    """
    if layer.gate != "head":
        raise ValueError(
            "mixer_params('gdn'): fla's GatedDeltaNet has one gate per head; gate="
            f"{layer.gate!r} has no official counterpart"
        )
    d, h, dk, dv, w = layer.d_model, layer.num_heads, layer.head_k, layer.head_v, layer.conv_width

    def conv(key, width):
        return state.take(key, (h * width, 1, w))[:, 0, ::-1].reshape(h, width, w).copy()

    return dict(
        wq=_linear(state, "q_proj.weight", d, h, dk),
        wk=_linear(state, "k_proj.weight", d, h, dk),
        wv=_linear(state, "v_proj.weight", d, h, dv),
        conv_q=conv("q_conv1d.weight", dk),
        conv_k=conv("k_conv1d.weight", dk),
        conv_v=conv("v_conv1d.weight", dv),
        wb=_linear(state, "b_proj.weight", d, h),
        wa=_linear(state, "a_proj.weight", d, h),
        dt_bias=state.take("dt_bias", (h,)),
        A_log=state.take("A_log", (h,)),
        wg=_linear(state, "g_proj.weight", d, h, dv),
        norm_scale=state.take("o_norm.weight", (dv,)),
        wo=_heads_out(state, "o_proj.weight", h, dv, d),
    )
