"""The one place where an op's ``impl=`` argument is resolved.

Every op with more than one implementation takes ``impl=None | str``. ``None`` picks the fast
default for the backend JAX runs on; a string must be one of the op's implementations.
Adding an implementation means adding it here and dispatching on it in the op.
"""

from __future__ import annotations

import jax

# op -> its implementations. The first is the portable fast path.
IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "causal_conv": ("fft", "direct"),
    "s4d_kernel": ("chunked", "vandermonde"),
    "linear_scan": ("sequential", "associative"),
    "selective_scan": ("chunked", "associative"),
    "gated_linear_attention": ("chunked", "recurrent"),
    "attention": ("xla", "blockwise", "cudnn"),
}

# Backend-specific defaults; ops missing here use the first entry of IMPLEMENTATIONS.
# On CPU a sequential loop beats a log-depth tree (work, not depth, is what costs); on
# accelerators the tree's parallelism wins.
_BACKEND_DEFAULTS: dict[str, dict[str, str]] = {
    "cpu": {"linear_scan": "sequential"},
    "gpu": {"linear_scan": "associative"},
    "tpu": {"linear_scan": "associative"},
}


def resolve_impl(op: str, impl: str | None) -> str:
    """Returns the implementation name to run for ``op``.

    Raises:
      ValueError: ``impl`` is not one of the op's implementations (the message lists them).
    """
    choices = IMPLEMENTATIONS[op]
    if impl is None:
        return _BACKEND_DEFAULTS.get(jax.default_backend(), {}).get(op, choices[0])
    if impl not in choices:
        raise ValueError(f"{op}: unknown impl={impl!r}; choose one of {', '.join(choices)}")
    return impl
