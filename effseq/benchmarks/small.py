"""The default suite's small models: time per step, arithmetic rate, and the loop's overhead.

    effseq bench --plan small                  # results/bench/small.{json,md}
    python -m effseq.benchmarks.small [--mixers s4d,gla] [--steps 300] [--out DIR]

For every (task, mixer) of ``effseq compare``'s default suite, at the widths the suite matches
(the same configs ``make run`` trains):

- step: the jitted train step alone (forward, backward, AdamW), median of ``--repeats`` runs of
  20 steps on one real batch after compilation;
- flops: XLA's count of floating-point operations in that compiled step; with the step time,
  the achieved GFLOP/s and its fraction of this machine's float32 matmul rate, measured in the
  same run on a 2048 x 2048 x 2048 matmul (a ceiling for any step, not a target: small models
  spend their time in elementwise work and scans, not in large matmuls);
- loop: the real training loop (``train_and_evaluate``: data feed, dispatch, metrics) over
  ``--steps`` steps with evaluation and checkpoints only at the end; its time per step over
  the steady logging windows (the first window, with compilation, left out) against the step
  alone gives the loop's overhead.

Timings are only comparable within one run (one machine, one load).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from effseq.benchmarks.timing import provenance

QUICK_RESULTS = pathlib.Path("results/bench")
MIXERS = ("s4d", "sgconv", "mamba", "gla", "attention")
MATMUL_N = 2048


def matmul_gflops(n: int = MATMUL_N, repeats: int = 5) -> float:
    """This machine's float32 rate on one large matmul (best of ``repeats``), in GFLOP/s."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def suite_configs(mixers, data_root: pathlib.Path, log=print) -> list:
    """The default suite's (task, mixer, config) at its matched widths, one seed."""
    from effseq.compare.run import _plan

    plan = _plan("default", tuple(mixers), "cpu", 1, (), data_root, log)
    return [(item["task"], item["mixer"], item["config"]) for item in plan]


def measure_step(config, repeats: int = 5, calls: int = 20) -> dict:
    """The jitted train step alone on one real batch: median/min/max ms and XLA's FLOPs."""
    from effseq.train.loop import Setup

    setup = Setup(config, devices=jax.devices()[:1])
    state = setup.init_state()
    batch = setup.global_batch(next(setup.batches("train", train=True)))
    compiled = setup.train_fn().lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / calls)
    return {
        "params": setup.num_params,
        "d_model": config.model.d_model,
        "batch": config.train.batch_size,
        "length": setup.info.max_length,
        "step_ms": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "flops": float(cost["flops"]),
    }


def measure_loop(config, steps: int, workdir: pathlib.Path) -> dict:
    """The real training loop over ``steps`` steps; ms per step over its steady windows."""
    from effseq.configs import override
    from effseq.train.loop import train_and_evaluate
    from effseq.train.metrics import read_jsonl

    window = max(config.train.steps_per_call, 10) * 5
    c = override(
        config.copy_and_resolve_references(),
        [
            f"train.steps={steps}",
            f"train.log_every={window}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            "train.eval_batches=1",
            "train.test=false",
            "train.progress=false",
        ],
    )
    train_and_evaluate(c, workdir, devices=jax.devices()[:1])
    rates = [r["train/tokens_per_s"] for r in read_jsonl(workdir / "metrics.jsonl")]
    # Windows 2.. (the first holds the compilation); the last holds the final evaluation.
    steady = rates[1:-1] or rates[1:]
    return {"loop_tokens_per_s": statistics.median(steady), "loop_windows": len(steady)}


def run(mixers=MIXERS, steps: int = 300, repeats: int = 5, log=print) -> dict:
    prov = provenance()
    peak = matmul_gflops()
    log(f"float32 matmul ({MATMUL_N}^3): {peak:.0f} GFLOP/s")
    records = []
    with tempfile.TemporaryDirectory(prefix="effseq-bench-small-") as tmp:
        tmp = pathlib.Path(tmp)
        for task, mixer, config in suite_configs(mixers, tmp / "data", log):
            rec = {"task": task, "mixer": mixer, **measure_step(config, repeats)}
            rec["gflops_per_s"] = rec["flops"] / rec["step_ms"] / 1e6
            rec["fraction_of_matmul"] = rec["gflops_per_s"] / peak
            loop = measure_loop(config, steps, tmp / f"{task.replace('/', '-')}-{mixer}")
            tokens_per_step = rec["batch"] * rec["length"]
            rec["loop_ms"] = 1e3 * tokens_per_step / loop["loop_tokens_per_s"]
            rec["loop_overhead"] = rec["loop_ms"] / rec["step_ms"] - 1.0
            rec["steps_per_call"] = config.train.steps_per_call
            records.append(rec)
            log(
                f"{task} {mixer}: step {rec['step_ms']:.2f} ms, {rec['gflops_per_s']:.1f} "
                f"GFLOP/s ({100 * rec['fraction_of_matmul']:.1f}% of the matmul rate), loop "
                f"{rec['loop_ms']:.2f} ms/step ({100 * rec['loop_overhead']:+.1f}%)"
            )
    return {"provenance": prov, "matmul_gflops": peak, "loop_steps": steps, "records": records}


def markdown(result: dict) -> str:
    prov = result["provenance"]
    lines = [
        f"# effseq bench --plan small: the default suite's models ({prov['date']})",
        "",
        f"{prov['backend']} ({prov['device_kind']}, {prov['cpu_count']} cores), jax "
        f"{prov['jax']}, commit {prov['git_commit']}{' (dirty)' if prov['git_dirty'] else ''}. "
        f"float32 matmul rate ({MATMUL_N}^3, this run): {result['matmul_gflops']:.0f} GFLOP/s. "
        f"Step: the jitted train step alone, median of runs of 20 steps. Loop: the training "
        f"loop over {result['loop_steps']} steps (steady windows), data feed and dispatch "
        f"included.",
        "",
        "| task | mixer | d_model | params | step ms (min–max) | GFLOP/step | GFLOP/s | "
        "% of matmul | loop ms/step | loop overhead |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['task']} | {r['mixer']} | {r['d_model']} | {r['params']:,} | "
            f"{r['step_ms']:.2f} ({r['step_ms_min']:.2f}–{r['step_ms_max']:.2f}) | "
            f"{r['flops'] / 1e9:.3f} | {r['gflops_per_s']:.1f} | "
            f"{100 * r['fraction_of_matmul']:.1f}% | {r['loop_ms']:.2f} | "
            f"{100 * r['loop_overhead']:+.1f}% |"
        )
    return "\n".join(lines) + "\n"


def _names(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in MIXERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mixer(s) {unknown}; known: {', '.join(MIXERS)}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="effseq bench --plan small", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--plan", choices=["small"], default="small")
    p.add_argument("--mixers", type=_names, default=MIXERS)
    p.add_argument("--steps", type=int, default=300, help="loop steps per model")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the step (>= 3)")
    p.add_argument("--out", type=pathlib.Path, default=QUICK_RESULTS)
    args = p.parse_args(argv)
    if args.steps < 100 or args.repeats < 3:
        p.error("--steps must be >= 100 and --repeats >= 3")
    result = run(args.mixers, args.steps, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "small.md").write_text(markdown(result))
    print()
    print(markdown(result))
    print(f"wrote {args.out / 'small.json'}, {args.out / 'small.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
