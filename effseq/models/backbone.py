"""The backbone config: every setting of a model's stack of residual blocks, in one value.

Built once (from ``config.model`` by :func:`effseq.models.build.backbone`, or directly in a
notebook) and handed down whole: model -> stack -> block -> mixer factory. A frozen dataclass of
plain values, hashable, so Flax modules hold it as a field and jit never traces it; not a
``flax.struct`` pytree, because nothing in it is an array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

from effseq.models import registry

NORMS = ("layernorm", "rmsnorm")
MLPS = ("none", "gelu", "glu", "sqrelu")


def _freeze(options: Mapping[str, Any] | None) -> FrozenDict:
    def freeze(value):
        if isinstance(value, Mapping):
            return FrozenDict({k: freeze(v) for k, v in value.items()})
        if isinstance(value, list):
            return tuple(freeze(v) for v in value)
        return value

    return freeze(dict(options or {}))


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The stack's settings.

    Attributes:
      mixer: the per-layer mixer pattern, repeated over the depth: one registered name, a comma
        string ("gla,gla,gla,attention") or a sequence of names; stored as a tuple of names.
      d_model: width d.
      n_layers: residual blocks; a multiple of the pattern's length.
      causal: the direction of every mixer (:class:`effseq.layers.Mixer`). False needs every
        mixer of the pattern to have a bidirectional form (:func:`register_mixer`).
      max_len: the longest sequence the model is built for (passed to every mixer).
      norm: "layernorm" or "rmsnorm", before (``prenorm``) or after each residual add.
      mlp: "none", "gelu", "glu" (SwiGLU) or "sqrelu" after each mixer, ``mlp_ratio`` x wider.
      dropout: on each residual branch, in training.
      remat: recompute each layer's activations in the backward pass.
      short_conv: > 0 puts a causal depthwise convolution of that many taps in front of every
        mixer (Zoology's fairness recipe, Arora et al. 2023); 0 none.
      mixer_options: extra mixer fields for every mixer, except entries keyed by a mixer name,
        which hold fields for that mixer only (:func:`effseq.models.registry.make_mixer`).
      dtype: compute dtype; param_dtype: parameter storage dtype.
    """

    mixer: tuple[str, ...]
    d_model: int
    n_layers: int
    causal: bool = True
    max_len: int = 1024
    norm: str = "layernorm"
    prenorm: bool = True
    mlp: str = "glu"
    mlp_ratio: int = 4
    dropout: float = 0.0
    remat: bool = False
    short_conv: int = 0
    mixer_options: FrozenDict = FrozenDict()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        mixer = self.mixer
        text = mixer if isinstance(mixer, str) else ",".join(_names(mixer))
        set_ = object.__setattr__  # frozen: normalised once, here
        set_(self, "mixer", registry.parse_pattern(text, self.n_layers))
        set_(self, "mixer_options", _freeze(self.mixer_options))
        if self.d_model < 1:
            raise ValueError(f"Backbone: d_model must be >= 1, got {self.d_model}")
        if self.norm not in NORMS:
            raise ValueError(f"Backbone: unknown norm={self.norm!r}; choose one of {NORMS}")
        if self.mlp not in MLPS:
            raise ValueError(f"Backbone: unknown mlp={self.mlp!r}; choose one of {MLPS}")
        if self.short_conv < 0 or self.short_conv == 1:
            raise ValueError(
                f"Backbone: short_conv must be 0 (none) or the number of taps >= 2, "
                f"got {self.short_conv}"
            )
        if not self.causal:
            causal_only = registry.causal_only(self.mixer)
            if causal_only:
                raise ValueError(
                    f"mixer {causal_only[0]!r} is causal only; a bidirectional (causal=False) "
                    f"model needs every mixer to have that form"
                )

    @property
    def groups(self) -> int:
        """Repeats of the pattern over the depth (the scanned layer axis)."""
        return self.n_layers // len(self.mixer)

    def replace(self, **changes) -> Backbone:
        """A copy with ``changes`` applied (and checked again)."""
        return dataclasses.replace(self, **changes)


def _names(mixer: Sequence[str]) -> list[str]:
    if not all(isinstance(m, str) for m in mixer):
        raise ValueError(f"Backbone: mixer must be a name or a sequence of names, got {mixer!r}")
    return list(mixer)
