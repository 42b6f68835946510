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
# # 03 · Reading an `effseq compare` run
#
# `effseq compare` trains every (task, mixer, seed) of a suite and writes `results.json`: one
# record per run with its parameter count, accuracies and validation curve. This notebook
# loads such a file, rebuilds the report's table and plots from it with
# `effseq.compare.report`, and sets the numbers beside the published Long Range Arena results
# (Tay et al. 2021; S4D, Gu et al. 2022; SGConv, Li et al. 2022).
#
# Point `EFFSEQ_RESULTS` at a `results.json` (e.g. `results/compare/results.json` after
# `make run`) to read a real comparison. Without it, the notebook first runs a tiny one
# itself: the MQAR width sweep for GLA and attention at widths 16 and 32, 20 steps each
# (under a minute on a 2-core CPU). Those models have barely started learning: the point is
# the pipeline, not the numbers.

# %%
import json
import os
import pathlib
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display
from matplotlib.patches import Patch

from effseq.compare import report, run_compare
from effseq.experiments.lra import published

# %% [markdown]
# ## The records

# %%
results_path = os.environ.get("EFFSEQ_RESULTS")
if results_path:
    results_path = pathlib.Path(results_path)
    if not results_path.is_file():
        raise FileNotFoundError(f"EFFSEQ_RESULTS={results_path} is not a file")
else:
    out = pathlib.Path(tempfile.mkdtemp(prefix="effseq-nb03-"))
    run_compare(
        "mqar",
        mixers=("gla", "attention"),
        widths=(16, 32),
        seeds=1,
        out=out,
        overrides=(
            "task.options.seq_len=32",
            "task.options.num_kv_pairs=4",
            "task.options.vocab_size=32",
            "task.options.num_examples=640",
            "task.options.num_eval_examples=64",
            "train.batch_size=32",
            "train.steps=20",
            "train.log_every=5",
            "train.eval_every=10",
            "train.checkpoint_every=20",
            "train.progress=False",
            "optim.warmup_steps=5",
        ),
        log=print,
    )
    results_path = out / "results.json"

records = report.check_records(json.loads(results_path.read_text()))
print(f"{len(records)} records from {results_path}")
for r in records:
    acc = r.get("test_accuracy") if r["status"] == "completed" else r.get("reason")
    width = f" d_model={r['d_model']}" if "d_model" in r else ""
    print(f"  {r['task']:16s} {r['mixer']:10s}{width:14s} seed {r['seed']}: {r['status']}, {acc}")

# %% [markdown]
# ## The table
#
# `report.results_table` lays the records out like LRA's Table 1: mixers as rows, tasks as
# columns, test accuracy on the best-validation checkpoint (mean ± std over seeds, `↑` where a
# run was still improving at its end). Published rows (italic) appear for the LRA tasks the
# records have; `effseq compare` also passes each task's trivial baselines computed from its
# data (`baselines.json` beside `results.json`), and under the table a ranking says which
# differences exceed the seeds' noise. The published numbers live in
# `effseq/experiments/lra/published.py` (`PUBLISHED`).

# %%
baselines_path = results_path.with_name("baselines.json")
baselines = (
    {t: v["rows"] for t, v in json.loads(baselines_path.read_text()).items()}
    if baselines_path.exists()
    else None
)
display(Markdown(report.results_table(records, published.PUBLISHED, baselines)))

# %% [markdown]
# ## The plots
#
# The same functions `effseq compare` calls after every run: validation curves over steps and
# wall time per task, accuracy against parameter count, and (for MQAR records with a state
# size) recall against the size of the recurrent state, as in Arora et al. 2024, Figure 2.

# %%
plot_dir = pathlib.Path(tempfile.mkdtemp(prefix="effseq-nb03-plots-"))
paths = [
    *report.plot_curves(records, plot_dir),
    report.plot_params(records, plot_dir),
    report.plot_recall_memory(records, plot_dir),
]
for path in paths:
    if path is not None:
        display(Image(filename=str(path)))

# %% [markdown]
# ## Beside the published LRA numbers
#
# Each LRA task with the published accuracies (hatched: quoted from memory, still to be
# checked against the paper; see `published.UNVERIFIED`) and, where the records have the
# task, the mean accuracy of each effseq mixer (dark bars). Generated data (the CPU-sized
# ListOps of the default suite) is not the published dataset, so its bars are marked and
# not comparable.

# %%
tasks = list(published.PUBLISHED)
models = list(dict.fromkeys(m for t in tasks for m in published.PUBLISHED[t]))
ours = {}  # (task, mixer) -> (mean accuracy in percent, generated?)
for r in records:
    if r["status"] != "completed" or r["task"] not in published.PUBLISHED:
        continue
    acc = r["test_accuracy"] if r.get("test_accuracy") is not None else r.get("val_accuracy")
    if acc is not None:
        ours.setdefault((r["task"], r["mixer"]), []).append((100 * acc, r.get("generated")))
mixers = list(dict.fromkeys(m for _, m in ours))

# One bar per (source, model): "sgconv" can be both a published row and an effseq mixer.
bars = [("published", m) for m in models] + [("effseq", m) for m in mixers]
fig, ax = plt.subplots(figsize=(13, 4))
width = 0.8 / len(bars)
for j, (source, name) in enumerate(bars):
    for i, task in enumerate(tasks):
        x = i + (j - (len(bars) - 1) / 2) * width
        if source == "published" and name in published.PUBLISHED[task]:
            value, _ = published.PUBLISHED[task][name]
            hatch = "//" if (task, name) in published.UNVERIFIED else None
            ax.bar(x, value, width, color=f"C{j}", alpha=0.55, hatch=hatch)
        elif source == "effseq" and (task, name) in ours:
            values = ours[(task, name)]
            ax.bar(x, np.mean([v for v, _ in values]), width, color=f"C{j}", edgecolor="k")
            if any(g for _, g in values):
                ax.text(x, 2, report.GENERATED_MARK, ha="center")
handles = [
    Patch(color=f"C{j}", alpha=0.55 if source == "published" else 1.0, label=f"{name} ({source})")
    for j, (source, name) in enumerate(bars)
]
ax.set_xticks(range(len(tasks)), [report.task_label(t) for t in tasks])
ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title="Long Range Arena")
ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
if not mixers:
    print("No LRA task in these records: only the published numbers are drawn.")
