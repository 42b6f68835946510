"""Structured global convolution (SGConv) kernels.

Li, Cai, Zhang, Chen & Dey 2022, "What Makes Convolutional Models Great on Long Sequence
Modeling?", sec. 3.1: a long kernel is the concatenation of s short sub-kernels of d parameters,
sub-kernel i (0-based) stretched by 2**max(0, i - 1) with linear interpolation and damped by
decay**(-i). The kernel thus covers d * 2**(s - 1) lags with s * d parameters, with a
resolution that coarsens and a weight that decays with distance.

Shapes: sub_kernels (s, h, d); kernels K (h, l).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from effseq.ops import _checks
from effseq.typing import Array


def _upsample_factor(i: int) -> int:
    return 2 ** max(0, i - 1)


def sgconv_length(num_scales: int, kernel_dim: int) -> int:
    """The natural kernel length d * 2**(s - 1) before cutting or padding."""
    return sum(kernel_dim * _upsample_factor(i) for i in range(num_scales))


@functools.cache
def _linear_upsample_plan(d: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gather indices and weights of linear upsampling by an integer factor.

    Half-pixel-centred sampling (the convention of ``torch.nn.functional.interpolate`` with
    ``mode="linear", align_corners=False``): output j reads the input at
    x = (j + 0.5) / factor - 0.5, clamped to [0, d - 1].
    """
    j = np.arange(d * factor)
    x = np.clip((j + 0.5) / factor - 0.5, 0.0, d - 1)
    lo = np.floor(x).astype(np.int32)
    hi = np.minimum(lo + 1, d - 1)
    return lo, hi, (x - lo).astype(np.float32)


def sgconv_kernel(sub_kernels: Array, length: int, decay: float = 2.0) -> Array:
    """Assembles the SGConv kernel from its multi-scale sub-kernels.

    Args:
      sub_kernels: (s, h, d) real: s scales of h channels, d parameters each.
      length: output kernel length l (Python int); the assembled kernel of length
        d * 2**(s - 1) is cut or zero-padded to it.
      decay: per-scale damping; scale i is multiplied by decay**(-i).

    Returns:
      K (h, length) float32. Kernel normalization is the layer's business: it is fixed at
      initialization, not part of this pure op.
    """
    op = "sgconv_kernel"
    _checks.check_rank(op, "sub_kernels", sub_kernels, 3, "(s, h, d)")
    _checks.check_real(op, "sub_kernels", sub_kernels)
    _checks.check_positive_int(op, "length", length)
    if isinstance(decay, complex):
        raise ValueError(f"{op}: `decay` must be a real number, got {decay!r}")
    num_scales, _, d = sub_kernels.shape
    w = sub_kernels.astype(jnp.float32)
    pieces = []
    total = 0
    for i in range(num_scales):
        if total >= length:  # later scales would be cut off entirely
            break
        factor = _upsample_factor(i)
        if factor == 1:
            piece = w[i]
        else:
            lo, hi, frac = _linear_upsample_plan(d, factor)
            piece = w[i][:, lo] * (1 - frac) + w[i][:, hi] * frac
        pieces.append(piece * decay ** (-i))
        total += d * factor
    K = jnp.concatenate(pieces, axis=-1)
    if total >= length:
        return K[:, :length]
    return jnp.pad(K, ((0, 0), (0, length - total)))


def sgconv_kernel_reference(sub_kernels: Array, length: int, decay: float = 2.0) -> np.ndarray:
    """Slow reference for :func:`sgconv_kernel`: every kernel tap by its formula, in NumPy."""
    w = np.asarray(sub_kernels, dtype=np.float32)
    num_scales, h, d = w.shape
    taps = []
    for i in range(num_scales):
        factor = _upsample_factor(i)
        for j in range(d * factor):
            x = min(max((j + 0.5) / factor - 0.5, 0.0), d - 1)
            lo = int(np.floor(x))
            hi = min(lo + 1, d - 1)
            taps.append((w[i, :, lo] * (1 - (x - lo)) + w[i, :, hi] * (x - lo)) / decay**i)
    K = np.stack(taps, axis=-1) if taps else np.zeros((h, 0), np.float32)
    out = np.zeros((h, length), np.float32)
    n = min(length, K.shape[-1])
    out[:, :n] = K[:, :n]
    return out
