"""Converter from fla-org's Based linear attention (github.com/fla-org/flash-linear-attention,
``fla/layers/based.py``, ``BasedLinearAttention``) to :class:`effseq.layers.based.Based`.

PyTorch's ``nn.Linear`` stores its weight as (out, in): effseq's kernels are (in, out), split
per head as ``(h d)`` along the output (fla's ``rearrange(..., "... (h d) -> ... h d")``).
"""

from __future__ import annotations

import math

from effseq.convert.common import StateDict, register_converter

__all__ = ["based"]


@register_converter("based")
def based(state: StateDict, layer) -> dict:
    """``fla.layers.based.BasedLinearAttention`` -> :class:`effseq.layers.based.Based`.

    Options (effseq field <- official constructor argument): ``d_model`` <- hidden_size,
    ``feature_dim`` <- feature_dim, ``num_heads`` <- num_heads, which must equal
    num_key_value_heads. The official default forward (mode="parallel") runs only when
    hidden_size = num_heads * feature_dim: it splits q and k into heads of width
    hidden_size / num_key_value_heads, and its output projection expects num_heads of them;
    other options raise ValueError here. ``eps`` has no constructor counterpart: the official
    parallel path divides by (sum of weights + 1e-6), a constant inside ``parallel_based``,
    which effseq's default eps = 1e-6 reproduces; the constructor's own eps (1e-12) is read
    only by its ``forward_reference``. ``causal`` must be True (the parallel path is causal
    whatever the constructor's ``causal`` says); ``feature_name`` ("taylor_exp") and
    ``mode`` ("parallel") are reproduced at their defaults only.

    The scale: the official parallel path weights key s for query t by 1 + q.k + (q.k)^2 / 2
    (``parallel_based(q, k, v, scale=1)``), without the 1/sqrt(f) that its TaylorFeatureMap
    (and the paper) put in front of q.k; effseq's layer keeps the paper's 1/sqrt(f) in its
    feature map. The converted query projection is therefore the official one times
    sqrt(feature_dim), so that effseq's q.k / sqrt(f) equals the official q.k exactly.
    """
    d, h, f, p = layer.d_model, layer.num_heads, layer.feature_dim, layer.head_v
    if h * f != d:
        raise ValueError(
            f"mixer_params('based'): the official BasedLinearAttention's default forward needs "
            f"d_model (hidden_size) = num_heads * feature_dim; got d_model = {d}, num_heads = "
            f"{h}, feature_dim = {f}"
        )
    if not layer.causal:
        raise ValueError(
            "mixer_params('based'): the official Based layer is causal; use causal=True"
        )
    wq = state.take("q_proj.weight", (h * f, d)).T.reshape(d, h, f) * math.sqrt(f)
    wk = state.take("k_proj.weight", (h * f, d)).T.reshape(d, h, f)
    wv = state.take("v_proj.weight", (h * p, d)).T.reshape(d, h, p)
    wo = state.take("o_proj.weight", (d, h * p)).T.reshape(h, p, d)
    return dict(wq=wq, wk=wk, wv=wv, wo=wo)
