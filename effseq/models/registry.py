"""Mixers by name, and per-layer patterns for hybrids ("gla,gla,gla,attention")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from effseq.layers.attention import Attention
from effseq.layers.gla import GLA
from effseq.layers.mamba import Mamba
from effseq.layers.s4d import S4D
from effseq.layers.sgconv import SGConv

MIXERS: dict[str, type[nn.Module]] = {
    "s4d": S4D,
    "sgconv": SGConv,
    "mamba": Mamba,
    "gla": GLA,
    "attention": Attention,
}
# Mixers with a non-causal (bidirectional) form; GLA is causal only.
BIDIRECTIONAL = frozenset({"s4d", "sgconv", "mamba", "attention"})


def parse_pattern(mixer: str, n_layers: int) -> tuple[str, ...]:
    """One mixer name, or a comma pattern repeated over the depth, e.g. "gla,gla,gla,attention".

    Returns the pattern unit; ``n_layers`` must be a multiple of its length.
    """
    names = tuple(m.strip() for m in mixer.split(","))
    for name in names:
        if name not in MIXERS:
            raise ValueError(f"unknown mixer {name!r} in {mixer!r}; known: {', '.join(MIXERS)}")
    if n_layers < 1 or n_layers % len(names):
        raise ValueError(
            f"n_layers={n_layers} must be a positive multiple of the pattern length "
            f"{len(names)} ({mixer!r})"
        )
    return names


def make_mixer(
    name: str,
    d_model: int,
    *,
    causal: bool,
    max_len: int,
    dtype,
    param_dtype,
    options: Mapping[str, Any] | None = None,
    **kwargs,
) -> nn.Module:
    """Builds mixer ``name`` with the model's width, direction and dtypes plus its own options."""
    fields: dict[str, Any] = dict(d_model=d_model, dtype=dtype, param_dtype=param_dtype)
    if name == "attention":
        fields["causal"] = causal
    elif name in BIDIRECTIONAL:
        fields["bidirectional"] = not causal
    elif not causal:
        raise ValueError(f"mixer {name!r} is causal only; use it with causal=True")
    if name == "sgconv":
        fields["max_len"] = max_len
    fields.update(options or {})
    return MIXERS[name](**fields, **kwargs)
