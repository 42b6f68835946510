"""What every converter shares: reading a state dict key by key with shape checks, and the
check of the result against the effseq mixer's own parameter tree."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CONVERTERS", "StateDict", "mixer_params", "register_converter"]

# mixer name -> converter(state: StateDict, layer: the effseq mixer) -> params (nested dict).
CONVERTERS: dict[str, Callable] = {}


def register_converter(name: str):
    """Decorator: registers ``fn(state, layer) -> params`` as the converter of mixer ``name``."""

    def add(fn):
        CONVERTERS[name] = fn
        return fn

    return add


class StateDict:
    """An official ``state_dict`` read key by key: :meth:`take` checks each array's shape
    and :meth:`finish` that every key was used, so a checkpoint built with other
    hyper-parameters fails with the key that differs, not with wrong outputs."""

    def __init__(self, mixer: str, state_dict: Mapping[str, object]):
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"mixer_params({mixer!r}): state_dict must map keys to arrays, got "
                f"{type(state_dict).__name__}"
            )
        self.mixer = mixer
        self._arrays = dict(state_dict)
        self._used: set[str] = set()

    def take(self, key: str, shape: Sequence[int]) -> np.ndarray:
        """The array under ``key`` as float32 numpy; ValueError naming the key if it is missing
        or its shape is not ``shape``."""
        if key not in self._arrays:
            raise ValueError(
                f"mixer_params({self.mixer!r}): state_dict has no key {key!r} (keys: "
                f"{', '.join(sorted(self._arrays)) or 'none'})"
            )
        value = np.asarray(self._arrays[key])
        if value.dtype.kind not in "fiu":
            raise ValueError(
                f"mixer_params({self.mixer!r}): state_dict[{key!r}] is not a numeric array "
                f"(dtype {value.dtype})"
            )
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"mixer_params({self.mixer!r}): state_dict[{key!r}] has shape "
                f"{tuple(value.shape)}, but the options given make it {tuple(shape)}: check "
                "the options against the official module's constructor arguments"
            )
        self._used.add(key)
        return value.astype(np.float32)

    def finish(self) -> None:
        """ValueError naming the keys no converter step read (another architecture, or an
        option the effseq mixer does not reproduce)."""
        left = sorted(set(self._arrays) - self._used)
        if left:
            raise ValueError(
                f"mixer_params({self.mixer!r}): state_dict keys {', '.join(map(repr, left))} "
                "have no place in the effseq layer built from these options"
            )


def _paths(tree, prefix=()) -> dict[tuple[str, ...], object]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_paths(v, (*prefix, k)))
        return out
    return {prefix: tree}


def mixer_params(name: str, state_dict: Mapping[str, object], **options) -> dict:
    """The ``params`` of effseq mixer ``name`` from an official module's ``state_dict``.

    Args:
      name: an effseq mixer with a converter (:data:`CONVERTERS`: mamba, mamba2, gla, gdn,
        rglru, based).
      state_dict: the official PyTorch module's ``state_dict()``, each tensor as a numpy array
        (``{k: v.numpy() for k, v in module.state_dict().items()}``).
      options: fields of the effseq mixer ``name`` (``d_model`` and its hyper-parameters),
        matching the official module's constructor arguments as the converter's docstring
        lists them.

    Returns:
      The nested dict of float32 arrays (cast to the layer's ``param_dtype``) to apply as
      ``MIXERS[name](**options).apply({"params": params}, x)``.

    Raises:
      ValueError: an unknown mixer or option, a missing or unused key, or a shape that does
        not match the options (each message names the key).
    """
    from effseq.models.registry import MIXERS  # here: effseq.models imports the layers

    if name not in CONVERTERS:
        raise ValueError(
            f"mixer_params: no converter for mixer {name!r}; converters exist for "
            f"{', '.join(sorted(CONVERTERS))}"
        )
    cls = MIXERS[name]
    try:
        layer = cls(**options)
    except TypeError as e:
        raise ValueError(f"mixer_params({name!r}): bad options for {cls.__name__}: {e}") from None
    state = StateDict(name, state_dict)
    params = CONVERTERS[name](state, layer)
    state.finish()
    # The layer's own tree, without running its initializers, is what the result must match.
    x = jax.ShapeDtypeStruct((1, 1, layer.d_model), jnp.float32)
    expected = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x))["params"]
    want, got = _paths(expected), _paths(params)
    if set(want) != set(got):  # a converter bug, not a user error
        raise AssertionError(
            f"converter {name!r} produced {sorted(got)}, the layer has {sorted(want)}"
        )
    out: dict = {}
    for path, spec in want.items():
        value = np.asarray(got[path], np.float32)
        if value.shape != tuple(spec.shape):
            raise AssertionError(
                f"converter {name!r}: {'/'.join(path)} has shape {value.shape}, "
                f"the layer wants {tuple(spec.shape)}"
            )
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(value, spec.dtype)
    return out
