"""Mixers by name, and per-layer patterns for hybrids ("gla,gla,gla,attention")."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from effseq.layers.attention import Attention
from effseq.layers.based import Based
from effseq.layers.gdn import GatedDeltaNet
from effseq.layers.gla import GLA
from effseq.layers.mamba import Mamba
from effseq.layers.mamba2 import Mamba2
from effseq.layers.rglru import RGLRU
from effseq.layers.s4d import S4D
from effseq.layers.sgconv import SGConv

MIXERS: dict[str, type[nn.Module]] = {
    "s4d": S4D,
    "sgconv": SGConv,
    "mamba": Mamba,
    "gla": GLA,
    "attention": Attention,
    "mamba2": Mamba2,
    "gdn": GatedDeltaNet,
    "rglru": RGLRU,
    "based": Based,
}
_BUILTIN = frozenset(MIXERS)
# Mixers with a non-causal (bidirectional) form; GLA, GDN, RG-LRU and Based are causal only.
# A set, not a frozenset: register_mixer adds to it in place, so modules that imported it see
# new mixers.
BIDIRECTIONAL = {"s4d", "sgconv", "mamba", "mamba2", "attention"}
# The mixer interface (effseq.layers.Mixer): the methods a model calls and the fields
# make_mixer sets.
_PROTOCOL_METHODS = ("__call__", "init_state", "step", "prefill")
# name -> the Python file whose code registered it (an experiment file, a plugin), recorded in
# a workdir so `effseq eval` and `effseq compare` can register the mixer again.
_SOURCES: dict[str, str] = {}
_REQUIRED_FIELDS = ("d_model", "causal", "max_len", "dtype", "param_dtype")


def register_mixer(
    name: str, cls: type[nn.Module], bidirectional: bool = False, *, replace: bool = False
) -> None:
    """Adds mixer ``cls`` under ``name``, so configs and patterns can use it like a built-in.

    ``cls`` must follow the mixer interface (subclass :class:`effseq.layers.Mixer`: fields
    d_model, causal, max_len, dtype, param_dtype; methods __call__, init_state, step,
    prefill). ``bidirectional`` declares that ``causal=False`` gives a non-causal form, which
    classifiers then use.
    ``replace`` allows re-registering a name that is already taken (e.g. a notebook cell that
    redefines its class), except the built-in mixers.
    """
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise ValueError(
            f"register_mixer: name must be a non-empty string without commas or "
            f"surrounding spaces, got {name!r}"
        )
    if name in _BUILTIN or (name in MIXERS and not replace):
        raise ValueError(
            f"register_mixer: mixer {name!r} is already registered"
            + ("" if name in _BUILTIN else "; pass replace=True to replace it")
        )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_mixer: cls must be a flax.linen.Module subclass, got {cls!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = [f for f in _REQUIRED_FIELDS if f not in fields]
    # Looked up below nn.Module: every class has a __call__ (type's), so getattr would not do.
    own = [k for k in cls.__mro__ if k is not nn.Module and issubclass(k, nn.Module)]
    missing += [m for m in _PROTOCOL_METHODS if not any(callable(vars(k).get(m)) for k in own)]
    if missing:
        raise ValueError(
            f"register_mixer: {cls.__name__} lacks {', '.join(missing)} of the mixer interface "
            "(subclass effseq.layers.Mixer)"
        )
    MIXERS[name] = cls
    caller = sys._getframe(1).f_code.co_filename
    if os.path.isfile(caller):
        _SOURCES[name] = os.path.abspath(caller)
    else:  # a notebook cell or an interactive session: nothing to run again
        _SOURCES.pop(name, None)
    if bidirectional:
        BIDIRECTIONAL.add(name)
    else:
        BIDIRECTIONAL.discard(name)


def names(mixer: str) -> tuple[str, ...]:
    """The names of a comma pattern, e.g. "gla, attention" -> ("gla", "attention"), unchecked
    (:func:`parse_pattern` checks them)."""
    return tuple(m.strip() for m in mixer.split(","))


def causal_only(pattern) -> tuple[str, ...]:
    """The mixers of ``pattern`` (a sequence of names) that have no bidirectional form."""
    return tuple(m for m in pattern if m not in BIDIRECTIONAL)


def sources(mixer: str) -> dict[str, str]:
    """The registering file of each registered (not built-in) mixer in pattern ``mixer``."""
    return {n: _SOURCES[n] for n in sorted(set(names(mixer))) if n in _SOURCES}


def load_source(path: str | os.PathLike) -> None:
    """Runs the Python file ``path`` (e.g. the experiment file that registers a mixer)."""
    from effseq.configs.base import run_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mixer source file {path} does not exist")
    run_file(path, "effseq_source")


def parse_pattern(mixer: str, n_layers: int) -> tuple[str, ...]:
    """One mixer name, or a comma pattern repeated over the depth, e.g. "gla,gla,gla,attention".

    Returns the pattern unit; ``n_layers`` must be a multiple of its length.
    """
    pattern = names(mixer)
    for name in pattern:
        if name not in MIXERS:
            raise ValueError(f"unknown mixer {name!r} in {mixer!r}; known: {', '.join(MIXERS)}")
    if n_layers < 1 or n_layers % len(pattern):
        raise ValueError(
            f"n_layers={n_layers} must be a positive multiple of the pattern length "
            f"{len(pattern)} ({mixer!r})"
        )
    return pattern


def make_mixer(name: str, backbone, **kwargs) -> nn.Module:
    """Builds mixer ``name`` with ``backbone``'s (:class:`effseq.models.Backbone`) width,
    direction, max_len and dtypes, plus its mixer options.

    ``backbone.mixer_options`` are layer fields for every mixer of the model, except entries
    keyed by a mixer name, which hold fields for that mixer only: ``{"state_size": 16,
    "attention": {"rotary": True}}`` gives every mixer state_size=16 and only the attention
    layers rotary positions (a hybrid's mixers seldom share all their fields)."""
    fields: dict[str, Any] = dict(
        d_model=backbone.d_model,
        causal=backbone.causal,
        max_len=backbone.max_len,
        dtype=backbone.dtype,
        param_dtype=backbone.param_dtype,
    )
    check_fields(name, backbone.mixer_options, kwargs)
    fields.update(mixer_fields(name, backbone.mixer_options))
    return MIXERS[name](**fields, **kwargs)


def mixer_fields(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Mixer ``name``'s fields from the model's ``mixer_options``: the shared entries, then
    those under its own name."""
    fields = {k: v for k, v in options.items() if k not in MIXERS}
    fields.update(options.get(name) or {})
    return fields


def check_fields(name: str, options: Mapping[str, Any], extra: Mapping[str, Any] = ()) -> None:
    """ValueError naming ``model.mixer_options[.name]`` when mixer ``name`` lacks a field
    that ``options`` (mixer options, as in :func:`mixer_fields`) or ``extra`` set."""
    cls = MIXERS[name]
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    own = options.get(name) or {}
    unknown = sorted(k for k in {**mixer_fields(name, options), **dict(extra)} if k not in known)
    if unknown:
        where = "model.mixer_options" + (f".{name}" if unknown[0] in own else "")
        raise ValueError(
            f"{where}: {cls.__name__} (mixer {name!r}) has no field "
            f"{', '.join(map(repr, unknown))}; its fields: "
            f"{', '.join(sorted(known - set(_REQUIRED_FIELDS)))}"
        )
