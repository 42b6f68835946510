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
import hashlib
import json
import os
import pathlib
import sys
import time

import flax.linen as nn
import jax

from effseq.compare.report import still_improving
from effseq.configs import load_config, override
from effseq.configs.base import experiment_module, split_assignment
from effseq.data import MissingDataError, load_task, task_info
from effseq.experiments.lra.published import PUBLISHED
from effseq.models import MIXERS, build, registry
from effseq.train import objectives
from effseq.train import workdir as workdir_lib
from effseq.train.optimizer import make_schedule

# `make run` and the compare default: the first five mixers (the time budget of `make run`);
# `--mixers all` runs every registered one.
DEFAULT_MIXERS = ("s4d", "sgconv", "mamba", "gla", "attention")
LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One column of a suite: a built-in experiment (by name, e.g. ``lra/listops``) and how
    to call it.

    ``arg`` is formatted with ``mixer``, ``preset`` and ``width`` (for sweeps); ``generate``
    names a generator the suite runs to make the task's data (marked "generated" in the
    report); ``widths`` sweeps ``model.d_model``.
    """

    experiment: str
    arg: str = "{mixer}:{preset}"
    generate: str | None = None
    widths: tuple[int, ...] = ()


SUITES: dict[str, tuple[Entry, ...]] = {
    # `make run`: generated CPU-sized ListOps and MQAR, the five DEFAULT_MIXERS, minutes on a
    # CPU (`--mixers all` adds the others).
    "default": (
        Entry("lra/listops", generate="listops"),
        Entry("mqar", arg="{mixer}"),
    ),
    "lra": tuple(Entry(f"lra/{task}") for task in LRA_TASKS),
    # The recall-memory trade-off: MQAR at growing widths (state sizes) per mixer.
    "mqar": (Entry("mqar", arg="{mixer}:{width}", widths=(16, 32, 64, 128)),),
}


def _generate(entry: Entry, data_dir: pathlib.Path, log) -> pathlib.Path:
    """Generated CPU-sized data for ``entry``, made once and kept between runs; returns the
    data_dir that holds it. Its folder is named by the generator's arguments, so changed sizes
    get fresh data and generated files never mix with a real dataset under ``data_dir``."""
    from effseq.data.generators import generate_listops

    if entry.generate != "listops":
        raise ValueError(f"unknown generator {entry.generate!r}")
    sizes = experiment_module(entry.experiment).CPU_DATA
    tag = "-".join(f"{k}{v}" for k, v in sorted(sizes.items()))
    root = data_dir / "generated" / f"listops-{tag}"
    target = root / "listops-1000"
    if not (target / "basic_test.tsv").exists():
        log(f"generating CPU-sized ListOps {sizes} in {target}")
        generate_listops(target, **sizes)
    return root


def _run_id(task: str, mixer: str, seed: int, width: int | None, lrs=()) -> str:
    slug = f"{task.replace('/', '-')}__{mixer.replace(',', '+')}"
    if width is not None:
        slug += f"__d{width}"
    for name, lr in zip(("lr", "ssmlr"), lrs, strict=False):
        slug += f"__{name}{lr}"
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


def _abstract_model(config, boxed: bool = False):
    """(model, info, abstract variables) of ``config``: shapes only, nothing allocated.
    ``boxed`` keeps the parameters' boxes (axis names and the SSM tag)."""
    info = task_info(config.task.name, **dict(config.task.options))
    model, shapes = build.abstract_model(config, info)
    return model, info, (shapes if boxed else nn.unbox(shapes))


def recurrent_state_bytes(config) -> int:
    """Bytes of a LanguageModel's decoding cache for one sequence of the task's length: a
    fixed state for S4D/Mamba/GLA, the KV cache for attention, the input window for SGConv."""
    model, info, shapes = _abstract_model(config)
    cache = jax.eval_shape(
        lambda v: model.apply(v, 1, info.max_length, method="init_cache"), shapes
    )
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def _param_count(config) -> int:
    return build.param_count(_abstract_model(config)[2]["params"])


def _records_path(out: pathlib.Path) -> pathlib.Path:
    return out / "results.json"


# Keys that say where a run ran, not what it trained: left out of a run's config hash.
_WHERE = ("mesh.", "distributed.", "train.progress", "task.data_dir")


def _what(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if not any(k == w or k.startswith(w) for w in _WHERE)}


def config_hash(config) -> str:
    """SHA-256 (16 hex digits) of what a run trains: its config without the keys that only
    say where it runs (mesh, processes, data location, progress bar)."""
    flat = _what(workdir_lib.flat_config(config))
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stale_runs(plan, out: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(workdir, what differs) for each planned run whose workdir holds a run of another
    config."""
    stale = []
    for item in plan:
        workdir = out / "runs" / item["id"]
        if item["skipped"] or not (workdir / "config.json").exists():
            continue
        old = _what(workdir_lib.read_config(workdir))
        new = _what(workdir_lib.flat_config(item["config"]))
        differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if differ:
            shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:3])
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            stale.append((workdir, shown + more))
    return stale


def _set_aside_stale(stale, rerun: bool, log) -> None:
    if not stale:
        return
    if not rerun:
        first, why = stale[0]
        raise ValueError(
            f"{len(stale)} run(s) under {first.parent} were trained with another config, "
            f"e.g. {first.name}: {why}. Pass --rerun to move them aside (to "
            "runs/<id>.replaced-<time>) and train them again, or use another --out"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for workdir, why in stale:
        target = workdir.with_name(f"{workdir.name}.replaced-{stamp}")
        workdir.rename(target)
        log(f"  {workdir.name}: config changed ({why}); the old run moved to {target.name}")


def _earlier_records(out: pathlib.Path, plan) -> list[dict]:
    """Finished runs of earlier compares into ``out`` that this one does not plan (other
    mixers, tasks or seeds), read back from results.json when their workdir still holds the
    finished run, so the results always cover every finished run under ``out``."""
    path = _records_path(out)
    if not path.exists():
        return []
    try:
        earlier = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}); move it away to start the table anew"
        ) from None
    planned = {item["id"] for item in plan}
    kept = []
    for record in earlier:
        if record.get("status") != "completed" or not record.get("workdir"):
            continue
        run_id = pathlib.Path(record["workdir"]).name
        summary = out / "runs" / run_id / "summary.json"
        if run_id in planned or not summary.exists():
            continue
        if json.loads(summary.read_text()).get("status") == "completed":
            kept.append({**record, "workdir": str(out / "runs" / run_id)})
    return kept


def run_compare(
    suite: str = "default",
    *,
    mixers: tuple[str, ...] = DEFAULT_MIXERS,
    preset: str = "cpu",
    seeds: int = 3,
    data_dir: str | None = None,
    out: str | os.PathLike = "results/compare",
    overrides: tuple[str, ...] = (),
    widths: tuple[int, ...] | None = None,
    pretrain: bool = False,
    match: str = "params",
    lr_grid: tuple[float, ...] | None = None,
    ssm_lr_grid: tuple[float, ...] | None = None,
    rerun: bool = False,
    imports: tuple[str, ...] = (),
    devices=None,
    log=None,
) -> list[dict]:
    """Runs ``suite`` for every mixer and seed; returns the records (also in results.json).

    ``overrides`` (``KEY=VALUE``) apply to every run's config, e.g. ``train.steps=50``;
    ``widths`` replaces a sweep's widths (the mqar suite's d_model values). ``pretrain``
    adds, for every classification run, a self-pretrained one: the same model first trained
    on the task's own training inputs with a denoising objective (:data:`PRETRAIN_MASK_RATE`),
    then fine-tuned from it with the same recipe; its rows read "MIXER+pretrain".

    ``match`` is what compared models share on each task (:data:`MATCHES`): "params" (widths
    chosen so parameter counts match attention's), "flops" (forward FLOPs per example match
    attention's) or "width" (every mixer at the experiment's d_model). ``lr_grid`` makes the
    comparison a learning-rate sweep: every mixer runs at each ``optim.learning_rate`` in the
    grid (and each ``optim.ssm_learning_rate`` of ``ssm_lr_grid`` where it has SSM-tagged
    parameters), every seed; the report then picks per task and mixer the rate with the best
    mean validation accuracy.

    A run already under ``out`` is read back if finished, resumed if not, but only when its
    saved config is the planned one (a hash of it is in each record): otherwise the compare
    stops before training anything, unless ``rerun`` moves such runs aside to train them
    again. ``results.json`` keeps the finished runs of earlier compares into ``out`` that
    this one does not plan. ``imports`` are Python files to run first (e.g. an experiment
    file that registers a mixer); the mixers that runs under ``out`` were trained with are
    registered from their workdirs. ``mixers`` may name "all": every registered mixer.
    """
    from effseq.compare.report import write_report
    from effseq.train.loop import train_and_evaluate

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if match not in MATCHES:
        raise ValueError(f"unknown --match {match!r}; choose one of {', '.join(MATCHES)}")
    for name, grid in (("--lr_grid", lr_grid), ("--ssm_lr_grid", ssm_lr_grid)):
        if grid is not None and (not grid or any(not lr > 0 for lr in grid)):
            raise ValueError(f"{name} must list positive learning rates, got {grid}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)

    for path in imports:
        registry.load_source(path)
    for workdir in sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []:
        workdir_lib.load_recorded_mixers(workdir)
    if "all" in mixers:  # after the imports: "all" includes the mixers they registered
        mixers = tuple(dict.fromkeys(m for m in (*MIXERS, *mixers) if m != "all"))
    data_root = pathlib.Path(data_dir or os.environ.get("EFFSEQ_DATA_DIR", "") or out / "data")
    plan = _plan(
        suite, mixers, preset, seeds, overrides, data_root, log, widths, match, lr_grid, ssm_lr_grid
    )
    baselines = _baselines(plan, out, log)
    if pretrain:
        plan = _with_pretraining(plan, out)
    _set_aside_stale(_stale_runs(plan, out), rerun, log)
    earlier = _earlier_records(out, plan)
    if earlier:
        log(f"compare: keeping {len(earlier)} finished runs of earlier compares into {out}")
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
        everything = earlier + records
        workdir_lib.write_atomic(_records_path(out), json.dumps(everything, indent=2) + "\n")
        write_report(everything, out, published=PUBLISHED, baselines=baselines)
    log(f"compare: {len(records)} runs in {time.time() - started:.0f} s; results in {out}")
    return records


def _plan(
    suite,
    mixers,
    preset,
    seeds,
    overrides,
    data_root,
    log,
    widths=None,
    match="params",
    lr_grid=None,
    ssm_lr_grid=None,
) -> list[dict]:
    """Every run of the suite with its config (or the reason it is skipped)."""
    for mixer in mixers:
        for name in registry.names(mixer):
            if name not in MIXERS:
                raise ValueError(f"unknown mixer {name!r}; known: {', '.join(MIXERS)}")
    bases = []
    for entry in SUITES[suite]:
        skipped = None
        root = _generate(entry, data_root, log) if entry.generate else data_root
        for mixer in mixers:
            sweep = (widths or entry.widths) if entry.widths else ()
            for width in sweep or (None,):
                arg = entry.arg.format(mixer=mixer, preset=preset, width=width)
                config = load_config(f"{entry.experiment}:{arg}")
                items = [f"task.data_dir={root}", *overrides]
                config = override(config, items)
                # Config mistakes (e.g. warmup longer than the run) fail now, not per run.
                make_schedule(config.optim, config.train.steps, tokens_per_step=1, batch_size=1)
                task = config.task.name
                try:
                    info = task_info(task, **dict(config.task.options))
                    # Opening the split checks that the data is there, before any training.
                    load_task(task, "train", data_dir=str(root), **dict(config.task.options))
                except MissingDataError as e:
                    # The summary line and the first expected path, e.g. ".../aclImdb/train/neg".
                    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                    first = next((x for x in lines[1:] if x != "Expected:"), "")
                    skipped = f"{lines[0]} (e.g. {first.split()[0]})" if first else lines[0]
                    info = None
                bases.append(
                    dict(
                        task=task,
                        mixer=mixer,
                        width=width,
                        config=config,
                        generated=bool(entry.generate),
                        skipped=skipped,
                        info=info,
                        # What the widths are matched to: attention at the experiment's width,
                        # whether or not attention is among the mixers, so a mixer's run is
                        # the same whichever other mixers a compare names.
                        reference=functools.partial(_reference_config, entry, preset, items),
                    )
                )
    _match(bases, match, log)
    plan = []
    for base in bases:
        for lrs in _learning_rates(base, lr_grid, ssm_lr_grid):
            config = override(base["config"].copy_and_resolve_references(), lrs)
            for seed in range(seeds):
                c = override(config.copy_and_resolve_references(), [f"seed={seed}"])
                tags = [split_assignment(x)[1] for x in lrs]
                plan.append(
                    {
                        **base,
                        "id": _run_id(base["task"], base["mixer"], seed, base["width"], tags),
                        "seed": seed,
                        "config": c,
                        "match": match,
                    }
                )
    return plan


def _learning_rates(base, lr_grid, ssm_lr_grid) -> list[list[str]]:
    """The learning-rate overrides of a sweep: every lr x every SSM lr (the latter only where
    the model has SSM-tagged parameters); one empty list when nothing is swept."""
    lrs = [[f"optim.learning_rate={lr!r}"] for lr in lr_grid] if lr_grid else [[]]
    if not ssm_lr_grid or base["skipped"] or not _has_ssm_params(base["config"]):
        return lrs
    return [x + [f"optim.ssm_learning_rate={s!r}"] for x in lrs for s in ssm_lr_grid]


def _has_ssm_params(config) -> bool:
    """Whether any parameter trains at ``optim.ssm_learning_rate``."""
    from effseq.layers.params import SSM_GROUPS
    from effseq.train.optimizer import param_labels

    shapes = _abstract_model(config, boxed=True)[2]
    return any(g in SSM_GROUPS for g in jax.tree.leaves(param_labels(shapes["params"])))


def _baselines(plan, out: pathlib.Path, log) -> dict:
    """{task: [baseline, ...]} for every task with data, computed once and kept in
    ``OUT/baselines.json`` (recomputed when the task's options change)."""
    from effseq.compare.baselines import task_baselines

    path = out / "baselines.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    result = {}
    for item in plan:
        task = item["task"]
        if item["skipped"] or task in result:
            continue
        options = dict(item["config"].task.options)
        key = json.dumps(options, sort_keys=True)
        if kept.get(task, {}).get("options") == key:
            result[task] = kept[task]
            continue
        log(f"baselines of {task} from its data")
        data_dir = item["config"].task.data_dir or None
        result[task] = {"options": key, "rows": task_baselines(task, data_dir, options)}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return {task: entry["rows"] for task, entry in result.items()}


# After width matching, compared models' parameter counts stay within this factor of each
# other on every task.
PARAM_BUDGET = 1.25
# What compared models share on a task: the quantity matched, by choosing each mixer's width.
MATCHES = ("params", "flops", "width")


def _forward_flops(config) -> float:
    """XLA's count of floating-point operations in one example's forward pass."""
    model, info, shapes = _abstract_model(config)
    fn = jax.jit(lambda v, b: objectives.apply_model(model, v, b))
    cost = fn.lower(shapes, build.example_batch(info)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


MEASURES = {"params": _param_count, "flops": _forward_flops}


def _match_width(config, target: float, measure=_param_count) -> tuple[object, float]:
    """``config`` with the d_model (a multiple of 8, from half to twice the experiment's)
    whose ``measure`` (parameters or FLOPs) is closest to ``target``; returns (config, value)."""
    base = config.model.d_model
    best = (abs(measure(config) - target), base)
    for d in range(max(8, base // 2 // 8 * 8), 2 * base + 1, 8):
        candidate = override(config.copy_and_resolve_references(), [f"model.d_model={d}"])
        try:
            value = measure(candidate)
        except ValueError:  # e.g. a width the mixer's heads do not divide
            continue
        best = min(best, (abs(value - target), d))
    matched = override(config.copy_and_resolve_references(), [f"model.d_model={best[1]}"])
    return matched, measure(matched)


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


def _reference_config(entry: Entry, preset: str, items):
    arg = entry.arg.format(mixer="attention", preset=preset, width=None)
    return override(load_config(f"{entry.experiment}:{arg}"), items)


def _match(items, match: str, log) -> None:
    """Per task, each mixer's width chosen so its ``match`` measure (parameters or forward
    FLOPs) is closest to attention's (the baseline) at the experiment's width, whether or not
    attention is compared; ``"width"`` keeps every experiment's width. Then the parameter
    budget check, whatever was matched, and each item records what it was matched to."""
    tasks: dict[str, list[dict]] = {}
    for item in items:
        if not item["skipped"] and item["width"] is None:
            tasks.setdefault(item["task"], []).append(item)
    for task, group in tasks.items():
        first = {item["mixer"]: item for item in group}
        ref = first.get("attention") or {"mixer": "attention", "config": group[0]["reference"]()}
        if match == "width":
            line = ", ".join(f"{m} d_model {it['config'].model.d_model}" for m, it in first.items())
            log(f"widths on {task} as the experiments set them: {line}")
        else:
            measure = MEASURES[match]
            target = measure(ref["config"])
            values = {}
            for mixer, item in first.items():
                item["config"], values[mixer] = _match_width(item["config"], target, measure)
            line = ", ".join(
                f"{m} {v:,.0f} (d_model {first[m]['config'].model.d_model})"
                for m, v in values.items()
            )
            log(f"{match} on {task}, matched to {ref['mixer']}: {line}")
        counts = {m: _param_count(it["config"]) for m, it in first.items()}
        for item in group:
            item["matched_to"] = ref["mixer"]
        if len(counts) < 2:
            continue
        ratio = max(counts.values()) / min(counts.values())
        if match == "params" and ratio > PARAM_BUDGET:
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
    config = item["config"]
    base["d_model"] = config.model.d_model
    base["learning_rate"] = config.optim.learning_rate
    if _has_ssm_params_cached(item):
        base["ssm_learning_rate"] = config.optim.ssm_learning_rate
    base["match"] = item.get("match", "params")
    base["config_hash"] = config_hash(config)
    if item.get("matched_to"):
        base["matched_to"] = item["matched_to"]
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
    record["still_improving"] = still_improving(record["curve"], summary["steps"])
    if item["info"].sequence_labels:  # language-model tasks (MQAR): the decoding state
        record["recurrent_state_bytes"] = recurrent_state_bytes(item["config"])
    return record


def _has_ssm_params_cached(item) -> bool:
    if "has_ssm" not in item:
        item["has_ssm"] = not item["skipped"] and _has_ssm_params(item["config"])
    return item["has_ssm"]
