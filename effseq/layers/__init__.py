"""Flax Linen sequence-mixer layers; all maths through :mod:`effseq.ops`.

Every mixer follows one protocol, so models can swap them by name:

* fields ``d_model`` (width d), ``dtype`` (compute, default float32) and ``param_dtype``
  (storage, default float32), plus its own hyper-parameters with the paper's defaults;
* ``__call__(x, mask=None)``: x (b, t, d) -> y (b, t, d), the parallel (training) form; mask
  (b, t) bool marks real tokens, and padded positions then never change real outputs, however
  long the right padding (:mod:`effseq.layers.masking`);
* ``init_state(batch, max_len)``: the decoding state (a pytree of arrays) before any token;
* ``step(x_t, state)``: x_t (b, d) -> (y_t (b, d), state), one token of the recurrent form,
  equal to the parallel form position by position (causal mixers only; a bidirectional mixer
  raises);
* ``prefill(x, max_len)``: x (b, t, d) -> (y, state), the parallel form over a prompt and the
  state that ``step`` continues from, as if the t tokens had been stepped one by one.

Every parameter carries logical axis names (:mod:`effseq.sharding`), created through
:func:`effseq.layers.params.param`; a parameter whose recipe gives it its own learning rate or
no weight decay names its optimizer group there (``group="ssm"``, ...).
"""
