"""The package stands on its own: installed without the editable link (``pip install`` of a
copy of the sources into a temporary folder) and run from another directory, it trains a
built-in experiment, runs ``effseq bench`` and ``effseq compare`` on the default suite, with
every effseq module coming from the installed copy and nothing from the checkout.

The install builds a wheel in pip's isolated build environment, as ``pip install .`` does, so it
needs the package index for the build requirements (setuptools, wheel). The runs are tiny but
each compiles its models: minutes on a 2-core CPU, so they are marked slow.
"""

import configparser
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What an sdist of the package holds: the package and the files setup.cfg reads.
SOURCES = ("effseq", "setup.cfg", "pyproject.toml", "README.md")
# Tiny runs: a few steps of narrow models on small data.
TRAIN = (
    "--config.train.steps=2",
    "--config.train.batch_size=8",
    "--config.train.steps_per_call=1",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
    "--config.train.progress=false",
    "--config.optim.warmup_steps=1",
)


def test_setup_cfg_packages_every_subpackage():
    """setup.cfg's ``packages = find:`` with its include list finds every folder of the package
    that holds Python files (the built-in experiments and the benchmarks among them), and the
    package has no data files that a wheel would leave out."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = [p.strip() for p in cfg["options.packages.find"]["include"].split(",")]
    found = set(setuptools.find_packages(str(ROOT), include=include))
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "effseq").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert folders <= found, folders - found
    assert {"effseq.experiments", "effseq.experiments.lra", "effseq.benchmarks"} <= found
    data = [
        p
        for p in (ROOT / "effseq").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert not data, f"non-Python files in the package need package_data in setup.cfg: {data}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, environment, working directory) of a non-editable install."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, src],
        check=True,
        timeout=600,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    return site, env, tmp_path_factory.mktemp("elsewhere")


def _run(installed, *args, timeout=900) -> subprocess.CompletedProcess:
    site, env, cwd = installed
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_every_module_comes_from_the_install(installed):
    site, _, _ = installed
    check = (
        "import importlib.util, json, sys\n"
        "import effseq.cli, effseq.benchmarks.models, effseq.benchmarks.ops\n"
        "from effseq.compare import run\n"
        "from effseq.configs import builtin_experiments, load_config\n"
        "for name in builtin_experiments():\n"
        "    load_config(name)\n"
        "files = {m: getattr(sys.modules[m], '__file__', None) for m in list(sys.modules)\n"
        "         if m == 'effseq' or m.startswith('effseq.')}\n"
        "print(json.dumps({'files': files, 'names': builtin_experiments(),\n"
        "    'checkout_folders': [n for n in ('benchmarks', 'experiments')\n"
        "                         if importlib.util.find_spec(n)]}))\n"
    )
    out = json.loads(_run(installed, "-c", check).stdout)
    assert out["files"] and all(
        pathlib.Path(f).is_relative_to(site) for f in out["files"].values() if f
    ), {m: f for m, f in out["files"].items() if f and not pathlib.Path(f).is_relative_to(site)}
    assert "effseq.experiments.lra.listops" in out["files"]
    assert out["names"] == [
        "lra/image",
        "lra/listops",
        "lra/pathfinder",
        "lra/pathx",
        "lra/retrieval",
        "lra/text",
        "mqar",
        "smoke",
    ]
    assert out["checkout_folders"] == []  # nothing puts the checkout on the path


@pytest.mark.slow
def test_train_a_builtin_experiment_by_name(installed):
    _, _, cwd = installed
    small = ("--config.task.options.num_examples=64", "--config.task.options.num_eval_examples=16")
    args = ["-m", "effseq.cli", "train", "--config", "smoke:gla", "--workdir", "w", *TRAIN]
    summary = json.loads(_run(installed, *args, *small, "--config.model.d_model=16").stdout)
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert (cwd / "w" / "config.json").exists()


@pytest.mark.slow
def test_bench_through_the_console_script(installed):
    site, _, cwd = installed
    args = ["--mixers", "gla", "--lengths", "16", "--contexts", "16", "--d-model", "16"]
    args += ["--layers", "1", "--decode-calls", "1", "--no-plots", "--out", "bench"]
    _run(installed, str(site / "bin" / "effseq"), "bench", *args)
    result = json.loads((cwd / "bench" / "models.json").read_text())
    assert [(r["mixer"], r["length"]) for r in result["train"]] == [("gla", 16)]
    assert all("skipped" not in r for r in result["train"] + result["decode"])


@pytest.mark.slow
def test_compare_the_default_suite(installed):
    """The default suite (generated ListOps and MQAR) for one mixer and seed, a few steps."""
    _, _, cwd = installed
    args = ["-m", "effseq.cli", "compare", "--mixers", "gla", "--seeds", "1", "--out", "cmp"]
    _run(installed, *args, *TRAIN, "--config.train.eval_batches=1", "--config.train.test=false")
    records = json.loads((cwd / "cmp" / "results.json").read_text())
    assert [(r["task"], r["status"]) for r in records] == [
        ("lra/listops", "completed"),
        ("synthetic/mqar", "completed"),
    ]
    assert "Tay et al. 2021" in (cwd / "cmp" / "results.md").read_text()  # published rows
