# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Efficiency: time and memory against sequence length
#
# A small benchmark of one mixer layer per family: the jitted forward + backward pass
# (what a training step spends in the mixer) at a few sequence lengths, its compiled memory
# footprint, and the size of the decoding state each mixer keeps after a context of that
# length. On log-log axes the slope of a line is the growth exponent: about 1 for the
# convolutions and scans, 2 for attention's time and memory (`impl="xla"` forms the
# (t, t) score matrix).
#
# Method, as in `effseq.benchmarks`: compile ahead of time, one warm-up call, then the median of a
# few calls, each ended by `block_until_ready`. Memory is the executable's own accounting
# (`compiled.memory_analysis()`: arguments, outputs and temporaries), identical on any backend.
# Sizes are tiny so that the notebook runs in under a minute on a 2-core CPU; `make
# bench-models` runs the full model-level benchmark. Timings are only comparable within one
# run on one machine.

# %%
import os
import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from effseq.models import Backbone
from effseq.models.registry import make_mixer

MIXERS = ("s4d", "sgconv", "mamba", "gla", "attention")
LENGTHS = tuple(int(t) for t in os.environ.get("EFFSEQ_NB_LENGTHS", "256,512,1024,2048").split(","))
D_MODEL, BATCH, REPEATS = 32, 2, 5


# %% [markdown]
# ## The measurement


# %%
def fwd_bwd(layer):
    """(params, x) -> gradients of a scalar loss of the layer's output, for params and x."""

    def loss(variables, x):
        return jnp.mean(jnp.square(layer.apply(variables, x)))

    return jax.grad(loss, argnums=(0, 1))


def build(name):
    """The layer and its parameters. Sized for the longest length (SGConv's number of kernel
    scales depends on it); the same parameters then serve every shorter length."""
    backbone = Backbone(mixer=name, d_model=D_MODEL, n_layers=1, max_len=max(LENGTHS))
    layer = make_mixer(name, backbone)
    x = jnp.zeros((BATCH, min(LENGTHS), D_MODEL))
    return layer, jax.jit(layer.init)(jax.random.key(1), x)


def measure(layer, variables, t):
    x = jax.random.normal(jax.random.key(0), (BATCH, t, D_MODEL))
    start = time.perf_counter()
    compiled = jax.jit(fwd_bwd(layer)).lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, x))  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, x))
        times.append(time.perf_counter() - start)
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    # The decoding state after a context of t tokens: shapes only, nothing is allocated.
    state = jax.eval_shape(lambda v: layer.apply(v, BATCH, t, method="init_state"), variables)
    state_bytes = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(state))
    return dict(
        time_s=statistics.median(times),
        compile_s=compile_s,
        peak_bytes=peak,
        state_bytes=state_bytes,
    )


results = {}
for name in MIXERS:
    layer, variables = build(name)
    for t in LENGTHS:
        results[name, t] = measure(layer, variables, t)
    row = "  ".join(f"t={t}: {1e3 * results[name, t]['time_s']:7.2f} ms" for t in LENGTHS)
    print(f"{name:10s} {row}")

# %% [markdown]
# ## Time, memory and decoding state against length


# %%
def slope(xs, ys):
    """Least-squares slope of log y against log x: the p of y ~ x^p."""
    # round, then + 0.0: a flat line prints as 0.00, not -0.00.
    return round(float(np.polyfit(np.log(xs), np.log(ys), 1)[0]), 2) + 0.0


panels = (
    ("time_s", "fwd + bwd time (s)"),
    ("peak_bytes", "compiled peak memory (bytes)"),
    ("state_bytes", "decoding state (bytes)"),
)
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
for ax, (key, label) in zip(axes, panels, strict=True):
    for name in MIXERS:
        ys = [results[name, t][key] for t in LENGTHS]
        if any(y is None for y in ys):
            continue
        ax.plot(LENGTHS, ys, "o-", label=f"{name} (slope {slope(LENGTHS, ys):.2f})")
    ax.set(xscale="log", yscale="log", xlabel="sequence length t", title=label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
fig.tight_layout()

# %% [markdown]
# What to look for: attention's time and memory slopes are about 2 or more (the (t, t) scores
# dominate once t passes a few hundred; below that its projections, linear in t, do); the
# others stay near 1 or below (fixed costs such as parameters weigh more at short lengths). Decoding
# state is flat for S4D, Mamba and GLA (a fixed-size recurrence), grows linearly for
# attention (the KV cache) and for SGConv (it keeps the input history for its long kernel).
# Compile times (below) matter at this size: most of a short notebook run is compilation.

# %%
for name in MIXERS:
    row = "  ".join(f"{results[name, t]['compile_s']:5.2f}" for t in LENGTHS)
    print(f"{name:10s} compile s: {row}")
