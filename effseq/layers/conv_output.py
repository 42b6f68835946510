"""The output head shared by the convolution mixers (S4D, SGConv): skip D, GELU, projection,
optional GLU, as in the S4D and SGConv code."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effseq import ops, sharding
from effseq.layers import params
from effseq.typing import Array, DType


def output_params(module: nn.Module, d: int, glu: bool) -> tuple[Array, Array, Array]:
    """Creates the skip D (d,), and the output projection's kernel (d, d or 2d) and bias on
    ``module``. Call from ``setup``. D is an ordinary weight-decayed parameter at the main
    learning rate, as in both repositories (a plain ``nn.Parameter`` without ``_optim``).

    Kernel axes (embed, mlp): the input dimension is the mixer's channels, the output the new
    width (2d before a GLU). D is standard normal as in the S4D code.
    """
    pd = module.param_dtype
    normal = nn.initializers.normal(1.0)
    D = params.param(module, "D", normal, (d,), (sharding.EMBED,), pd, group="decay")
    width = 2 * d if glu else d
    kernel = params.param(
        module,
        "out_kernel",
        nn.initializers.lecun_normal(),
        (d, width),
        (sharding.EMBED, sharding.MLP),
        pd,
    )
    bias = params.param(module, "out_bias", nn.initializers.zeros, (width,), (sharding.MLP,), pd)
    return D, kernel, bias


def conv_output(
    y: Array, x: Array, D: Array, kernel: Array, bias: Array, glu: bool, dtype: DType
) -> Array:
    """Proj(GELU(y + D x)): Dense d -> d, or Dense d -> 2d then GLU(a, g) = a * sigmoid(g) (the
    S4/S4D code's default output layer); y, x (..., d), result in ``dtype``."""
    # The exact GELU x Phi(x), as the S4D and SGConv code use (torch's nn.GELU()).
    y = jax.nn.gelu(y + x * D.astype(dtype), approximate=False).astype(dtype)
    y = ops.dense(y, kernel.astype(dtype)) + bias.astype(dtype)
    if glu:
        a, g = jnp.split(y, 2, axis=-1)
        y = a * jax.nn.sigmoid(g)
    return y
