"""Flax Linen sequence-mixer layers; all maths through :mod:`effseq.ops`.

Every mixer follows one interface, :class:`effseq.layers.mixer.Mixer` (fields d_model, causal,
max_len, dtype, param_dtype; methods ``__call__(x, mask=None)``, ``init_state``, ``step``,
``prefill``), so models swap them by name (:mod:`effseq.models.registry`).

Every parameter carries logical axis names (:mod:`effseq.sharding`), created through
:func:`effseq.layers.params.param`; a parameter whose recipe gives it its own learning rate or
no weight decay names its optimizer group there (``group="ssm"``, ...).
"""

from effseq.layers.mixer import Mixer

__all__ = ["Mixer"]
