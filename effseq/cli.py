"""``effseq train|eval|compare|bench|data stats|data generate``: parse the command line, then
call one function (``bench`` hands its arguments to :func:`effseq.benchmarks.models.main`)."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

# Exit statuses of `effseq train`: 0 finished, 1 failed, 2 bad input (config, data, workdir),
# 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume),
# 128 + N stopped at once by a second signal N.
PREEMPTED_EXIT = 75


def _options(items: list[str]) -> dict:
    """``KEY=VALUE`` task options, values read as Python literals where they parse."""
    from effseq.configs.base import parse_literal, split_assignment

    out = {}
    for item in items:
        key, text = split_assignment(item, "--option")
        out[key] = parse_literal(text)
    return out


def _train(args, overrides: list[str]) -> int:
    from effseq.configs import load_config, override
    from effseq.train.loop import train_and_evaluate

    config = override(load_config(args.config), overrides)
    summary = train_and_evaluate(config, args.workdir)
    print(json.dumps(summary, indent=2))
    return PREEMPTED_EXIT if summary["status"] == "preempted" else 0


def _eval(args, overrides: list[str]) -> int:
    from effseq.train.loop import evaluate_workdir

    print(json.dumps(evaluate_workdir(args.workdir, overrides=tuple(overrides)), indent=2))
    return 0


def _compare(args, overrides: list[str]) -> int:
    from effseq.compare import run_compare

    records = run_compare(
        args.suite,
        mixers=tuple(args.mixers),
        preset=args.preset,
        seeds=args.seeds,
        data_dir=args.data_dir,
        out=args.out,
        overrides=tuple(overrides),
        widths=tuple(args.widths) if args.widths else None,
        pretrain=args.pretrain,
        match=args.match,
        lr_grid=tuple(args.lr_grid) if args.lr_grid else None,
        ssm_lr_grid=tuple(args.ssm_lr_grid) if args.ssm_lr_grid else None,
        rerun=args.rerun,
        imports=tuple(args.imports),
    )
    table = (pathlib.Path(args.out) / "results.md").read_text()
    print(table)
    failed = [r for r in records if r["status"] == "failed"]
    return 1 if failed else 0


def _data_stats(args, overrides: list[str]) -> int:
    from effseq.data.stats import format_stats, task_stats

    for split in args.split:
        print(format_stats(task_stats(args.task, split, args.data_dir, **_options(args.option))))
    return 0


def _data_generate(args, overrides: list[str]) -> int:
    from effseq.data import generators

    if args.task == "lra/listops":
        sizes = dict(num_train=96000, num_val=2000, num_test=2000)
        sizes.update(_options(args.option))
        out = generators.generate_listops(f"{args.out}/listops-1000", seed=args.seed, **sizes)
    elif args.task.startswith("lra/pathfinder") or args.task.startswith("lra/pathx"):
        resolution = {"lra/pathx": 128, "lra/pathx256": 256}.get(args.task)
        resolution = resolution or int(args.task.removeprefix("lra/pathfinder"))
        out = generators.generate_pathfinder(
            args.out, resolution=resolution, seed=args.seed, **_options(args.option)
        )
    else:
        raise SystemExit(
            f"no generator for {args.task!r}: generators exist for lra/listops and the "
            "Pathfinder tasks (lra/pathfinder32, lra/pathfinder64, lra/pathx, lra/pathx256)"
        )
    print(f"wrote {out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effseq",
        description="Train, evaluate, compare and benchmark efficient sequence models.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a config in a workdir (resumes if it holds a checkpoint)",
        description="Extra --config.KEY=VALUE arguments override the config's keys.",
    )
    t.add_argument(
        "--config",
        required=True,
        help="NAME[:ARG], a built-in experiment (e.g. smoke:gla, lra/listops:s4d:cpu; an unknown "
        "name lists them), or PATH.py[:ARG], an experiment file (e.g. experiments/example.py:gla)",
    )
    t.add_argument("--workdir", required=True)
    t.set_defaults(fn=_train)
    t.epilog = (
        "Exit status: 0 finished; 1 failed; 2 bad input (config, data or workdir); 75 stopped "
        "by SIGTERM or Ctrl-C after saving a checkpoint (run the same command to resume); "
        "128+N stopped at once by a second signal N."
    )

    e = sub.add_parser(
        "eval",
        help="evaluate a workdir's best-validation checkpoint",
        description="--config.mesh.KEY=VALUE (and --config.task.data_dir=DIR) change where "
        "the saved model is evaluated, e.g. on another device count.",
    )
    e.add_argument("--workdir", required=True)
    e.set_defaults(fn=_eval)

    c = sub.add_parser(
        "compare",
        help="train every (task, mixer, seed) of a suite and write a comparison table",
        description="Extra --config.KEY=VALUE arguments override every run's config.",
    )
    c.add_argument("--suite", default="default", help="default | lra | mqar")
    c.add_argument(
        "--mixers",
        nargs="+",
        default=["s4d", "sgconv", "mamba", "gla", "attention"],
        help="mixers or patterns to compare (default: the five of `make run`); 'all': every "
        "registered mixer",
    )
    c.add_argument("--preset", default="cpu", help="cpu | full (LRA experiments)")
    c.add_argument("--seeds", type=int, default=3, help="seeds per (task, mixer); default 3")
    c.add_argument("--data_dir", default=None, help="default: $EFFSEQ_DATA_DIR, else OUT/data")
    c.add_argument("--out", default="results/compare")
    c.add_argument("--widths", type=int, nargs="+", help="the mqar sweep's d_model values")
    c.add_argument(
        "--match",
        default="params",
        choices=("params", "flops", "width"),
        help="what compared models share per task: parameter count (default) or forward FLOPs "
        "(widths chosen to match attention's), or the experiments' own widths",
    )
    c.add_argument(
        "--lr_grid",
        type=float,
        nargs="+",
        help="sweep: train every mixer at each of these learning rates; the report picks the "
        "best per task and mixer by mean validation accuracy",
    )
    c.add_argument(
        "--ssm_lr_grid",
        type=float,
        nargs="+",
        help="with --lr_grid: also sweep optim.ssm_learning_rate where a mixer has SSM-rate "
        "parameters",
    )
    c.add_argument(
        "--pretrain",
        action="store_true",
        help="also self-pretrain each classifier on its task's inputs, then fine-tune",
    )
    c.add_argument(
        "--rerun",
        action="store_true",
        help="runs under --out trained with another config are moved aside and trained again "
        "(without it the compare stops and names them)",
    )
    c.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="FILE",
        help="a Python file to run first, e.g. an experiment file that registers a mixer "
        "(repeatable)",
    )
    c.set_defaults(fn=_compare)

    # Listed for --help only: main() hands `effseq bench ...` to the benchmark's own parser
    # before this parser sees it.
    sub.add_parser(
        "bench", help="model-level training/decoding speed and memory against sequence length"
    )

    d = sub.add_parser("data", help="inspect or generate data sets").add_subparsers(
        dest="data_command", required=True
    )
    s = d.add_parser("stats", help="counts, length histogram and labels of a task")
    s.add_argument("--task", required=True)
    s.add_argument("--split", nargs="+", default=["train", "val", "test"])
    s.add_argument("--data_dir", default=None, help="default: $EFFSEQ_DATA_DIR")
    s.add_argument("--option", action="append", default=[], help="task option KEY=VALUE")
    s.set_defaults(fn=_data_stats)
    g = d.add_parser("generate", help="write a generated data set in the official layout")
    g.add_argument("--task", required=True, help="lra/listops or a Pathfinder task")
    g.add_argument("--out", required=True, help="the data_dir to write under")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--option", action="append", default=[], help="generator argument KEY=VALUE")
    g.set_defaults(fn=_data_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every other argument belongs to the benchmark's own parser
        from effseq.benchmarks.models import main as bench_main

        return bench_main(argv[1:])
    args, rest = parser().parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser().error(f"unrecognized argument {item!r}")
        overrides.append(item.removeprefix("--config."))
    if overrides and args.command not in ("train", "compare", "eval"):
        parser().error(
            "--config.KEY=VALUE overrides only apply to `effseq train`, `eval` and `compare`"
        )
    try:
        return args.fn(args, overrides)
    except (ValueError, OSError) as e:
        # Bad input and the filesystem's refusals (a missing file, a full disk, no
        # permission): one line that names what was wrong, no traceback.
        print(f"effseq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
