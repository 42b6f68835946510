"""Model-level cost versus sequence length: training throughput, decoding, memory, compile time.

    effseq bench                    # quick plan (CPU-sized), results/bench/
    effseq bench --plan full        # 512..16k, benchmarks/results/ (the README's; --out DIR)
    effseq bench --plan small       # the default suite's models (effseq/benchmarks/small.py)
    effseq bench --plan gpu         # every mixer's op at GPU shapes vs cuDNN (gpu.py)
    python -m effseq.benchmarks.models [same options]   # the same, without the CLI

Every mixer runs in the same causal LanguageModel (4 layers, width 256, GLU MLP, tied
embeddings over a 256-token vocabulary, float32) built by the trainer from a config, so the
training numbers time the real jitted train step (``Setup.train_fn()``: forward, backward,
AdamW update, donated state) on a batch of random tokens. Parameter counts are matched: each
mixer's total must lie within ``MATCH_BUDGET`` of attention's (the reference); the default
options already do so except Mamba and Mamba-2, which run with ``expand=1``
(``MIXER_OPTIONS``) because their usual expand=2 block next to the MLP every block has would
make them ~26% larger, and Gated DeltaNet, whose fla-default value width of twice the key
width (6 d^2 parameters per layer against attention's 4 d^2) runs at ``expand_v=1``, and
Based runs 8 heads of feature width 16 (its default 12 heads do not divide 256; its total is
then 9.7% under attention's); S4D's state size is pinned to the paper's 64. SGConv's count
grows slightly with length (one more sub-kernel per doubling), so counts are reported per
length and checked at every one.

Measured per (mixer, length): step time (median, min, max of >= 5 runs after AOT compile and
a warm-up), tokens/s, compile time and the executable's peak memory (arguments + outputs +
temporaries - donated aliases, from ``compiled.memory_analysis()``). Decoding: per-token latency
of the jitted ``decode_step`` (cache donated and threaded) with a cache sized for the context
and its position set to the context's end, and the cache's bytes. A length is skipped, with the
reason recorded, when its compiled peak exceeds the memory limit or the projected step time
exceeds ``--max-step-s``. Fitted log-log slopes give each mixer's growth exponent.

Timings are only compared within one run (one machine, one load).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from effseq.benchmarks.timing import (
    compile_timed,
    loglog_slope,
    memory,
    positive_ints,
    provenance,
    time_jitted,
    time_step,
)

# Relative to the working directory: the checkout root holds the committed results.
RESULTS = pathlib.Path("benchmarks/results")
QUICK_RESULTS = pathlib.Path("results/bench")
NEWER = ("mamba2", "gdn", "rglru", "based")
MIXERS = ("s4d", "sgconv", "mamba", "gla", "attention", *NEWER)
EFFICIENT = ("s4d", "sgconv", "mamba", "gla", *NEWER)
# Mixers whose decoding state does not grow with the context (the decode-latency goal).
CONSTANT_STATE = ("s4d", "mamba", "gla", *NEWER)
REFERENCE = "attention"  # parameter counts are matched to this mixer's
MATCH_BUDGET = 0.10
# Pinned here so a change of a layer's default cannot silently unmatch the counts. S4D: the
# paper's N = 64. Mamba and Mamba-2: expand 1; GDN: value width = key width (expand_v 1);
# Based: 8 heads; see the module docstring.
MIXER_OPTIONS: dict[str, dict] = {
    "s4d": {"state_size": 64},
    "mamba": {"expand": 1},
    "mamba2": {"expand": 1},
    "gdn": {"expand_v": 1.0},
    "based": {"num_heads": 8},
}
TASK = "synthetic/induction_heads"  # a token task with per-position labels: a LanguageModel
VOCAB = 256

# The goals (2-core CPU, 4 layers, width 256).
SPEEDUP_AT = 8192
SPEEDUP_TARGET = 5.0
GROWTH_RANGE = (2048, 16384)
GROWTH_TARGET = 1.2
DECODE_RANGE = (1024, 16384)
DECODE_TARGET = 1.5


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one benchmark run measures."""

    mixers: tuple[str, ...]
    lengths: tuple[int, ...]  # training sequence lengths
    contexts: tuple[int, ...]  # decoding contexts
    batch: int = 1
    d_model: int = 256
    n_layers: int = 4
    repeats: int = 5
    decode_calls: int = 16  # decode steps per timed run (per-token time = run time / calls)
    max_step_s: float = 60.0  # skip a length whose projected step time exceeds this
    memory_fraction: float = 0.7  # skip when the compiled peak exceeds this share of memory


PLANS = {
    # Sized for a 2-core CPU in ~20 minutes: training up to the 8k goal length (2k..8k gives
    # the provisional growth exponent), decoding at the goal contexts 1k and 16k.
    "quick": Plan(MIXERS, (1024, 2048, 4096, 8192), (1024, 4096, 16384), max_step_s=90.0),
    "full": Plan(
        MIXERS,
        (512, 1024, 2048, 4096, 8192, 16384),
        (1024, 2048, 4096, 8192, 16384),
        max_step_s=120.0,
    ),
}


def bench_config(mixer: str, length: int, plan: Plan):
    """The trainer config of one benchmarked model (base config, changed keys only)."""
    from effseq.configs import get_config

    c = get_config()
    c.task.name = TASK
    c.task.options.seq_len = length
    c.task.options.vocab_size = VOCAB
    c.model.mixer = mixer
    c.model.d_model = plan.d_model
    c.model.n_layers = plan.n_layers
    for key, value in MIXER_OPTIONS.get(mixer, {}).items():
        c.model.mixer_options[key] = value
    c.train.batch_size = plan.batch
    c.train.progress = False
    return c


def make_setup(mixer: str, length: int, plan: Plan):
    from effseq.train.loop import Setup

    # One device: the benchmark measures a model, not a mesh (conftest's fake devices aside).
    return Setup(bench_config(mixer, length, plan), devices=jax.devices()[:1])


def param_counts(plan: Plan, length: int) -> dict[str, int]:
    """Total parameters per mixer at ``length`` (abstract init only, nothing allocated)."""
    return {m: make_setup(m, length, plan).num_params for m in plan.mixers}


def check_matched(
    counts: dict[str, int], budget: float = MATCH_BUDGET, strict: bool = True
) -> dict[str, float]:
    """Relative deviation of each count from the reference mixer's (from the median when the
    reference is not in the plan). With ``strict``, a deviation beyond ``budget`` raises
    ValueError naming the mixer."""
    ref = counts.get(REFERENCE) or float(np.median(list(counts.values())))
    dev = {m: n / ref - 1.0 for m, n in counts.items()}
    for m, d in dev.items():
        if strict and abs(d) > budget:
            raise ValueError(
                f"mixer {m!r}: {counts[m]:,} parameters, {d:+.1%} from {ref:,.0f}, outside the "
                f"matching budget of {budget:.0%}; adjust MIXER_OPTIONS[{m!r}]"
            )
    return dev


def lm_batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random next-token data shaped like a sequence-labelling batch (values do not affect
    timing)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (batch, length + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "mask": np.ones((batch, length), bool),
        "label": tokens[:, 1:],
        "weights": np.ones((batch, length), np.float32),
        "example_weight": np.ones((batch,), np.float32),
    }


def memory_limit() -> int | None:
    """Bytes the device can hold: the accelerator's limit, else the host's physical memory."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _too_big(mem: dict, plan: Plan, limit: int | None) -> str | None:
    if limit is None or mem["peak_bytes"] is None:
        return None
    if mem["peak_bytes"] > plan.memory_fraction * limit:
        return (
            f"compiled peak {mem['peak_bytes'] / 2**30:.1f} GiB exceeds "
            f"{plan.memory_fraction:.0%} of {limit / 2**30:.1f} GiB"
        )
    return None


def _timing_fields(timing) -> dict:
    return dataclasses.asdict(timing)


def measure_train(mixer: str, length: int, plan: Plan, limit: int | None) -> dict:
    """One training-step measurement (or a record with ``skipped``)."""
    setup = make_setup(mixer, length, plan)
    rec = {"mixer": mixer, "length": length, "batch": plan.batch, "params": setup.num_params}
    state = setup.init_state()
    batch = setup.global_batch(lm_batch(plan.batch, length))
    compiled, compile_s = compile_timed(setup.train_fn(), state, batch)
    mem = memory(compiled)
    reason = _too_big(mem, plan, limit)
    if reason:
        return {**rec, **mem, "compile_s": compile_s, "skipped": reason}
    timing, _ = time_step(compiled, state, batch, repeats=plan.repeats, compile_s=compile_s)
    rec.update(_timing_fields(timing))
    rec["tokens_per_s"] = plan.batch * length / timing.median_s
    return rec


def cache_bytes(model, variables, batch: int, context: int) -> int:
    """Bytes of ``model``'s decoding cache for ``context`` tokens, from its abstract shapes
    (``variables`` may be abstract too: nothing is allocated or compiled)."""
    shapes = jax.eval_shape(
        lambda v: model.apply(v, batch, context, method=model.init_cache), variables
    )
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def decode_cache_bytes(mixer: str, context: int, plan: Plan) -> int:
    """Cache bytes of the benchmarked model with ``mixer`` at ``context`` (abstract only)."""
    setup = make_setup(mixer, context, plan)
    return cache_bytes(setup.model, setup.abstract_state.variables(), plan.batch, context)


def _at_position(cache, position: int):
    """The cache with every integer leaf (the next-position counters) set to ``position``; the
    arrays keep their zeros, which cost the same to read as real keys and values."""

    def put(x):
        if jax.numpy.issubdtype(x.dtype, jax.numpy.integer):
            return jax.numpy.full_like(x, position)
        return x

    return jax.tree.map(put, cache)


def measure_decode(mixer: str, context: int, plan: Plan, limit: int | None) -> dict:
    """Per-token decode latency with a cache for ``context`` tokens, ending at its last slot."""
    from effseq.models import build

    setup = make_setup(mixer, context, plan)
    model = setup.model
    # The model's own initial parameters (no optimizer state: decoding does not train).
    init = functools.partial(build.init_variables, model)
    example = build.example_batch(setup.info)
    variables = nn.unbox(jax.jit(init)(jax.random.key(0), example))
    b = plan.batch
    rec = {"mixer": mixer, "context": context, "batch": b, "params": setup.num_params}
    rec["cache_bytes"] = cache_bytes(model, setup.abstract_state.variables(), b, context)
    calls = plan.decode_calls * (plan.repeats + 1)  # the warm-up run included
    if calls > context:
        raise ValueError(
            f"context={context} is shorter than the {calls} decode steps one measurement "
            "takes; raise the context or lower decode_calls"
        )
    # Start so the last timed token sits at position context - 1.
    cache = jax.jit(
        lambda v: _at_position(model.apply(v, b, context, method=model.init_cache), context - calls)
    )(variables)

    def step(cache, variables, tokens):
        logits, cache = model.apply(variables, tokens, cache, method=model.decode_step)
        return cache, logits

    tokens = jax.numpy.ones((b,), jax.numpy.int32)
    compiled, compile_s = compile_timed(jax.jit(step, donate_argnums=0), cache, variables, tokens)
    mem = memory(compiled)
    reason = _too_big(mem, plan, limit)
    if reason:
        return {**rec, **mem, "compile_s": compile_s, "skipped": reason}
    timing, _ = time_step(
        compiled,
        cache,
        variables,
        tokens,
        repeats=plan.repeats,
        warmup=plan.decode_calls,
        calls_per_run=plan.decode_calls,
        compile_s=compile_s,
    )
    rec.update(_timing_fields(timing))
    return rec


def _projected_s(done: list[dict], length: int) -> float | None:
    """Step time at ``length`` extrapolated from this mixer's measured lengths: the fitted
    exponent (at least 1) from two or more points, else quadratic growth."""
    ok = [r for r in done if "median_s" in r]
    if not ok:
        return None
    last = ok[-1]
    p = 2.0
    if len(ok) >= 2:
        p = max(1.0, loglog_slope([r["length"] for r in ok], [r["median_s"] for r in ok]))
    return last["median_s"] * (length / last["length"]) ** p


def _run_safely(fn, *args) -> dict | None:
    try:
        return fn(*args)
    except (MemoryError, jax.errors.JaxRuntimeError) as e:  # XLA's out-of-memory and kin
        return {"skipped": f"failed: {str(e).splitlines()[0][:160]}"}


def run_train(plan: Plan, limit: int | None, log=print) -> list[dict]:
    records = []
    for mixer in plan.mixers:
        done: list[dict] = []
        for length in plan.lengths:
            label = f"train  {mixer:9s} t={length:<6d}"
            projected = _projected_s(done, length)
            if projected is not None and projected > plan.max_step_s:
                rec = {"mixer": mixer, "length": length, "batch": plan.batch}
                rec["skipped"] = (
                    f"projected step time {projected:.0f} s exceeds --max-step-s "
                    f"{plan.max_step_s:g}"
                )
            else:
                rec = _run_safely(measure_train, mixer, length, plan, limit)
                rec = {"mixer": mixer, "length": length, "batch": plan.batch, **rec}
            done.append(rec)
            records.append(rec)
            if "skipped" in rec:
                log(f"{label} skipped ({rec['skipped']})")
            else:
                log(
                    f"{label} {rec['median_s'] * 1e3:9.1f} ms [{rec['min_s'] * 1e3:.1f}, "
                    f"{rec['max_s'] * 1e3:.1f}]  {rec['tokens_per_s']:9.0f} tok/s  "
                    f"peak {rec['peak_bytes'] / 2**20:.0f} MiB  compile {rec['compile_s']:.1f} s"
                )
    return records


def run_decode(plan: Plan, limit: int | None, log=print) -> list[dict]:
    records = []
    for mixer in plan.mixers:
        for context in plan.contexts:
            rec = _run_safely(measure_decode, mixer, context, plan, limit)
            rec = {"mixer": mixer, "context": context, "batch": plan.batch, **rec}
            records.append(rec)
            label = f"decode {mixer:9s} context={context:<6d}"
            if "skipped" in rec:
                log(f"{label} skipped ({rec['skipped']})")
            else:
                log(
                    f"{label} {rec['median_s'] * 1e3:8.2f} ms/token [{rec['min_s'] * 1e3:.2f}, "
                    f"{rec['max_s'] * 1e3:.2f}]  cache {rec['cache_bytes'] / 2**20:.2f} MiB  "
                    f"compile {rec['compile_s']:.1f} s"
                )
    return records


def _measured(records, mixer, key):
    return [r for r in records if r["mixer"] == mixer and "median_s" in r and key in r]


def growth(train: list[dict], decode: list[dict], mixers) -> list[dict]:
    """Log-log slopes per mixer: training step time over all measured lengths and over
    ``GROWTH_RANGE``; decode latency over all contexts. None where < 2 points."""
    out = []
    lo, hi = GROWTH_RANGE
    for m in mixers:
        row = {"mixer": m}
        pts = [(r["length"], r["median_s"]) for r in _measured(train, m, "length")]
        row["train_lengths"] = [t for t, _ in pts]
        row["train_exponent"] = loglog_slope(*zip(*pts, strict=True)) if len(pts) > 1 else None
        inside = [(t, s) for t, s in pts if lo <= t <= hi]
        row["goal_lengths"] = [t for t, _ in inside]
        row["goal_exponent"] = loglog_slope(*zip(*inside, strict=True)) if len(inside) > 1 else None
        dpts = [(r["context"], r["median_s"]) for r in _measured(decode, m, "context")]
        row["decode_exponent"] = loglog_slope(*zip(*dpts, strict=True)) if len(dpts) > 1 else None
        out.append(row)
    return out


def _find(records, mixer, key, value):
    for r in records:
        if r["mixer"] == mixer and r.get(key) == value and "median_s" in r:
            return r
    return None


def _goal_row(kind: str, mixer: str, goal: str, target: str) -> dict:
    """A goal not yet measured; the caller fills in measured, met (and worst)."""
    return {
        "kind": kind,
        "mixer": mixer,
        "goal": goal,
        "target": target,
        "measured": None,
        "met": None,
    }


def goals(train: list[dict], decode: list[dict], slopes: list[dict]) -> list[dict]:
    """The issue's goals evaluated on this run: met True/False, or None (not measured)."""
    rows = []
    att = _find(train, REFERENCE, "length", SPEEDUP_AT)
    for m in EFFICIENT:
        r = _find(train, m, "length", SPEEDUP_AT)
        row = _goal_row(
            "speedup",
            m,
            f"{m}: training tokens/s at t={SPEEDUP_AT} vs {REFERENCE}",
            f">= {SPEEDUP_TARGET:g}x",
        )
        if r is not None and att is not None:
            row["measured"] = r["tokens_per_s"] / att["tokens_per_s"]
            row["worst"] = att["min_s"] / r["max_s"]  # slowest of m against fastest attention
            row["met"] = bool(row["measured"] >= SPEEDUP_TARGET)
        rows.append(row)
    by_mixer = {s["mixer"]: s for s in slopes}
    for m in EFFICIENT:
        s = by_mixer.get(m, {})
        lengths = s.get("goal_lengths") or []
        span = f"{lengths[0]}..{lengths[-1]}" if lengths else "none measured"
        row = _goal_row(
            "growth",
            m,
            f"{m}: training time growth exponent, t={GROWTH_RANGE[0]}..{GROWTH_RANGE[1]}"
            f" (measured over {span})",
            f"<= {GROWTH_TARGET:g}",
        )
        row["measured"] = s.get("goal_exponent")
        if row["measured"] is not None:
            row["met"] = bool(row["measured"] <= GROWTH_TARGET)
            row["partial"] = lengths[-1] < GROWTH_RANGE[1] or lengths[0] > GROWTH_RANGE[0]
        rows.append(row)
    lo, hi = DECODE_RANGE
    for m in CONSTANT_STATE:
        a, b = _find(decode, m, "context", hi), _find(decode, m, "context", lo)
        row = _goal_row(
            "decode",
            m,
            f"{m}: decode latency per token, context {hi} / context {lo}",
            f"<= {DECODE_TARGET:g}x",
        )
        if a is not None and b is not None:
            row["measured"] = a["median_s"] / b["median_s"]
            row["worst"] = a["max_s"] / b["min_s"]
            row["met"] = bool(row["measured"] <= DECODE_TARGET)
        rows.append(row)
    return rows


FLA_MAX_LENGTH = 2048  # fla's CPU path is a Python loop over time: keep it to short lengths
FLA_MATCH_REL = 1e-2  # relative RMS error under which fla's output matches effseq's


def _gla_shapes(plan: Plan, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(q/k/log_g shape, v shape) of the GLA layer the model runs: 4 heads, expand_k 0.5."""
    heads = 4
    return (plan.batch, length, heads, plan.d_model // 2 // heads), (
        plan.batch,
        length,
        heads,
        plan.d_model // heads,
    )


def _gla_inputs(key_shape, v_shape, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal(key_shape, np.float32) for _ in range(2))
    v = rng.standard_normal(v_shape, np.float32)
    log_g = np.log(1 / (1 + np.exp(-rng.standard_normal(key_shape)))).astype(np.float32) / 16
    return q, k, v, log_g


def _fla_gla(torch, fla_fn, layout: str, device: str = "cpu"):
    """fla's op on (b, t, h, k) numpy inputs: 'bthk' passes them as they are, 'bhtk' transposes
    to fla's older head-first layout (and the output back). Returns ``(output, seconds)``: the
    time of the op (and its backward with ``grad``) alone, inputs already on ``device`` and the
    GPU waited for at both ends."""

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def call(q, k, v, g, grad: bool):
        ts = [torch.tensor(x, device=device, requires_grad=grad) for x in (q, k, v, g)]
        sync()
        start = time.perf_counter()
        args = ts if layout == "bthk" else [x.transpose(1, 2) for x in ts]
        o = fla_fn(*args)
        o = o[0] if isinstance(o, tuple) else o
        o = o if layout == "bthk" else o.transpose(1, 2)
        if grad:
            o.sum().backward()
        sync()
        return o, time.perf_counter() - start

    return call


def _fla_device(torch) -> str:
    """Where fla runs: the GPU when JAX runs on one too (so both time the same kind of device),
    else the CPU."""
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _gla_loss(*args):
    from effseq import ops

    return ops.gated_linear_attention(*args)[0].sum()


def fla_comparison(plan: Plan, lengths) -> dict:
    """GLA's op (forward + backward) against flash-linear-attention on the model's GLA shapes,
    when torch and fla are importable; otherwise a record saying why not. fla runs on the GPU
    when JAX does (its Triton kernels, every benchmarked length), else on the CPU (its CPU path
    is a Python loop, so lengths up to ``FLA_MAX_LENGTH`` only).

    fla's layout changed between releases, so the layout used is the one whose output matches
    effseq's reference on a small input (neither matching: skipped, nothing timed). The match
    is a relative RMS error under ``FLA_MATCH_REL``: loose enough for TF32 matrix products on a
    GPU, far below the O(1) error of a wrong layout. The naive path is a Python loop over time
    on any device, so it is timed up to ``FLA_MAX_LENGTH`` only."""
    try:
        import torch
        from fla.ops import gla as fla_gla
    except Exception as e:  # ImportError, or fla failing at import without a GPU
        return {"skipped": f"torch / fla not importable ({type(e).__name__}: {e})"}
    # The naive path moved from fla.ops.gla to fla.ops.gla.naive (fla 0.6 exports only the
    # Triton ops); either may be missing.
    try:
        from fla.ops.gla.naive import naive_recurrent_gla
    except ImportError:
        naive_recurrent_gla = getattr(fla_gla, "naive_recurrent_gla", None)
    paths = [("chunk_gla", getattr(fla_gla, "chunk_gla", None))]
    paths.append(("naive_recurrent_gla", naive_recurrent_gla))
    import jax.numpy as jnp

    from effseq import ops

    device = _fla_device(torch)
    small = _gla_inputs(*_gla_shapes(dataclasses.replace(plan, batch=1), 37), seed=1)
    with jax.default_matmul_precision("highest"):  # float32 truth on any backend
        want = np.asarray(ops.gated_linear_attention_reference(*map(jnp.asarray, small))[0])
    chosen, notes = None, []
    for name, fn in paths:
        if fn is None:
            notes.append(f"{name}: not in this fla")
            continue
        for layout in ("bthk", "bhtk"):
            call = _fla_gla(torch, fn, layout, device)
            try:
                got = call(*small, grad=False)[0].detach().cpu().numpy()
            except Exception as e:  # Triton kernels do not run on CPU
                notes.append(f"{name}/{layout}: {type(e).__name__}")
                continue
            if got.shape != want.shape:
                notes.append(f"{name}/{layout}: output shape {got.shape}, expected {want.shape}")
                continue
            rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            if rel <= FLA_MATCH_REL:
                chosen = (name, layout, call, rel)
                break
            notes.append(f"{name}/{layout}: output differs from effseq's reference (rel {rel:.2g})")
        if chosen:
            break
    if chosen is None:
        return {
            "skipped": f"no fla GLA path matched on {device}: " + "; ".join(notes),
            "device": device,
        }
    name, layout, call, match_rel = chosen
    long_ok = device != "cpu" and name != "naive_recurrent_gla"
    records = []
    error = None
    try:
        for length in [t for t in lengths if long_ok or t <= FLA_MAX_LENGTH]:
            inputs = _gla_inputs(*_gla_shapes(plan, length))
            times = []
            for i in range(plan.repeats + 1):
                _, seconds = call(*inputs, grad=True)
                if i:  # the first call is the warm-up
                    times.append(seconds)
            ours = time_jitted(
                jax.grad(_gla_loss, argnums=(0, 1, 2, 3)),
                *map(jnp.asarray, inputs),
                repeats=plan.repeats,
            )
            fla_median = float(np.median(times))
            records.append(
                {
                    "length": length,
                    "fla_median_s": fla_median,
                    "effseq_median_s": ours.median_s,
                    "fla_over_effseq": fla_median / ours.median_s,
                }
            )
    except Exception as e:  # e.g. out of memory at a long length: keep what was measured
        error = f"{type(e).__name__}: {e}"[:300]
    return {
        "fla_path": name,
        "layout": layout,
        "match_rel_error": match_rel,
        "device": device,
        "torch": torch.__version__,
        "records": records,
        **({"error": error} if error else {}),
    }


# --- rendering ---------------------------------------------------------------------------------


def _mib(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


TRAIN_COLUMNS = (
    "mixer",
    "params",
    "t",
    "step ms (median)",
    "min",
    "max",
    "tokens/s",
    "peak MiB",
    "compile s",
)
DECODE_COLUMNS = (
    "mixer",
    "context",
    "ms/token (median)",
    "min",
    "max",
    "cache MiB",
    "peak MiB",
    "compile s",
)


def _table(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(result: dict) -> str:
    prov, plan = result["provenance"], result["plan"]
    lines = [
        f"Measured {prov['date']} on {prov['backend']} ({prov['device_kind']}, "
        f"{prov['cpu_count']} cores), jax {prov['jax']}, commit {prov['git_commit']}"
        f"{' (dirty)' if prov['git_dirty'] else ''}. LanguageModel, {plan['n_layers']} layers, "
        f"width {plan['d_model']}, vocabulary {VOCAB}, batch {plan['batch']}, float32; median "
        f"of {plan['repeats']} runs after AOT compile and warm-up. Peak memory: arguments + "
        "outputs + temporaries - donated aliases (XLA memory analysis).",
        "",
        "**parameters** (matched within "
        f"{MATCH_BUDGET:.0%} of {REFERENCE}; per-mixer options: {MIXER_OPTIONS or 'none'})",
        "",
    ]
    rows = []
    for m, by_len in result["params"].items():
        counts = sorted(set(by_len.values()))
        shown = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} .. {counts[-1]:,}"
        dev = [result["param_deviation"][t][m] for t in result["param_deviation"]]
        rows.append((m, shown, f"{min(dev):+.1%} .. {max(dev):+.1%}"))
    lines += _table(("mixer", "params", f"vs {REFERENCE}"), rows)

    lines += ["**training step** (forward + backward + AdamW update)", ""]
    rows = []
    for r in result["train"]:
        if "skipped" in r:
            skip = f"skipped ({r['skipped']})"
            rows.append((r["mixer"], _num(r.get("params"), ","), r["length"], skip, *"-" * 5))
            continue
        rows.append(
            (
                r["mixer"],
                f"{r['params']:,}",
                r["length"],
                f"{r['median_s'] * 1e3:.1f}",
                f"{r['min_s'] * 1e3:.1f}",
                f"{r['max_s'] * 1e3:.1f}",
                f"{r['tokens_per_s']:.0f}",
                _mib(r["peak_bytes"]),
                f"{r['compile_s']:.1f}",
            )
        )
    lines += _table(TRAIN_COLUMNS, rows)

    lines += ["**decoding** (one token per step, cache donated; cache sized for the context)", ""]
    rows = []
    for r in result["decode"]:
        if "skipped" in r:
            skip = f"skipped ({r['skipped']})"
            cache = _mib(r.get("cache_bytes"))
            rows.append((r["mixer"], r["context"], skip, "-", "-", cache, "-", "-"))
            continue
        rows.append(
            (
                r["mixer"],
                r["context"],
                f"{r['median_s'] * 1e3:.2f}",
                f"{r['min_s'] * 1e3:.2f}",
                f"{r['max_s'] * 1e3:.2f}",
                _mib(r["cache_bytes"]),
                _mib(r["peak_bytes"]),
                f"{r['compile_s']:.1f}",
            )
        )
    lines += _table(DECODE_COLUMNS, rows)

    lines += ["**growth exponents** (log-log slope of time against length)", ""]
    rows = [
        (
            s["mixer"],
            _num(s["train_exponent"], ".2f"),
            _num(s["goal_exponent"], ".2f"),
            ", ".join(map(str, s["goal_lengths"])) or "-",
            _num(s["decode_exponent"], ".2f"),
        )
        for s in result["growth"]
    ]
    lines += _table(
        ("mixer", "train, all t", f"train, t in {GROWTH_RANGE}", "lengths fitted", "decode"), rows
    )

    lines += ["**goals**", ""]
    rows = []
    for g in result["goals"]:
        met = {True: "yes", False: "**no**", None: "not evaluated"}[g["met"]]
        if g.get("partial"):
            met += " (partial range)"
        measured = "not measured" if g["measured"] is None else f"{g['measured']:.2f}"
        rows.append((g["goal"], g["target"], measured, _num(g.get("worst"), ".2f"), met))
    lines += _table(("goal", "target", "measured", "worst", "met"), rows)
    fla = result.get("fla")
    if fla is not None:
        where = fla.get("device", "cpu").upper()
        lines += [f"**flash-linear-attention (GLA op, {where})**: " + json.dumps(fla), ""]
    return "\n".join(lines)


# --- entry point -------------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(","))
    unknown = [n for n in names if n not in MIXERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mixer(s) {unknown}; known: {', '.join(MIXERS)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="effseq bench", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--plan", choices=sorted(PLANS) + ["small", "gpu"], default="quick")
    p.add_argument("--mixers", type=_names, help="comma-separated subset of " + ",".join(MIXERS))
    p.add_argument("--lengths", type=positive_ints, help="training lengths, e.g. 1024,2048")
    p.add_argument("--contexts", type=positive_ints, help="decoding contexts, e.g. 1024,16384")
    p.add_argument("--batch", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--repeats", type=int, help="timed runs per measurement (>= 5)")
    p.add_argument("--decode-calls", type=int, help="decode steps per timed run")
    p.add_argument("--max-step-s", type=float, help="skip lengths projected to take longer")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", type=pathlib.Path, help="results folder")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 5:
        p.error(f"--repeats must be at least 5 for a median worth reporting, got {args.repeats}")
    for name in ("batch", "d_model", "layers", "decode_calls"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def plan_from_args(args) -> Plan:
    changes = {
        "mixers": args.mixers,
        "lengths": args.lengths,
        "contexts": args.contexts,
        "batch": args.batch,
        "d_model": args.d_model,
        "n_layers": args.layers,
        "repeats": args.repeats,
        "decode_calls": args.decode_calls,
        "max_step_s": args.max_step_s,
    }
    return dataclasses.replace(PLANS[args.plan], **{k: v for k, v in changes.items() if v})


def run(plan: Plan, *, train: bool = True, decode: bool = True, log=print) -> dict:
    """Every measurement of ``plan`` -> the result dict (what the JSON file holds)."""
    prov = provenance()
    limit = memory_limit()
    lengths = sorted(set(plan.lengths) | set(plan.contexts))
    params = {m: {} for m in plan.mixers}
    deviation = {}
    # The options are matched at the benchmark's model size; other sizes (tests, experiments)
    # report their deviations without stopping.
    standard = (plan.d_model, plan.n_layers) == (PLANS["full"].d_model, PLANS["full"].n_layers)
    for t in lengths:
        counts = param_counts(plan, t)
        deviation[t] = check_matched(counts, strict=standard)
        for m, n in counts.items():
            params[m][t] = n
    worst = max(abs(d) for by_mixer in deviation.values() for d in by_mixer.values())
    if worst > MATCH_BUDGET:
        log(f"warning: parameter counts differ by up to {worst:.0%} at this model size")
    log(
        f"effseq bench on {prov['backend']} ({prov['device_kind']}, {prov['cpu_count']} "
        f"cores); memory limit {_mib(limit)} MiB; params at t={lengths[-1]}: "
        + ", ".join(f"{m} {params[m][lengths[-1]]:,}" for m in plan.mixers)
    )
    start = time.perf_counter()
    train_records = run_train(plan, limit, log) if train else []
    decode_records = run_decode(plan, limit, log) if decode else []
    slopes = growth(train_records, decode_records, plan.mixers)
    return {
        "provenance": prov,
        "plan": dataclasses.asdict(plan),
        "task": TASK,
        "vocab_size": VOCAB,
        "mixer_options": MIXER_OPTIONS,
        "memory_limit_bytes": limit,
        "params": params,
        "param_deviation": deviation,
        "params_matched": worst <= MATCH_BUDGET,
        "train": train_records,
        "decode": decode_records,
        "growth": slopes,
        "goals": goals(train_records, decode_records, slopes),
        "fla": fla_comparison(plan, plan.lengths) if train else None,
        "wall_s": time.perf_counter() - start,
    }


def write(result: dict, out: pathlib.Path, plots: bool = True) -> list[pathlib.Path]:
    """models.json, models.md and (with ``plots``) the log-log figures in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "models.json", out / "models.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    if plots:
        from effseq.benchmarks.plots import plot_models

        paths += plot_models(result, out)
    return paths


def _wants_plan(argv, name: str) -> bool:
    args = list(sys.argv[1:] if argv is None else argv)
    return f"--plan={name}" in args or any(
        a == "--plan" and b == name for a, b in zip(args, args[1:], strict=False)
    )


def main(argv=None) -> int:
    if _wants_plan(argv, "small"):  # the default suite's small models: small.py
        from effseq.benchmarks import small

        return small.main(argv)
    if _wants_plan(argv, "gpu"):  # every mixer's op at GPU shapes vs cuDNN attention: gpu.py
        from effseq.benchmarks import gpu

        return gpu.main(argv)
    args = parse_args(argv)
    plan = plan_from_args(args)
    out = args.out or (RESULTS if args.plan == "full" else QUICK_RESULTS)
    result = run(plan, train=not args.skip_train, decode=not args.skip_decode)
    paths = write(result, out, plots=not args.no_plots)
    print()
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
