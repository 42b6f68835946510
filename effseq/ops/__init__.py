"""Pure JAX kernels for sequence mixers: arrays in, arrays out; no parameters, no Flax.

Each family has a fast path (behind one ``impl=`` argument, resolved in ``_impl.py``), a slow
``*_reference`` beside it that the tests compare against, and a ``*_step`` form for recurrent
decoding. Layout is batch first, then time; see :mod:`effseq.typing` for the shape letters.
"""

from effseq.ops._impl import IMPLEMENTATIONS, resolve_impl
from effseq.ops.attention import attention, attention_reference
from effseq.ops.delta_rule import (
    gated_delta_rule,
    gated_delta_rule_reference,
    gated_delta_rule_step,
)
from effseq.ops.dense import dense, dense_reference
from effseq.ops.fftconv import (
    bidirectional_conv,
    bidirectional_conv_reference,
    causal_conv,
    causal_conv_reference,
    causal_conv_step,
    next_fast_len,
)
from effseq.ops.gla import gated_linear_attention, gated_linear_attention_reference, gla_step
from effseq.ops.s4d import (
    s4d_discretize,
    s4d_final_state,
    s4d_final_state_reference,
    s4d_kernel,
    s4d_kernel_reference,
    s4d_scan,
    s4d_step,
)
from effseq.ops.scan import linear_scan, linear_scan_reference
from effseq.ops.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)
from effseq.ops.sgconv import sgconv_kernel, sgconv_kernel_reference, sgconv_length
from effseq.ops.ssd import ssd, ssd_reference, ssd_step

__all__ = [
    "IMPLEMENTATIONS",
    "attention",
    "attention_reference",
    "bidirectional_conv",
    "bidirectional_conv_reference",
    "causal_conv",
    "causal_conv_reference",
    "causal_conv_step",
    "dense",
    "dense_reference",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_delta_rule_step",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "gla_step",
    "linear_scan",
    "linear_scan_reference",
    "next_fast_len",
    "resolve_impl",
    "s4d_discretize",
    "s4d_final_state",
    "s4d_final_state_reference",
    "s4d_kernel",
    "s4d_kernel_reference",
    "s4d_scan",
    "s4d_step",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_step",
    "sgconv_kernel",
    "sgconv_kernel_reference",
    "sgconv_length",
    "ssd",
    "ssd_reference",
    "ssd_step",
]
