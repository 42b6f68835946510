"""Speed and memory of the effseq.ops kernels against plain baselines, versus sequence length.

    python -m effseq.benchmarks.ops          # the goal sizes only (`make bench-ops`), minutes
    python -m effseq.benchmarks.ops --full   # every op at t = 1k..16k (`make bench`), longer

Every mixer runs at width 256 (4 heads x 64 for GLA, SSD, the gated delta rule, Based and
attention), batch 2, float32. The RG-LRU and Based layers have no op of their own: their rows
time the op calls their layers make (``linear_scan``; ``gated_linear_attention`` on Taylor
features). Baselines implemented here or beside each op: the direct Vandermonde product
(``s4d_kernel_reference``), a plain per-step ``lax.scan`` (``selective_scan_reference``,
``gated_linear_attention_reference``, ``gated_delta_rule_reference``) and XLA softmax attention
(``impl="xla"``).
``--full`` writes ``benchmarks/results/ops.json`` (with provenance) and ``ops.md``, the figures
the README shows (paths relative to the working directory: run it from the checkout root, or
pass ``--out``); the quick run writes ``results/ops/ops_quick.{json,md}`` (not tracked).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp

from effseq import ops
from effseq.benchmarks.timing import provenance, time_jitted

# Relative to the working directory: the checkout root holds the committed results.
RESULTS = pathlib.Path("benchmarks/results")
BATCH, HEADS, HEAD_DIM = 2, 4, 64
WIDTH = HEADS * HEAD_DIM
# Attention's (b, h, t, t) float32 scores: 8 GiB at t = 16k, more than fits with its backward.
ATTENTION_MAX_T = 8192


def _normal(key, shape, scale=1.0):
    return jax.random.normal(key, shape, jnp.float32) * scale


def _complex(key, shape):
    k1, k2 = jax.random.split(key)
    return (_normal(k1, shape) + 1j * _normal(k2, shape)).astype(jnp.complex64) * 0.5


def _s4d_params(h, n, key):
    k = jax.random.split(key, 3)
    log_dt = jax.random.uniform(k[0], (h,), minval=math.log(1e-3), maxval=math.log(1e-1))
    A = jnp.broadcast_to(-0.5 + 1j * jnp.pi * jnp.arange(n), (h, n)).astype(jnp.complex64)
    return log_dt, A, _complex(k[1], (h, n)), _complex(k[2], (h, n))


# Each case: t -> (function of arrays, argument arrays). fwd+bwd differentiates sum(output)
# w.r.t. every argument.
def case_s4d(t):
    key = jax.random.key(0)
    params = _s4d_params(WIDTH, 32, key)
    u = _normal(jax.random.fold_in(key, 1), (BATCH, t, WIDTH))
    return (lambda u, *p: ops.causal_conv(u, ops.s4d_kernel(*p, t))), (u, *params)


def case_sgconv(t):
    d = 64
    scales = 1
    while ops.sgconv_length(scales, d) < t:  # enough scales to cover t
        scales += 1
    key = jax.random.key(1)
    w = _normal(key, (scales, WIDTH, d), 0.1)
    u = _normal(jax.random.fold_in(key, 1), (BATCH, t, WIDTH))
    return (lambda u, w: ops.causal_conv(u, ops.sgconv_kernel(w, t))), (u, w)


def _selective_inputs(t, d, n, key):
    k = jax.random.split(key, 6)
    u = _normal(k[0], (BATCH, t, d))
    delta = jax.nn.softplus(_normal(k[1], (BATCH, t, d)) - 4.0)
    A = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n))
    return (
        u,
        delta,
        A,
        _normal(k[2], (BATCH, t, n)),
        _normal(k[3], (BATCH, t, n)),
        _normal(k[4], (d,)),
    )


def case_selective_scan(t, d=WIDTH, n=16, impl=None):
    args = _selective_inputs(t, d, n, jax.random.key(2))
    return (lambda *a: ops.selective_scan(*a, impl=impl)[0]), args


def case_selective_scan_baseline(t, d=WIDTH, n=16):
    args = _selective_inputs(t, d, n, jax.random.key(2))
    return (lambda *a: ops.selective_scan_reference(*a)[0]), args


def _gla_inputs(t, key):
    k = jax.random.split(key, 4)
    shape = (BATCH, t, HEADS, HEAD_DIM)
    log_g = jax.nn.log_sigmoid(_normal(k[3], shape)) / 16
    return _normal(k[0], shape), _normal(k[1], shape), _normal(k[2], shape), log_g


def case_gla(t):
    return (lambda *a: ops.gated_linear_attention(*a)[0]), _gla_inputs(t, jax.random.key(3))


def case_gla_baseline(t):
    args = _gla_inputs(t, jax.random.key(3))
    return (lambda *a: ops.gated_linear_attention_reference(*a)[0]), args


def case_gla_recurrent(t):
    args = _gla_inputs(t, jax.random.key(3))
    return (lambda *a: ops.gated_linear_attention(*a, impl="recurrent")[0]), args


def _ssd_inputs(t, key, n=HEAD_DIM):
    # State per head p x n = 64 x 64, GLA's dk x dv: the equal-state-size comparison.
    k = jax.random.split(key, 5)
    x = _normal(k[0], (BATCH, t, HEADS, HEAD_DIM))
    dt = jax.nn.softplus(_normal(k[1], (BATCH, t, HEADS)) - 4.0)
    A = -jax.random.uniform(k[2], (HEADS,), minval=1.0, maxval=16.0)
    B, C = _normal(k[3], (BATCH, t, 1, n)), _normal(k[4], (BATCH, t, 1, n))
    return x, dt, A, B, C, jnp.ones((HEADS,))


def case_ssd(t):
    return (lambda *a: ops.ssd(*a)[0]), _ssd_inputs(t, jax.random.key(6))


def _delta_inputs(t, key, per_channel=False):
    k = jax.random.split(key, 5)
    shape = (BATCH, t, HEADS, HEAD_DIM)

    def unit(z):  # the layer L2-normalises keys and queries
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    gate_shape = shape if per_channel else shape[:3]
    log_g = jax.nn.log_sigmoid(_normal(k[3], gate_shape) + 3.0)
    beta = jax.nn.sigmoid(_normal(k[4], shape[:3]))
    return unit(_normal(k[0], shape)), unit(_normal(k[1], shape)), _normal(k[2], shape), log_g, beta


def case_delta_rule(t, per_channel=False, impl=None):
    args = _delta_inputs(t, jax.random.key(7), per_channel)
    return (lambda *a: ops.gated_delta_rule(*a, impl=impl)[0]), args


def case_delta_rule_baseline(t):
    args = _delta_inputs(t, jax.random.key(7))
    return (lambda *a: ops.gated_delta_rule_reference(*a)[0]), args


def case_rglru(t):
    # The RG-LRU layer's recurrence: a diagonal linear scan over width 256 (no op of its own).
    k = jax.random.split(jax.random.key(8), 2)
    log_a = -8.0 * jax.nn.softplus(_normal(k[0], (BATCH, t, WIDTH)) - 4.0) * 0.5
    b = _normal(k[1], (BATCH, t, WIDTH))
    return (lambda log_a, b: ops.linear_scan(jnp.exp(log_a), b)[0]), (log_a, b)


def case_based(t, f=16):
    # The Based layer's attention: causal linear attention on Taylor features (1 + f + f^2 =
    # 273 per head at f = 16), values with the normaliser's column of ones appended.
    from effseq.layers.based import taylor_features

    k = jax.random.split(jax.random.key(9), 3)
    q, kk = _normal(k[0], (BATCH, t, HEADS, f)), _normal(k[1], (BATCH, t, HEADS, f))
    v = _normal(k[2], (BATCH, t, HEADS, HEAD_DIM))

    def fn(q, kk, v):
        fq, fk = taylor_features(q), taylor_features(kk)
        v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1))], -1)
        o, _ = ops.gated_linear_attention(fq, fk, v1, jnp.zeros_like(fk), scale=1.0)
        return o[..., :-1] / (o[..., -1:] + 1e-6)

    return fn, (q, kk, v)


def case_attention(t):
    k = jax.random.split(jax.random.key(4), 3)
    shape = (BATCH, t, HEADS, HEAD_DIM)
    args = tuple(_normal(kk, shape) for kk in k)
    return (lambda q, k, v: ops.attention(q, k, v, causal=True, impl="xla")), args


def case_s4d_kernel(t):
    params = _s4d_params(256, 32, jax.random.key(5))
    return (lambda *p: ops.s4d_kernel(*p, t)), params


def case_s4d_kernel_vandermonde(t):
    params = _s4d_params(256, 32, jax.random.key(5))
    return (lambda *p: ops.s4d_kernel_reference(*p, t)), params


# name -> (builder, description). Mixers first: they form the main table.
CASES: dict[str, tuple[Callable, str]] = {
    "s4d": (case_s4d, "S4D kernel (n=32) + FFT conv, h=256"),
    "sgconv": (case_sgconv, "SGConv kernel (d=64) + FFT conv, h=256"),
    "selective_scan": (case_selective_scan, "selective_scan chunked, d=256, n=16"),
    "gla": (case_gla, "GLA chunked, 4 heads x 64"),
    "ssd": (case_ssd, "SSD chunked (Mamba-2), 4 heads x 64, n=64"),
    "gated_delta_rule": (case_delta_rule, "gated delta rule chunked (GDN), 4 heads x 64"),
    "rglru": (case_rglru, "RG-LRU's linear_scan, d=256"),
    "based": (case_based, "Based: GLA op on Taylor features (f=16), 4 heads x 64"),
    "attention": (case_attention, "causal softmax attention (XLA), 4 heads x 64"),
    "gla/lax.scan": (case_gla_baseline, "baseline: GLA step-by-step lax.scan, plain autodiff"),
    "gla/recurrent": (case_gla_recurrent, "GLA impl='recurrent': steps, remat per segment"),
    "gated_delta_rule/lax.scan": (
        case_delta_rule_baseline,
        "baseline: gated delta rule step-by-step lax.scan, plain autodiff",
    ),
    "gated_delta_rule/recurrent": (
        lambda t: case_delta_rule(t, impl="recurrent"),
        "gated delta rule impl='recurrent': steps, remat per segment",
    ),
    "gated_delta_rule/kda": (
        lambda t: case_delta_rule(t, per_channel=True),
        "gated delta rule chunked, one gate per key channel (KDA)",
    ),
    "selective_scan/d512": (
        lambda t: case_selective_scan(t, d=512),
        "selective_scan chunked, d=512, n=16",
    ),
    "selective_scan/d512/lax.scan": (
        lambda t: case_selective_scan_baseline(t, d=512),
        "baseline: per-step lax.scan, d=512, n=16",
    ),
    "s4d_kernel": (case_s4d_kernel, "s4d_kernel (split Vandermonde), h=256, n=32"),
    "s4d_kernel/vandermonde": (case_s4d_kernel_vandermonde, "baseline: direct Vandermonde"),
}
MIXERS = [
    "s4d",
    "sgconv",
    "selective_scan",
    "gla",
    "ssd",
    "gated_delta_rule",
    "rglru",
    "based",
    "attention",
]

# What the quick run measures: exactly the sizes the goals are stated at.
QUICK_PLAN = (
    [(name, t, mode) for name in MIXERS for t in (2048, 4096, 8192) for mode in ("fwd", "fwd_bwd")]
    + [(n, 4096, "fwd_bwd") for n in ("gla/lax.scan", "gla/recurrent")]
    + [
        (n, 4096, "fwd_bwd")
        for n in ("gated_delta_rule/lax.scan", "gated_delta_rule/recurrent", "gated_delta_rule/kda")
    ]
    + [(n, 4096, "fwd_bwd") for n in ("selective_scan/d512", "selective_scan/d512/lax.scan")]
    + [(n, 16384, "fwd") for n in ("s4d_kernel", "s4d_kernel/vandermonde")]
)
FULL_LENGTHS = (1024, 2048, 4096, 8192, 16384)


def full_plan():
    return [(name, t, mode) for name in CASES for t in FULL_LENGTHS for mode in ("fwd", "fwd_bwd")]


def measure(name: str, t: int, mode: str, repeats: int) -> dict:
    builder, _ = CASES[name]
    fn, args = builder(t)
    if mode == "fwd_bwd":
        fwd = fn
        argnums = tuple(range(len(args)))
        fn = jax.value_and_grad(lambda *a: jnp.sum(fwd(*a)), argnums=argnums)
    timing = time_jitted(fn, *args, repeats=repeats)
    return {"op": name, "t": t, "mode": mode, **timing.__dict__}


def _lookup(records, name, t, mode):
    for r in records:
        if (r["op"], r["t"], r["mode"]) == (name, t, mode) and "median_s" in r:
            return r
    return None


def goals(records) -> list[dict]:
    """The issue's speed and memory goals, evaluated on this run's numbers."""
    out = []

    def ratio(goal, target, num, den, key="median_s"):
        """num / den, at least ``target`` (None: reported, not a goal). For times, 'worst' pits
        the baseline's fastest run against the op's slowest."""
        a, b = _lookup(records, *num), _lookup(records, *den)
        row = {"goal": goal, "target": target, "measured": None, "worst": None, "met": None}
        if a is not None and b is not None:
            row["measured"] = a[key] / b[key]
            if key == "median_s":
                row["worst"] = a["min_s"] / b["max_s"]
            if target is not None:
                row["met"] = bool(row["measured"] >= target)
        out.append(row)

    ratio(
        "s4d_kernel h=256 n=32 l=16384: speed-up over direct Vandermonde (fwd)",
        10.0,
        ("s4d_kernel/vandermonde", 16384, "fwd"),
        ("s4d_kernel", 16384, "fwd"),
    )
    ratio(
        "selective_scan b=2 t=4096 d=512 n=16 fwd+bwd: speed-up over lax.scan",
        1.0,
        ("selective_scan/d512/lax.scan", 4096, "fwd_bwd"),
        ("selective_scan/d512", 4096, "fwd_bwd"),
    )
    ratio(
        "selective_scan same size: lax.scan temp memory / chunked temp memory",
        8.0,
        ("selective_scan/d512/lax.scan", 4096, "fwd_bwd"),
        ("selective_scan/d512", 4096, "fwd_bwd"),
        key="temp_bytes",
    )
    ratio(
        "GLA b=2 t=4096 h=4 dk=dv=64 fwd+bwd: speed-up over the step-by-step lax.scan",
        3.0,
        ("gla/lax.scan", 4096, "fwd_bwd"),
        ("gla", 4096, "fwd_bwd"),
    )
    ratio(
        "GLA same size: speed-up over impl='recurrent' (segment remat; for reference)",
        None,
        ("gla/recurrent", 4096, "fwd_bwd"),
        ("gla", 4096, "fwd_bwd"),
    )
    ratio(
        "gated_delta_rule b=2 t=4096 h=4 dk=dv=64 fwd+bwd: speed-up over its step-by-step lax.scan",
        3.0,
        ("gated_delta_rule/lax.scan", 4096, "fwd_bwd"),
        ("gated_delta_rule", 4096, "fwd_bwd"),
    )
    ratio(
        "gated_delta_rule same size: speed-up over impl='recurrent' (for reference)",
        None,
        ("gated_delta_rule/recurrent", 4096, "fwd_bwd"),
        ("gated_delta_rule", 4096, "fwd_bwd"),
    )
    ratio(
        "gated_delta_rule same size: per-channel (KDA) gates' time / per-head (for reference)",
        None,
        ("gated_delta_rule/kda", 4096, "fwd_bwd"),
        ("gated_delta_rule", 4096, "fwd_bwd"),
    )
    ratio(
        "ssd t=4096 fwd+bwd, state 64 x 64 per head: speed-up over GLA at equal state size",
        1.0,
        ("gla", 4096, "fwd_bwd"),
        ("ssd", 4096, "fwd_bwd"),
    )
    speedups = (
        ("s4d", 10.0),
        ("sgconv", 10.0),
        ("gla", 10.0),
        ("selective_scan", 5.0),
        ("ssd", 10.0),
        ("gated_delta_rule", 5.0),
        ("rglru", None),
        ("based", None),
    )
    for name, target in speedups:
        ratio(
            f"{name} t=4096 fwd+bwd: speed-up over causal softmax attention",
            target,
            ("attention", 4096, "fwd_bwd"),
            (name, 4096, "fwd_bwd"),
        )
    for name in MIXERS:
        target = 6.0 if name != "attention" else None
        a, b = _lookup(records, name, 8192, "fwd_bwd"), _lookup(records, name, 2048, "fwd_bwd")
        row = {
            "goal": f"{name} fwd+bwd time growth t=2048 -> 8192"
            + (" (for reference)" if target is None else ""),
            "target": target,
            "measured": None,
            "worst": None,
            "met": None,
            "at_most": True,
        }
        if a is not None and b is not None:
            row["measured"] = a["median_s"] / b["median_s"]
            row["worst"] = a["max_s"] / b["min_s"]
            if target is not None:
                row["met"] = bool(row["measured"] <= target)
        out.append(row)
    return out


def _fmt_ms(r):
    if r is None:
        return "-"
    if "error" in r:
        return "skipped"
    return f"{r['median_s'] * 1e3:.1f}"


def _fmt_mb(r):
    if r is None or r.get("temp_bytes") is None:
        return "-"
    return f"{r['temp_bytes'] / 2**20:.0f}"


def markdown(records, goal_rows, prov) -> str:
    lengths = sorted({r["t"] for r in records})
    names = [n for n in CASES if any(r["op"] == n for r in records)]
    lines = [
        f"Measured {prov['date']} on {prov['backend']} ({prov['device_kind']}, "
        f"{prov['cpu_count']} cores), jax {prov['jax']}; float32, batch {BATCH}. "
        "Median of the runs in ms; temporary memory (MiB) from XLA's memory analysis.",
        "",
    ]
    for mode, title in (("fwd", "forward"), ("fwd_bwd", "forward + backward")):
        rows = [n for n in names if any(r["op"] == n and r["mode"] == mode for r in records)]
        if not rows:
            continue
        lines += [f"**{title}** (ms, temp MiB)", ""]
        lines.append("| op | " + " | ".join(f"t={t}" for t in lengths) + " |")
        lines.append("|---|" + "---|" * len(lengths))
        for n in rows:
            cells = []
            for t in lengths:
                r = _lookup(records, n, t, mode) or next(
                    (x for x in records if (x["op"], x["t"], x["mode"]) == (n, t, mode)), None
                )
                cells.append("-" if r is None else f"{_fmt_ms(r)} ({_fmt_mb(r)})")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "**goals** (ratios of medians; 'worst' pits the slowest run of the op against the "
        "fastest of its baseline)",
        "",
        "| goal | target | measured | worst | met |",
        "|---|---|---|---|---|",
    ]
    for g in goal_rows:
        if g["target"] is None:
            target, met = "-", "-"
        else:
            target = f"<= {g['target']:g}x" if g.get("at_most") else f">= {g['target']:g}x"
            met = {True: "yes", False: "**no**", None: "**not evaluated**"}[g["met"]]
        measured = "not measured" if g["measured"] is None else f"{g['measured']:.2f}x"
        worst = "-" if g["worst"] is None else f"{g['worst']:.2f}x"
        lines.append(f"| {g['goal']} | {target} | {measured} | {worst} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every op at t = 1k..16k")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (>= 5)")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help=f"results folder (default: {RESULTS} with --full, else results/ops, untracked)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="restrict to these op names")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 for a median worth reporting")

    plan = full_plan() if args.full else QUICK_PLAN
    if args.out is None:
        args.out = RESULTS if args.full else pathlib.Path("results/ops")
    if args.only:
        unknown = sorted(set(args.only) - set(CASES))
        if unknown:
            parser.error(f"unknown op(s) {unknown}; known: {', '.join(CASES)}")
        plan = [p for p in plan if p[0] in args.only]
    prov = provenance()
    print(
        f"effseq.benchmarks.ops: {len(plan)} cases on {prov['backend']} ({prov['cpu_count']} cores)"
    )
    records = []
    for i, (name, t, mode) in enumerate(plan, 1):
        label = f"[{i}/{len(plan)}] {name:30s} t={t:<6d} {mode:8s}"
        if name == "attention" and t > ATTENTION_MAX_T:
            records.append({"op": name, "t": t, "mode": mode, "error": "O(t^2) memory"})
            print(f"{label} skipped (O(t^2) scores do not fit)", flush=True)
            continue
        try:
            rec = measure(name, t, mode, args.repeats)
        except (MemoryError, jax.errors.JaxRuntimeError) as e:  # XLA's out-of-memory
            records.append({"op": name, "t": t, "mode": mode, "error": str(e)[:200]})
            print(f"{label} failed: {str(e)[:120]}", flush=True)
            continue
        records.append(rec)
        mem = "-" if rec["temp_bytes"] is None else f"{rec['temp_bytes'] / 2**20:.0f} MiB"
        print(
            f"{label} {rec['median_s'] * 1e3:9.1f} ms  [{rec['min_s'] * 1e3:.1f}, "
            f"{rec['max_s'] * 1e3:.1f}]  compile {rec['compile_s']:.1f} s  temp {mem}",
            flush=True,
        )
    goal_rows = goals(records)
    table = markdown(records, goal_rows, prov)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.full else "_quick"
    result = {"provenance": prov, "full": args.full, "records": records, "goals": goal_rows}
    (args.out / f"ops{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"ops{suffix}.md").write_text(table)
    print()
    print(table)
    print(f"wrote {args.out / f'ops{suffix}.json'} and {args.out / f'ops{suffix}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
