"""Shape legend and array aliases used in every effseq docstring.

Every shape is written with these letters, batch first, then time:

====  =====================================================================
b     batch
t     time (sequence length); ``s`` is a second time axis (keys, or lag)
d     model width (channels of a Mamba scan)
h     heads, or independent channels of a convolution kernel
k     key dimension (``dk``)
v     value dimension (``dv``)
n     state size (complex modes for S4D, real states for Mamba)
c     chunk length
l     kernel length
====  =====================================================================
"""

from __future__ import annotations

from typing import TypeAlias

import jax
import numpy as np

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.Array | np.ndarray
DType: TypeAlias = jax.typing.DTypeLike

__all__ = ["Array", "ArrayLike", "DType"]
