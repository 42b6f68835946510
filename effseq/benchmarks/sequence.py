"""Sequence parallelism: per-device memory and step time against sequence length, per mixer.

For every mixer, ``mesh.sequence`` = 1, 2, 4, 8 (the time axis of every row split over that
many devices, :mod:`effseq.ops.sequence`) and every length, the trainer's own train step
(fwd + bwd + AdamW, a language model of ``d_model`` x ``n_layers``, batch 1) is compiled ahead
of time on a mesh of that many devices. Recorded:

* the compiled executable's per-device peak memory (arguments + outputs + temporaries, less
  donated aliases; ``compiled.memory_analysis()``), which is what each device must hold;
* the per-device memory slope (bytes per token of sequence, least squares over the lengths);
* the longest trainable length within ``budget_mib`` per device: lengths doubled from the
  longest measured until the compiled peak exceeds the budget (compile only, nothing runs);
* the step time (fastest of ``repeats`` runs), at lengths up to ``time_up_to``.

On fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) the memory figures
are the real per-device figures of the program, but the step times are not a parallel speed-up:
all the "devices" share the host's cores, so the time shows the total work of the sharded
program (its extra local pass, halos and collectives), not how fast n real devices run it. On a
GPU or TPU mesh the same command measures both.

``python -m effseq.benchmarks.sequence`` (``make bench-sequence``); results go to
benchmarks/results/sequence.{json,md} (``--out`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np

from effseq.benchmarks import models as model_bench
from effseq.benchmarks.timing import compile_timed, memory, provenance, time_step

RESULTS = pathlib.Path("benchmarks/results")
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Plan:
    mixers: tuple[str, ...]
    lengths: tuple[int, ...]
    shards: tuple[int, ...] = (1, 2, 4, 8)
    d_model: int = 128
    n_layers: int = 2
    batch: int = 1
    repeats: int = 3
    time_up_to: int = 4096  # step times measured at lengths up to this
    budget_mib: float = 256.0  # per-device memory for the longest-trainable-length search
    max_search: int = 2**20  # stop doubling here


PLANS = {
    "quick": Plan(model_bench.MIXERS, (1024, 2048, 4096)),
    "full": Plan(model_bench.MIXERS, (4096, 8192, 16384), d_model=256, n_layers=4, budget_mib=8192),
}


def _setup(mixer: str, length: int, shards: int, plan: Plan):
    from effseq.train.loop import Setup

    bench = model_bench.Plan(
        (mixer,), (length,), (), batch=plan.batch, d_model=plan.d_model, n_layers=plan.n_layers
    )
    config = model_bench.bench_config(mixer, length, bench)
    config.mesh.data, config.mesh.sequence = 1, shards
    return Setup(config, devices=jax.devices()[:shards])


def _compiled(mixer: str, length: int, shards: int, plan: Plan):
    """(compiled train step, compile seconds, its state, its batch), nothing run yet."""
    setup = _setup(mixer, length, shards, plan)
    state = setup.target  # shapes, dtypes and shardings; nothing allocated
    local = model_bench.lm_batch(plan.batch, length)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
        for k, v in local.items()
    }
    compiled, compile_s = compile_timed(setup.train_fn(), state, batch)
    return setup, compiled, compile_s, local


def peak_mib(mixer: str, length: int, shards: int, plan: Plan) -> float:
    _, compiled, _, _ = _compiled(mixer, length, shards, plan)
    return memory(compiled)["peak_bytes"] / MIB


def measure(mixer: str, length: int, shards: int, plan: Plan) -> dict:
    setup, compiled, compile_s, local = _compiled(mixer, length, shards, plan)
    rec = {
        "mixer": mixer,
        "length": length,
        "shards": shards,
        "compile_s": compile_s,
        "peak_mib": memory(compiled)["peak_bytes"] / MIB,
        "step_s": None,
    }
    if length <= plan.time_up_to:
        state = setup.init_state()
        timing, _ = time_step(
            compiled, state, setup.global_batch(local), repeats=plan.repeats, compile_s=compile_s
        )
        rec["step_s"] = timing.min_s
    return rec


def slope_bytes_per_token(records: list[dict]) -> float:
    """Least-squares slope of per-device peak bytes against the (whole) sequence length."""
    x = np.array([r["length"] for r in records], np.float64)
    y = np.array([r["peak_mib"] * MIB for r in records], np.float64)
    return float(np.polyfit(x, y, 1)[0])


def longest(mixer: str, shards: int, plan: Plan, rows: list[dict]) -> dict:
    """The longest length whose train step compiles to at most ``plan.budget_mib`` per device:
    the measured lengths first (``rows``), then doubling from the longest of them while it fits
    (None when no measured length fits)."""
    fits = [r for r in rows if r["peak_mib"] <= plan.budget_mib]
    if not fits:
        return {"longest": None, "peak_mib_at_longest": None, "search_capped": False}
    best = max(fits, key=lambda r: r["length"])
    length, peak = best["length"], best["peak_mib"]
    if length < max(r["length"] for r in rows):  # a longer measured length did not fit
        return {"longest": length, "peak_mib_at_longest": peak, "search_capped": False}
    while length * 2 <= plan.max_search:
        mib = peak_mib(mixer, length * 2, shards, plan)
        if mib > plan.budget_mib:
            break
        length, peak = length * 2, mib
    capped = length * 2 > plan.max_search
    return {"longest": length, "peak_mib_at_longest": peak, "search_capped": capped}


def run(plan: Plan, log=print) -> dict:
    need = max(plan.shards)
    if jax.device_count() < need:
        raise SystemExit(
            f"effseq.benchmarks.sequence: mesh.sequence up to {need} needs {need} devices, "
            f"found {jax.device_count()}; on a CPU run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need} (make bench-sequence)"
        )
    records, summary = [], []
    for mixer in plan.mixers:
        for n in plan.shards:
            rows = []
            for length in plan.lengths:
                rec = measure(mixer, length, n, plan)
                rows.append(rec)
                step = "" if rec["step_s"] is None else f", step {rec['step_s'] * 1e3:.0f} ms"
                log(
                    f"{mixer} sequence={n} t={length}: {rec['peak_mib']:.1f} MiB/device"
                    f"{step} (compile {rec['compile_s']:.1f} s)"
                )
            records += rows
            found = longest(mixer, n, plan, rows)
            summary.append(
                {"mixer": mixer, "shards": n, "slope_bytes_per_token": slope_bytes_per_token(rows)}
                | found
            )
            log(
                f"{mixer} sequence={n}: {summary[-1]['slope_bytes_per_token']:.0f} bytes/token "
                f"per device; longest within {plan.budget_mib:g} MiB: {found['longest']}"
            )
    return {
        "provenance": provenance(),
        "plan": dataclasses.asdict(plan),
        "records": records,
        "summary": summary,
    }


def markdown(result: dict) -> str:
    prov, plan = result["provenance"], result["plan"]
    shards = plan["shards"]
    lines = [
        f"# Sequence parallelism: per-device memory and step time ({prov['date']})",
        "",
        f"{prov['backend']} ({prov['device_kind']}, {prov['cpu_count']} cores, "
        f"{prov.get('device_count', '?')} devices), jax {prov['jax']}, commit "
        f"{prov['git_commit']}{' (dirty)' if prov['git_dirty'] else ''}. Language models "
        f"d_model {plan['d_model']}, {plan['n_layers']} layers, batch {plan['batch']}; the "
        "trainer's train step (fwd + bwd + AdamW) compiled for a mesh of mesh.sequence devices. "
        "Memory: the compiled per-device peak. Longest trainable length: doubled until the "
        f"compiled peak exceeds {plan['budget_mib']:g} MiB per device (compile only). One run.",
        "",
        "## Longest trainable length and per-device memory slope",
        "",
        "| mixer | "
        + " | ".join(f"longest, sequence={n}" for n in shards)
        + " | "
        + " | ".join(f"bytes/token, sequence={n}" for n in shards)
        + " |",
        "|---|" + "---:|" * (2 * len(shards)),
    ]
    by = {(s["mixer"], s["shards"]): s for s in result["summary"]}
    for mixer in plan["mixers"]:
        cells = []
        for n in shards:
            s = by[(mixer, n)]
            mark = "+" if s["search_capped"] else ""
            cells.append(f"{s['longest']:,}{mark}" if s["longest"] else "-")
        cells += [f"{by[(mixer, n)]['slope_bytes_per_token']:,.0f}" for n in shards]
        lines.append(f"| {mixer} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per-device peak memory (MiB) and step time (ms) by length",
        "",
        "| mixer | t | " + " | ".join(f"sequence={n}" for n in shards) + " |",
        "|---|---:|" + "---:|" * len(shards),
    ]
    recs = {(r["mixer"], r["length"], r["shards"]): r for r in result["records"]}
    for mixer in plan["mixers"]:
        for t in plan["lengths"]:
            cells = []
            for n in shards:
                r = recs[(mixer, t, n)]
                step = "" if r["step_s"] is None else f", {r['step_s'] * 1e3:.0f} ms"
                cells.append(f"{r['peak_mib']:.1f}{step}")
            lines.append(f"| {mixer} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="longer rows, larger models")
    p.add_argument("--mixers", default=None, help="comma-separated subset")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = p.parse_args(argv)
    plan = PLANS["full" if args.full else "quick"]
    if args.mixers:
        names = tuple(m.strip() for m in args.mixers.split(",") if m.strip())
        unknown = [m for m in names if m not in model_bench.MIXERS]
        if unknown:
            p.error(f"unknown mixer(s) {unknown}; known: {', '.join(model_bench.MIXERS)}")
        plan = dataclasses.replace(plan, mixers=names)
    result = run(plan)
    result["provenance"]["device_count"] = jax.device_count()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sequence" if not args.full else "sequence_full"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print()
    print(markdown(result))
    print(f"wrote {args.out / (stem + '.json')}, {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
