"""Fair timing of jitted functions, and the provenance every result file carries.

Ahead-of-time compile (timed separately), warm-up, ``block_until_ready``, then the median and
range of several runs. Peak temporary memory comes from the compiled executable's own memory
analysis, so it is the same number on any backend and needs no profiler.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import jax


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    runs: int
    compile_s: float
    temp_bytes: int | None


def time_jitted(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> Timing:
    """Compiles ``jax.jit(fn)`` for ``args`` ahead of time, then times ``repeats`` calls."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    temp = None if analysis is None else int(analysis.temp_size_in_bytes)
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats, compile_s, temp)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict:
    """Where and with what a result was measured."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes to tracked files mean the commit alone does not reproduce it.
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
    }
