"""The mixer interface: the fields every sequence mixer takes from its model, and one causal
check.

Every mixer, built-in or registered (:func:`effseq.models.register_mixer`), is a Flax Linen
module with the fields of :class:`Mixer` (subclass it; its own hyper-parameters follow, with the
paper's defaults) and four methods:

* ``__call__(x, mask=None, *, segment_ids=None)``: x (b, t, d) -> y (b, t, d), the parallel
  (training) form; mask (b, t) bool marks real tokens, and padded positions then never change
  real outputs, however long the right padding (:mod:`effseq.layers.masking`);
  ``segment_ids`` (b, t) int marks packed documents (:mod:`effseq.ops.segments`): a position
  whose id differs from the previous one's starts a document, which sees nothing of the others
  (no state, convolution tap or attention weight crosses a boundary; positions restart),
  so each document's outputs equal the document run alone; id 0 is padding (AND-ed into the
  mask; :func:`effseq.layers.masking.packing`);
* ``init_state(batch, max_len)``: the decoding state (a pytree of arrays) before any token;
* ``step(x_t, state)``: x_t (b, d) -> (y_t (b, d), state), one token of the recurrent form,
  equal to the parallel form position by position;
* ``prefill(x, max_len, *, segment_ids=None)``: x (b, t, d) -> (y, state), the parallel form
  over a prompt and the state that ``step`` continues from, as if the t tokens had been stepped
  one by one; with ``segment_ids``, y is ``__call__``'s and the state is that of each row's
  last document alone (trailing padding skipped), so ``step`` continues that document exactly
  as if it had been the whole prompt.

``step`` and ``prefill`` exist for causal layers only: a non-causal layer calls
:meth:`Mixer.check_causal` first, which raises.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from effseq.typing import DType


class Mixer(nn.Module):
    """Base of every mixer: the fields a model sets on each of its mixers.

    Attributes:
      d_model: width d of the input and output.
      causal: True: position i reads positions <= i only (language models, decoding). False:
        the non-causal (bidirectional) form, for mixers that have one (classifiers); a
        causal-only mixer raises in ``setup`` (:meth:`require_causal`).
      max_len: the longest sequence the model is built for; mixers whose parameters depend on
        it (SGConv's number of kernel scales) read it, the others ignore it.
      dtype: compute dtype; recurrences and accumulators stay float32.
      param_dtype: parameter storage dtype.
    """

    d_model: int
    causal: bool = True
    max_len: int = 1024
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def check_causal(self, form: str) -> None:
        """Raises ValueError when a recurrent ``form`` ("step", "prefill") is asked of a
        non-causal layer, which reads future tokens."""
        if not self.causal:
            raise ValueError(
                f"{type(self).__name__}.{form}: a bidirectional layer has no recurrent form "
                "(causal=False reads future tokens); use causal=True for decoding"
            )

    def require_causal(self) -> None:
        """For causal-only mixers (call from ``setup``): raises ValueError if causal=False."""
        if not self.causal:
            raise ValueError(
                f"{type(self).__name__} is causal only; it has no bidirectional form (causal=False)"
            )
