"""The compare runner: suites of (task, experiment) pairs, run for every mixer and seed.

Each run trains in its own workdir under ``OUT/runs/`` through the ordinary trainer, so an
interrupted compare resumes where it stopped: finished runs are read back from their
``summary.json``, unfinished ones resume from their latest checkpoint. After every run the
records are rewritten to ``OUT/results.json`` and the report (``results.md``, plots) is
redrawn.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import sys
import time

import jax

from effseq.configs import load_config, override
from effseq.data import MissingDataError, load_task, task_info
from effseq.models import MIXERS
from effseq.train import build
from effseq.train.optimizer import make_schedule

DEFAULT_MIXERS = tuple(MIXERS)
LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One column of a suite: an experiment file and how to call it.

    ``arg`` is formatted with ``mixer``, ``preset`` and ``width`` (for sweeps); ``generate``
    names a generator the suite runs to make the task's data (marked "generated" in the
    report); ``widths`` sweeps ``model.d_model``.
    """

    experiment: str
    arg: str = "{mixer}:{preset}"
    generate: str | None = None
    widths: tuple[int, ...] = ()


SUITES: dict[str, tuple[Entry, ...]] = {
    # `make run`: generated CPU-sized ListOps and MQAR, all five mixers, minutes on a CPU.
    "default": (
        Entry("lra/listops.py", generate="listops"),
        Entry("mqar.py", arg="{mixer}"),
    ),
    "lra": tuple(Entry(f"lra/{task}.py") for task in LRA_TASKS),
    # The recall-memory trade-off: MQAR at growing widths (state sizes) per mixer.
    "mqar": (Entry("mqar.py", arg="{mixer}:{width}", widths=(16, 32, 64, 128)),),
}


def experiments_dir() -> pathlib.Path:
    """The repository's experiments/ (beside the package in a checkout), else ./experiments."""
    for candidate in (pathlib.Path(__file__).resolve().parents[2], pathlib.Path.cwd()):
        path = candidate / "experiments"
        if (path / "smoke.py").is_file():
            return path
    raise FileNotFoundError(
        "cannot find the experiments/ folder: run effseq compare from the repository root"
    )


def _module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"effseq_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generate(entry: Entry, data_dir: pathlib.Path, log) -> None:
    """Generated CPU-sized data for ``entry`` under ``data_dir`` (once; kept between runs)."""
    from effseq.data.generators import generate_listops

    if entry.generate != "listops":
        raise ValueError(f"unknown generator {entry.generate!r}")
    target = data_dir / "listops-1000"
    if (target / "basic_test.tsv").exists():
        return
    sizes = _module(experiments_dir() / entry.experiment).CPU_DATA
    log(f"generating CPU-sized ListOps {sizes} in {target}")
    generate_listops(target, **sizes)


def _run_id(task: str, mixer: str, seed: int, width: int | None) -> str:
    slug = f"{task.replace('/', '-')}__{mixer.replace(',', '+')}"
    if width is not None:
        slug += f"__d{width}"
    return f"{slug}__seed{seed}"


def _curve(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    points = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "val/accuracy" in r:
            points.append(
                {"step": r["step"], "wall_s": r.get("wall_s"), "val_accuracy": r["val/accuracy"]}
            )
    return points


def _abstract_model(config):
    """(model, info, abstract variables) of ``config``: shapes only, nothing allocated."""
    info = task_info(config.task.name, **dict(config.task.options))
    model = build.build_model(config.model, info)
    shapes = jax.eval_shape(
        functools.partial(build.init_variables, model),
        jax.random.key(0),
        build.example_batch(info),
    )
    return model, info, shapes


def recurrent_state_bytes(config) -> int:
    """Bytes of a LanguageModel's decoding cache for one sequence of the task's length: a
    fixed state for S4D/Mamba/GLA, the KV cache for attention, the history for SGConv."""
    model, info, shapes = _abstract_model(config)
    cache = jax.eval_shape(
        lambda v: model.apply(v, 1, info.max_length, method="init_cache"), shapes
    )
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def _param_count(config) -> int:
    return build.param_count(_abstract_model(config)[2]["params"])


def _records_path(out: pathlib.Path) -> pathlib.Path:
    return out / "results.json"


def run_compare(
    suite: str = "default",
    *,
    mixers: tuple[str, ...] = DEFAULT_MIXERS,
    preset: str = "cpu",
    seeds: int = 1,
    data_dir: str | None = None,
    out: str | os.PathLike = "results/compare",
    overrides: tuple[str, ...] = (),
    widths: tuple[int, ...] | None = None,
    pretrain: bool = False,
    devices=None,
    log=None,
) -> list[dict]:
    """Runs ``suite`` for every mixer and seed; returns the records (also in results.json).

    ``overrides`` (``KEY=VALUE``) apply to every run's config, e.g. ``train.steps=50``;
    ``widths`` replaces a sweep's widths (the mqar suite's d_model values). ``pretrain``
    adds, for every classification run, a self-pretrained one: the same model first trained
    on the task's own training inputs with a denoising objective (:data:`PRETRAIN_MASK_RATE`),
    then fine-tuned from it with the same recipe; its rows read "MIXER+pretrain".
    """
    from effseq.compare.report import write_report
    from effseq.train.loop import train_and_evaluate

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = pathlib.Path(data_dir or os.environ.get("EFFSEQ_DATA_DIR", "") or out / "data")
    published = _published()
    plan = _plan(suite, mixers, preset, seeds, overrides, data_root, log, widths)
    if pretrain:
        plan = _with_pretraining(plan, out)
    records: list[dict] = []
    started = time.time()
    stage_summary = {}
    for i, item in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] {item['id']}")
        record = _run_one(item, out, train_and_evaluate, devices, log)
        if item.get("stage") == "pretrain":
            stage_summary = {f"pretrain_{k}": record.get(k) for k in ("steps", "wall_s", "status")}
            stage_summary["pretrain_val_loss"] = record.get("val_loss")
            continue
        if item.get("stage") == "finetune":
            record.update(stage_summary, pretrained=True)
        records.append(record)
        _records_path(out).write_text(json.dumps(records, indent=2) + "\n")
        write_report(records, out, published=published)
    log(f"compare: {len(records)} runs in {time.time() - started:.0f} s; results in {out}")
    return records


def _plan(suite, mixers, preset, seeds, overrides, data_root, log, widths=None) -> list[dict]:
    """Every run of the suite with its config (or the reason it is skipped)."""
    for mixer in mixers:
        for name in (m.strip() for m in mixer.split(",")):
            if name not in MIXERS:
                raise ValueError(f"unknown mixer {name!r}; known: {', '.join(MIXERS)}")
    plan = []
    for entry in SUITES[suite]:
        path = experiments_dir() / entry.experiment
        skipped = None
        if entry.generate:
            _generate(entry, data_root, log)
        for mixer in mixers:
            sweep = (widths or entry.widths) if entry.widths else ()
            for width in sweep or (None,):
                arg = entry.arg.format(mixer=mixer, preset=preset, width=width)
                config = load_config(f"{path}:{arg}")
                items = [f"task.data_dir={data_root}", *overrides]
                config = override(config, items)
                # Config mistakes (e.g. warmup longer than the run) fail now, not per run.
                make_schedule(config.optim, config.train.steps, tokens_per_step=1, batch_size=1)
                task = config.task.name
                try:
                    info = task_info(task, **dict(config.task.options))
                    # Opening the split checks that the data is there, before any training.
                    load_task(task, "train", data_dir=str(data_root), **dict(config.task.options))
                except MissingDataError as e:
                    # The summary line and the first expected path, e.g. ".../aclImdb/train/neg".
                    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                    first = next((x for x in lines[1:] if x != "Expected:"), "")
                    skipped = f"{lines[0]} (e.g. {first.split()[0]})" if first else lines[0]
                    info = None
                for seed in range(seeds):
                    c = override(config.copy_and_resolve_references(), [f"seed={seed}"])
                    plan.append(
                        dict(
                            id=_run_id(task, mixer, seed, width),
                            task=task,
                            mixer=mixer,
                            seed=seed,
                            width=width,
                            config=c,
                            generated=bool(entry.generate),
                            skipped=skipped,
                            info=info,
                        )
                    )
    _match_params(plan, log)
    return plan


# After width matching, compared models' parameter counts stay within this factor of each
# other on every task.
PARAM_BUDGET = 1.25


def _match_width(config, target: int) -> tuple[object, int]:
    """``config`` with the d_model (a multiple of 8, from half to twice the experiment's)
    whose parameter count is closest to ``target``; returns (config, count)."""
    base = config.model.d_model
    best = (abs(_param_count(config) - target), base)
    for d in range(max(8, base // 2 // 8 * 8), 2 * base + 1, 8):
        candidate = override(config.copy_and_resolve_references(), [f"model.d_model={d}"])
        try:
            count = _param_count(candidate)
        except ValueError:  # e.g. a width the mixer's heads do not divide
            continue
        best = min(best, (abs(count - target), d))
    matched = override(config.copy_and_resolve_references(), [f"model.d_model={best[1]}"])
    return matched, _param_count(matched)


# Masking rates of self-pretraining (Amos, Berant & Gupta 2023): 10% for ListOps, 15% for
# text, 50% for images (with an L1 loss on the masked pixels); others 15%.
PRETRAIN_MASK_RATE = {
    "lra/listops": 0.10,
    "lra/image": 0.50,
    "lra/pathfinder32": 0.50,
    "lra/pathfinder64": 0.50,
    "lra/pathx": 0.50,
    "lra/pathx256": 0.50,
}


def _with_pretraining(plan: list[dict], out: pathlib.Path) -> list[dict]:
    """After each classification run: its pretraining stage, then the fine-tuned run."""
    result = []
    for item in plan:
        result.append(item)
        if item["skipped"] or item["info"] is None or item["info"].sequence_labels:
            continue
        rate = PRETRAIN_MASK_RATE.get(item["task"], 0.15)
        pre = override(
            item["config"].copy_and_resolve_references(),
            ["train.objective=denoise", f"train.mask_rate={rate}", "train.test=false"],
        )
        pre_id = item["id"] + "__pretrain"
        result.append({**item, "id": pre_id, "config": pre, "stage": "pretrain"})
        tuned = override(
            item["config"].copy_and_resolve_references(),
            [f"train.init_from={(out / 'runs' / pre_id).absolute()}"],
        )
        result.append(
            {
                **item,
                "id": item["id"] + "__finetune",
                "config": tuned,
                "stage": "finetune",
                "mixer": item["mixer"] + "+pretrain",
            }
        )
    return result


def _match_params(plan, log) -> None:
    """Per task, widths matched to the parameter count of attention (the baseline) at the
    experiment's width, or of the first mixer without attention; then the budget check."""
    tasks: dict[str, list[dict]] = {}
    for item in plan:
        if not item["skipped"] and item["width"] is None:
            tasks.setdefault(item["task"], []).append(item)
    for task, items in tasks.items():
        first = {}
        for item in items:
            first.setdefault(item["mixer"], item)
        if len(first) < 2:
            continue
        ref = first.get("attention", next(iter(first.values())))
        target = _param_count(ref["config"])
        counts = {}
        for mixer, item in first.items():
            matched, counts[mixer] = _match_width(item["config"], target)
            for other in items:
                if other["mixer"] == mixer:
                    other["config"] = override(
                        matched.copy_and_resolve_references(), [f"seed={other['seed']}"]
                    )
        line = ", ".join(
            f"{m} {n:,} (d_model {first[m]['config'].model.d_model})" for m, n in counts.items()
        )
        log(f"parameters on {task}, matched to {ref['mixer']}: {line}")
        ratio = max(counts.values()) / min(counts.values())
        if ratio > PARAM_BUDGET:
            raise ValueError(
                f"parameter counts on {task} differ by {ratio:.2f}x after width matching (budget "
                f"{PARAM_BUDGET}x): {line}; adjust the experiment"
            )


def _run_one(item, out: pathlib.Path, train, devices, log) -> dict:
    base = {
        "task": item["task"],
        "mixer": item["mixer"],
        "seed": item["seed"],
        "generated": item["generated"],
    }
    if item["width"] is not None:
        base["d_model"] = item["width"]
    if item["skipped"]:
        log(f"  skipped: {item['skipped']}")
        return {**base, "status": "skipped", "reason": item["skipped"]}
    workdir = out / "runs" / item["id"]
    summary_path = workdir / "summary.json"
    summary = None
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "completed":
            log("  already finished: read back")
        else:
            summary = None
    if summary is None:
        try:
            summary = train(item["config"], workdir, devices=devices)
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the comparison
            log(f"  failed: {type(e).__name__}: {e}")
            return {**base, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
        if summary["status"] != "completed":
            # Preempted: the workdir keeps its checkpoint, and the next compare resumes it.
            return {**base, "status": "failed", "reason": f"run {summary['status']}"}
    record = {
        **base,
        "params": summary["params"],
        "steps": summary["steps"],
        "wall_s": summary["wall_s"],
        "val_accuracy": summary["val_accuracy"],
        "val_loss": summary.get("val_loss"),
        "test_accuracy": summary["test_accuracy"],
        "status": "completed",
        "curve": _curve(workdir),
        "workdir": str(workdir),
    }
    if item["info"].sequence_labels:  # language-model tasks (MQAR): the decoding state
        record["recurrent_state_bytes"] = recurrent_state_bytes(item["config"])
    return record


def _published() -> dict:
    path = experiments_dir() / "lra" / "published.py"
    if not path.exists():
        return {}
    return getattr(_module(path), "PUBLISHED", {})
