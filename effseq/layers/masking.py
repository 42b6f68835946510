"""Padding masks inside mixers.

A mask (b, t) is True at real tokens. Mixers zero their input at padded positions and, where a
recurrence would otherwise carry something through padding (gates, step sizes), make the padded
steps identities, so right-padding a sequence to any length leaves its real outputs unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp

from effseq.typing import Array


def zero_padding(x: Array, mask: Array | None) -> Array:
    """x (b, t, ...) with padded positions (mask False) set to zero; x itself when mask is None."""
    if mask is None:
        return x
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), x, 0)
