"""The one place where an op's ``impl=`` argument is resolved.

Every op with more than one implementation takes ``impl=None | str``. ``None`` picks the fast
default for the backend JAX runs on; a string must be one of the op's implementations.
Adding an implementation means adding it here and dispatching on it in the op.
"""

from __future__ import annotations

import jax

# op -> its implementations.
IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "causal_conv": ("fft", "direct"),
    "bidirectional_conv": ("fft", "direct"),
    "linear_scan": ("sequential", "associative"),
    "selective_scan": ("chunked", "associative", "pallas"),
    "gated_linear_attention": ("chunked", "recurrent", "pallas"),
    "gated_delta_rule": ("chunked", "recurrent", "pallas"),
    "attention": ("xla", "blockwise"),
    "ssd": ("chunked", "recurrent", "pallas"),
}
# "pallas": the Pallas kernels of effseq.ops.pallas (Triton on NVIDIA GPUs, interpret mode on a
# CPU, where they are slow and only for checking). Never a default: no GPU measurement of them
# has been made yet (issue 19), so the XLA paths stay the defaults on every backend.

# The default per backend, for every op. On CPU a sequential loop beats a log-depth tree
# (work, not depth, is what costs); on accelerators the tree's parallelism wins. The chunked
# selective scan calls linear_scan inside, so it inherits that choice. Backends not
# listed (e.g. a plugin) use the CPU column, which is correct everywhere.
_DEFAULTS: dict[str, dict[str, str]] = {
    "cpu": {
        "causal_conv": "fft",
        "bidirectional_conv": "fft",
        "linear_scan": "sequential",
        "selective_scan": "chunked",
        "gated_linear_attention": "chunked",
        "gated_delta_rule": "chunked",
        "attention": "xla",
        "ssd": "chunked",
    },
}
_DEFAULTS["gpu"] = _DEFAULTS["tpu"] = {**_DEFAULTS["cpu"], "linear_scan": "associative"}


def resolve_impl(op: str, impl: str | None) -> str:
    """Returns the implementation name to run for ``op``.

    Raises:
      ValueError: ``impl`` is not one of the op's implementations (the message lists them).
    """
    choices = IMPLEMENTATIONS[op]
    if impl is None:
        return _DEFAULTS.get(jax.default_backend(), _DEFAULTS["cpu"])[op]
    if impl not in choices:
        raise ValueError(f"{op}: unknown impl={impl!r}; choose one of {', '.join(choices)}")
    return impl
