"""The converter from recurrentgemma's PyTorch ``RecurrentBlock`` (Hawk and Griffin's recurrent
block, github.com/google-deepmind/recurrentgemma, ``recurrentgemma/torch/modules.py``) to the
effseq ``rglru`` mixer (:class:`effseq.layers.rglru.RGLRU`)."""

from __future__ import annotations

import numpy as np

from effseq.convert.common import StateDict, register_converter

__all__ = ["rglru"]


@register_converter("rglru")
def rglru(state: StateDict, layer) -> dict:
    """The effseq ``rglru`` parameters from an official ``RecurrentBlock.state_dict()``.

    The effseq fields and the official constructor arguments they stand for:

    ========================  =======================================================
    effseq ``RGLRU``           official ``RecurrentBlock``
    ========================  =======================================================
    ``d_model``                ``width``
    ``num_heads``              ``num_heads``
    ``lru_width`` (None)       ``lru_width`` (None: ``width``)
    ``conv_width`` (4)         ``conv1d_temporal_width`` (4)
    ``out_init_scale`` (1.0)   ``final_w_init_variance_scale`` (initialization only)
    ========================  =======================================================

    The official forward must be called with ``segment_pos`` counting from 0 (a sequence
    starting at its first token), which is what the effseq layer computes.

    Layouts: ``nn.Linear`` weights are (out, in) and become (in, out); the conv's ``w``
    (conv_width, e) has its last row on the current input and becomes effseq's (e, conv_width)
    with tap s on the input s steps back; the block-diagonal gates' ``w`` (h, e/h, e/h) and
    ``b`` (h, e/h) keep their shapes; ``a_param`` (e,) is the same parameter.
    """
    d, e, h, w = layer.d_model, layer.width, layer.num_heads, layer.conv_width
    bw = layer.block_width

    def linear(name, n_in, n_out):
        return state.take(f"{name}.weight", (n_out, n_in)).T, state.take(f"{name}.bias", (n_out,))

    out: dict = {}
    for name, n_in, n_out in (("linear_x", d, e), ("linear_y", d, e), ("linear_out", e, d)):
        out[name], out[f"{name}_bias"] = linear(name, n_in, n_out)
    out["conv_kernel"] = np.flip(state.take("conv_1d.w", (w, e)), 0).T
    out["conv_bias"] = state.take("conv_1d.b", (e,))
    for gate in ("input_gate", "a_gate"):
        out[gate] = state.take(f"rg_lru.{gate}.w", (h, bw, bw))
        out[f"{gate}_bias"] = state.take(f"rg_lru.{gate}.b", (h, bw))
    out["a_param"] = state.take("rg_lru.a_param", (e,))
    return out
