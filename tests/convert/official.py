"""The official PyTorch modules that the converters reproduce, loaded for the parity tests
and for writing the fixtures (needs torch; ``make test`` never imports this file).

Where the official packages are not pip-installed (mamba_ssm and fla need CUDA to build),
point ``EFFSEQ_OFFICIAL_SRC`` at a folder holding source checkouts named as below; their
modules are imported without running the packages' ``__init__`` (which pulls in CUDA
extensions, transformers models and tokenizers), and without launching any Triton kernel:
each mixer runs its official pure-PyTorch path on the CPU, with the few Triton calls of the
default forward swapped for the official reference functions that sit beside them.

    EFFSEQ_OFFICIAL_SRC/state-spaces+mamba            github.com/state-spaces/mamba
    EFFSEQ_OFFICIAL_SRC/fla-org+flash-linear-attention github.com/fla-org/flash-linear-attention
    EFFSEQ_OFFICIAL_SRC/google-deepmind+recurrentgemma github.com/google-deepmind/recurrentgemma
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
import types

SOURCES = {
    "mamba_ssm": "state-spaces+mamba",
    "fla": "fla-org+flash-linear-attention",
    "recurrentgemma": "google-deepmind+recurrentgemma",
}


# Sub-packages imported without their __init__ (which imports every model, or a tokenizer).
_BARE = {"fla": ("layers",), "recurrentgemma": ("torch",)}


class Unavailable(Exception):
    """torch or an official package is not importable here (the parity tests skip)."""


def _bare_package(name: str, path: pathlib.Path) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__version__ = "0.0"
    sys.modules[name] = module


def require_torch() -> None:
    """Raises :class:`Unavailable` when torch cannot be imported."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"torch is not installed: {e}") from None


def import_official(package: str, module: str):
    """``package.module`` (e.g. ``fla``, ``layers.gla``) from an installed package or a
    checkout under ``EFFSEQ_OFFICIAL_SRC``; raises :class:`Unavailable` otherwise."""
    require_torch()
    if package not in sys.modules:
        root = os.environ.get("EFFSEQ_OFFICIAL_SRC")
        checkout = pathlib.Path(root) / SOURCES[package] if root else None
        if checkout is not None and (checkout / package).is_dir():
            sys.path.insert(0, str(checkout))
            _bare_package(package, checkout / package)
            for sub in _BARE.get(package, ()):  # their __init__s import everything
                if (checkout / package / sub / "__init__.py").exists():
                    _bare_package(f"{package}.{sub}", checkout / package / sub)
        else:
            try:
                importlib.import_module(package)
            except ImportError as e:
                raise Unavailable(
                    f"{package} is neither installed nor under EFFSEQ_OFFICIAL_SRC: {e}"
                ) from None
    try:
        if package == "fla":
            # fla's Triton autotune keys are checked at import against the installed Triton
            # and differ between versions; no kernel runs here, so the decorator is dropped.
            import triton

            autotune, triton.autotune = triton.autotune, lambda *a, **k: lambda f: f
            try:
                return importlib.import_module(f"{package}.{module}")
            finally:
                triton.autotune = autotune
        return importlib.import_module(f"{package}.{module}")
    except ImportError as e:
        raise Unavailable(f"cannot import {package}.{module}: {e}") from None


def state_dict_numpy(module) -> dict:
    """``module.state_dict()`` as float32 numpy arrays (what :func:`mixer_params` takes)."""
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def randomize(module, seed: int, scale: float | None = None) -> None:
    """Replaces every parameter with seeded normal values, in place, so that zero-init biases,
    unit norms and the like are exercised too. ``scale`` None: fan_in^-1/2 for matrices (the
    last axis: a Linear's input, a Conv1d's taps) and 0.5 for vectors, which keeps the outputs
    O(1) through the layer; a number: that standard deviation everywhere."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = scale if scale is not None else (p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
