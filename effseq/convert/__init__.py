"""Converters from the official PyTorch weights of each mixer to effseq parameters.

:func:`mixer_params` takes an official module's ``state_dict()`` as numpy arrays (effseq never
imports torch) and returns the ``params`` collection of the matching effseq mixer, so that

    layer = effseq.models.MIXERS[name](**options)
    layer.apply({"params": mixer_params(name, state_dict, **options)}, x)

equals the official module's forward on x (b, t, d_model) to float32 round-off. ``options``
are the effseq mixer's own fields (e.g. Mamba's ``state_size``, not ``d_state``); each
converter's docstring lists the official constructor argument each one corresponds to.

One module per official source: :mod:`effseq.convert.mamba` (``mamba``, ``mamba2``),
:mod:`effseq.convert.fla` (``gla``, ``gdn``, ``based``), :mod:`effseq.convert.rglru`.
"""

from effseq.convert.common import CONVERTERS, StateDict, mixer_params, register_converter

# Importing them registers the converters.
from effseq.convert import based, fla, mamba, rglru  # noqa: E402, F401  isort: skip

__all__ = ["CONVERTERS", "StateDict", "mixer_params", "register_converter"]
