"""Fair timing of jitted functions, and the provenance every result file carries.

Ahead-of-time compile (timed separately), warm-up, ``block_until_ready``, then the median and
range of several runs. Memory comes from the compiled executable's own memory analysis
(arguments, outputs, temporaries), so it is the same number on any backend and needs no
profiler. ``time_step`` times stateful steps (train step, decode step) whose state is donated
and threaded from one call to the next, as in real use; ``loglog_slope`` fits growth exponents.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
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
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    # arguments + outputs + temporaries, less outputs aliased onto donated arguments (they
    # share one buffer): what the executable needs resident at once.
    peak_bytes: int | None = None


def memory(compiled) -> dict[str, int | None]:
    """Byte counts from ``compiled.memory_analysis()`` (all None where the backend has none)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        keys = ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "peak_bytes")
        return dict.fromkeys(keys)
    temp = int(analysis.temp_size_in_bytes)
    arg = int(analysis.argument_size_in_bytes)
    out = int(analysis.output_size_in_bytes)
    alias = int(analysis.alias_size_in_bytes)
    return {
        "temp_bytes": temp,
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "peak_bytes": arg + out + temp - alias,
    }


def compile_timed(jitted, *args):
    """``jitted.lower(*args).compile()`` -> (compiled executable, seconds it took)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_jitted(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> Timing:
    """Compiles ``jax.jit(fn)`` for ``args`` ahead of time, then times ``repeats`` calls."""
    compiled, compile_s = compile_timed(jax.jit(fn), *args)
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(
        statistics.median(times), min(times), max(times), repeats, compile_s, **memory(compiled)
    )


def time_step(
    compiled,
    carry,
    *args,
    repeats: int = 5,
    warmup: int = 1,
    calls_per_run: int = 1,
    compile_s: float = 0.0,
) -> tuple[Timing, object]:
    """Times ``compiled(carry, *args) -> (carry, out)`` with the carry threaded through calls.

    ``compiled`` is an AOT-compiled step (see :func:`compile_timed`) that may donate its carry,
    so each call consumes the previous call's carry, as a training loop or a decoder does. One
    run is ``calls_per_run`` calls; the times are per call (run time / calls_per_run).
    Returns (the timing, the last carry).
    """
    if repeats < 1 or warmup < 0 or calls_per_run < 1:
        raise ValueError(
            f"time_step: need repeats >= 1, warmup >= 0, calls_per_run >= 1; got "
            f"repeats={repeats}, warmup={warmup}, calls_per_run={calls_per_run}"
        )
    for _ in range(warmup):
        carry, out = compiled(carry, *args)
        jax.block_until_ready((carry, out))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls_per_run):
            carry, out = compiled(carry, *args)
        jax.block_until_ready((carry, out))
        times.append((time.perf_counter() - start) / calls_per_run)
    timing = Timing(
        statistics.median(times), min(times), max(times), repeats, compile_s, **memory(compiled)
    )
    return timing, carry


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x): the exponent p of y ~ c x^p.

    Needs at least two distinct positive x and positive y values (ValueError otherwise).
    """
    xs, ys = list(xs), list(ys)
    if len(xs) != len(ys):
        raise ValueError(f"loglog_slope: {len(xs)} x values but {len(ys)} y values")
    if any(x <= 0 for x in xs) or any(y <= 0 for y in ys):
        raise ValueError(f"loglog_slope: values must be positive, got x={xs}, y={ys}")
    if len(set(xs)) < 2:
        raise ValueError(f"loglog_slope: needs at least two distinct x values, got {xs}")
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    sxy = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    return sxy / sxx


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: "1024,2048" -> (1024, 2048); anything else is an argparse error."""
    import argparse

    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def _git(*args: str) -> str | None:
    try:
        # The checkout this effseq was imported from, wherever the command runs.
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here)
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
