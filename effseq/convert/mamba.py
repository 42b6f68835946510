"""Converters from the official ``mamba_ssm`` modules (github.com/state-spaces/mamba).

PyTorch's ``nn.Linear`` stores its weight as (out, in): effseq's kernels are (in, out). A
PyTorch causal ``Conv1d`` (padding width - 1, then truncated) multiplies the newest input by
its last tap; effseq's kernels hold tap s for the input s steps back, so the taps are
reversed.
"""

from __future__ import annotations

import numpy as np

from effseq.convert.common import StateDict, register_converter

__all__ = ["mamba", "mamba2"]


def _conv(state: StateDict, key: str, channels: int, width: int) -> np.ndarray:
    """A depthwise Conv1d weight (channels, 1, width) as an effseq kernel (channels, width)."""
    return state.take(key, (channels, 1, width))[:, 0, ::-1].copy()


@register_converter("mamba")
def mamba(state: StateDict, layer) -> dict:
    """``mamba_ssm.modules.mamba_simple.Mamba`` -> :class:`effseq.layers.Mamba` (causal).

    Options (effseq field <- official constructor argument): ``d_model`` <- d_model,
    ``state_size`` <- d_state, ``conv_width`` <- d_conv, ``expand`` <- expand, ``dt_rank`` <-
    dt_rank (an int, or "auto" = ceil(d_model / 16) as there). The initialization arguments
    (dt_min, dt_max, dt_init, dt_scale, dt_init_floor) do not change the weights' shapes and
    play no part. Supported as the official defaults set them: ``conv_bias=True`` and
    ``bias=False`` (no in/out-projection biases); ``use_fast_path`` only picks a kernel.

    The official in-projection's output is [x, z]; x_proj's is [dt, B, C].
    """
    if not layer.causal:
        raise ValueError("mixer_params('mamba'): the official Mamba is causal; use causal=True")
    d, e, n, r, w = layer.d_model, layer.d_inner, layer.state_size, layer.rank, layer.conv_width
    in_proj = state.take("in_proj.weight", (2 * e, d))
    x_proj = state.take("x_proj.weight", (r + 2 * n, e))
    return dict(
        in_proj=in_proj.T,
        conv_kernel=_conv(state, "conv1d.weight", e, w),
        conv_bias=state.take("conv1d.bias", (e,)),
        x_proj_dt=x_proj[:r].T,
        x_proj_B=x_proj[r : r + n].T,
        x_proj_C=x_proj[r + n :].T,
        dt_proj=state.take("dt_proj.weight", (e, r)).T,
        dt_bias=state.take("dt_proj.bias", (e,)),
        A_log=state.take("A_log", (e, n)),
        D=state.take("D", (e,)),
        out_proj=state.take("out_proj.weight", (d, e)).T,
    )


@register_converter("mamba2")
def mamba2(state: StateDict, layer) -> dict:
    """``mamba_ssm.modules.mamba2.Mamba2`` -> :class:`effseq.layers.Mamba2` (causal).

    Options (effseq field <- official constructor argument): ``d_model`` <- d_model,
    ``state_size`` <- d_state, ``conv_width`` <- d_conv, ``expand`` <- expand, ``head_dim``
    <- headdim, ``num_groups`` <- ngroups, ``norm_eps`` (the official module fixes 1e-5). Only
    the official defaults of the options that change the architecture are supported:
    ``d_ssm=None``, ``D_has_hdim=False``, ``rmsnorm=True``, ``norm_before_gate=False``,
    ``bias=False``, ``conv_bias=True``, ``dt_limit=(0, inf)`` (a checkpoint made otherwise has
    keys or shapes that fail here, except ``norm_before_gate`` and ``dt_limit``, which leave no
    trace in the weights). ``chunk_size`` and ``use_mem_eff_path`` only pick the kernel.

    The official in-projection's output is [z, x, B, C, dt] and the conv runs over [x, B, C].
    """
    if not layer.causal:
        raise ValueError("mixer_params('mamba2'): the official Mamba2 is causal; use causal=True")
    d, e, h = layer.d_model, layer.d_inner, layer.num_heads
    gn, w = layer.num_groups * layer.state_size, layer.conv_width
    in_proj = state.take("in_proj.weight", (2 * e + 2 * gn + h, d))
    z, x, B, C, dt = np.split(in_proj, np.cumsum([e, e, gn, gn]), axis=0)
    conv = _conv(state, "conv1d.weight", e + 2 * gn, w)
    conv_bias = state.take("conv1d.bias", (e + 2 * gn,))
    cuts = [e, e + gn]
    conv_x, conv_B, conv_C = np.split(conv, cuts, axis=0)
    bias_x, bias_B, bias_C = np.split(conv_bias, cuts)
    return dict(
        in_z=z.T,
        in_x=x.T,
        in_B=B.T,
        in_C=C.T,
        in_dt=dt.T,
        conv_x=conv_x,
        conv_x_bias=bias_x,
        conv_B=conv_B,
        conv_B_bias=bias_B,
        conv_C=conv_C,
        conv_C_bias=bias_C,
        dt_bias=state.take("dt_bias", (h,)),
        A_log=state.take("A_log", (h,)),
        D=state.take("D", (h,)),
        norm_scale=state.take("norm.weight", (e,)),
        out_proj=state.take("out_proj.weight", (d, e)).T,
    )
