"""Training throughput on documents of mixed length: packed rows against padded ones, per mixer.

Documents get lengths from a long-tailed (log-normal) distribution, clipped to [``min_len``,
``max_len``]. Three ways to feed them to a language model's train step (fwd + bwd + AdamW,
the trainer's own step, one device):

* **packed**: first-fit into rows of ``max_len`` with ``segment_ids`` (no state, tap or attention
  weight crosses a document), one step per ``batch`` rows;
* **padded**: every document alone in a row of ``max_len`` (fixed shapes, the simple way);
* **bucketed**: every document padded to the smallest of ``max_len / 8, / 4, / 2, / 1`` that
  holds it, rows of one bucket stepped together (fewer padded tokens, four compiled shapes).

Throughput is real (non-padding) tokens per second: all documents' tokens over (steps needed
x the measured step time, the fastest of ``repeats`` runs). What this measures: the cost of
the padding each scheme computes, and the per-row cost of packing's masks; not data loading
(the rows are built once, outside the timing), not convergence.

``python -m effseq.benchmarks.packing`` (quick: max_len 2048, sized for a 2-core CPU) or
``--full`` (max_len 8192, for an accelerator); results go to benchmarks/results/packing.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

from effseq.benchmarks import models as model_bench
from effseq.benchmarks.timing import compile_timed, provenance, time_step

RESULTS = pathlib.Path("benchmarks/results")


@dataclasses.dataclass(frozen=True)
class Plan:
    mixers: tuple[str, ...]
    max_len: int
    d_model: int = 128
    n_layers: int = 2
    batch: int = 1
    documents: int = 4096
    median_len: int = 256
    sigma: float = 1.0
    min_len: int = 16
    repeats: int = 5
    seed: int = 0


PLANS = {
    "quick": Plan(model_bench.MIXERS, 2048),
    "full": Plan(model_bench.MIXERS, 8192, d_model=256, n_layers=4, median_len=512),
}


def document_lengths(plan: Plan) -> np.ndarray:
    """The documents' lengths: log-normal around ``median_len``, clipped to [min_len,
    max_len], from ``seed``."""
    rng = np.random.default_rng(plan.seed)
    raw = np.exp(rng.normal(np.log(plan.median_len), plan.sigma, plan.documents))
    return np.clip(np.round(raw), plan.min_len, plan.max_len).astype(np.int64)


def first_fit(lengths: np.ndarray, max_len: int) -> list[list[int]]:
    """Documents (by index, in order) packed first-fit into rows of ``max_len`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= int(n)
                break
        else:
            rows.append([i])
            free.append(max_len - int(n))
    return rows


def buckets(max_len: int) -> tuple[int, ...]:
    return tuple(max_len // k for k in (8, 4, 2, 1))


def _segment_ids(rows: list[list[int]], lengths: np.ndarray, max_len: int, batch: int):
    """The first ``batch`` packed rows' segment ids (1, 2, ... per document, 0 padding)."""
    seg = np.zeros((batch, max_len), np.int32)
    for r, docs in enumerate(rows[:batch]):
        start = 0
        for k, i in enumerate(docs):
            seg[r, start : start + lengths[i]] = k + 1
            start += int(lengths[i])
    return seg


def _step_s(mixer: str, length: int, plan: Plan, segment_ids=None) -> float:
    """Seconds of one train step at (batch, length), packed when ``segment_ids``: the fastest
    of ``plan.repeats`` runs (other work on a shared machine only ever adds time)."""
    bench_plan = model_bench.Plan(
        (mixer,), (length,), (), batch=plan.batch, d_model=plan.d_model, n_layers=plan.n_layers
    )
    setup = model_bench.make_setup(mixer, length, bench_plan)
    local = model_bench.lm_batch(plan.batch, length, plan.seed)
    if segment_ids is not None:
        local["segment_ids"] = segment_ids
        local["weights"] = (segment_ids != 0).astype(np.float32)
    state = setup.init_state()
    batch = setup.global_batch(local)
    compiled, compile_s = compile_timed(setup.train_fn(), state, batch)
    timing, _ = time_step(compiled, state, batch, repeats=plan.repeats, compile_s=compile_s)
    return timing.min_s


def measure(mixer: str, plan: Plan, lengths: np.ndarray, rows: list[list[int]]) -> dict:
    real = int(lengths.sum())
    steps = lambda n: -(-n // plan.batch)  # noqa: E731
    seg = _segment_ids(rows, lengths, plan.max_len, plan.batch)
    packed_s = _step_s(mixer, plan.max_len, plan, seg)
    step = {L: _step_s(mixer, L, plan) for L in buckets(plan.max_len)}
    per_bucket = np.searchsorted(np.array(buckets(plan.max_len)), lengths)
    counts = {L: int(np.sum(per_bucket == i)) for i, L in enumerate(buckets(plan.max_len))}
    time_packed = steps(len(rows)) * packed_s
    time_padded = steps(len(lengths)) * step[plan.max_len]
    time_bucketed = sum(steps(counts[L]) * step[L] for L in counts)
    return {
        "mixer": mixer,
        "step_s_packed": packed_s,
        "step_s_padded": step[plan.max_len],
        "step_s_buckets": {str(L): s for L, s in step.items()},
        "tokens_per_s_packed": real / time_packed,
        "tokens_per_s_padded": real / time_padded,
        "tokens_per_s_bucketed": real / time_bucketed,
        "gain_vs_padded": time_padded / time_packed,
        "gain_vs_bucketed": time_bucketed / time_packed,
        "row_cost_of_packing": packed_s / step[plan.max_len],
    }


def run(plan: Plan, log=print) -> dict:
    lengths = document_lengths(plan)
    rows = first_fit(lengths, plan.max_len)
    real = int(lengths.sum())
    per_bucket = np.searchsorted(np.array(buckets(plan.max_len)), lengths)
    bucket_tokens = sum(
        int(np.sum(per_bucket == i)) * L for i, L in enumerate(buckets(plan.max_len))
    )
    data = {
        "documents": len(lengths),
        "real_tokens": real,
        "length_quantiles": {
            str(q): int(np.quantile(lengths, q / 100)) for q in (10, 50, 90, 99, 100)
        },
        "packed_rows": len(rows),
        "packed_fill": real / (len(rows) * plan.max_len),
        "padded_fill": real / (len(lengths) * plan.max_len),
        "bucketed_fill": real / bucket_tokens,
    }
    log(
        f"{data['documents']} documents, {real:,} tokens; rows of {plan.max_len}: packed "
        f"{data['packed_rows']} ({data['packed_fill']:.1%} real), padded {len(lengths)} "
        f"({data['padded_fill']:.1%} real), bucketed {data['bucketed_fill']:.1%} real"
    )
    records = []
    for mixer in plan.mixers:
        rec = measure(mixer, plan, lengths, rows)
        records.append(rec)
        log(
            f"{mixer}: packed {rec['tokens_per_s_packed']:,.0f} tok/s, "
            f"{rec['gain_vs_padded']:.2f}x padded, {rec['gain_vs_bucketed']:.2f}x bucketed; "
            f"a packed row costs "
            f"{rec['row_cost_of_packing']:.2f}x a padded one"
        )
    return {
        "provenance": provenance(),
        "plan": dataclasses.asdict(plan),
        "data": data,
        "records": records,
    }


def markdown(result: dict) -> str:
    prov, plan, data = result["provenance"], result["plan"], result["data"]
    q = data["length_quantiles"]
    lines = [
        f"# Packed vs padded training throughput ({prov['date']})",
        "",
        f"{prov['backend']} ({prov['device_kind']}, {prov['cpu_count']} cores), jax "
        f"{prov['jax']}, commit {prov['git_commit']}{' (dirty)' if prov['git_dirty'] else ''}. "
        f"Language models d_model {plan['d_model']}, {plan['n_layers']} layers, batch "
        f"{plan['batch']} x {plan['max_len']} tokens; train step: fastest of "
        f"{plan['repeats']} runs. "
        f"{data['documents']} documents, log-normal lengths (median {plan['median_len']}, sigma "
        f"{plan['sigma']}), clipped to [{plan['min_len']}, {plan['max_len']}]: quantiles 10/50/"
        f"90/99/100% = {q['10']}/{q['50']}/{q['90']}/{q['99']}/{q['100']}. Real tokens per "
        f"computed token: packed {data['packed_fill']:.1%}, bucketed {data['bucketed_fill']:.1%},"
        f" padded {data['padded_fill']:.1%}. One run; single timings on a shared machine vary by"
        " several percent.",
        "",
        "| mixer | packed tok/s | padded tok/s | bucketed tok/s | packed / padded | "
        "packed / bucketed | packed row cost vs padded row |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['mixer']} | {r['tokens_per_s_packed']:,.0f} | {r['tokens_per_s_padded']:,.0f} "
            f"| {r['tokens_per_s_bucketed']:,.0f} | {r['gain_vs_padded']:.2f}x | "
            f"{r['gain_vs_bucketed']:.2f}x | {r['row_cost_of_packing']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="max_len 8192, larger models")
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
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "packing" if not args.full else "packing_full"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print()
    print(markdown(result))
    print(f"wrote {args.out / (stem + '.json')}, {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
