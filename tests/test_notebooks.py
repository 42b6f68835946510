"""The notebooks: each .ipynb matches its jupytext source and runs top to bottom without error.

Every notebook runs in a fresh kernel of this interpreter (a kernelspec written to tmp_path,
so a user-wide "python3" kernel pointing elsewhere cannot be picked up), on one CPU device
(the fake devices of conftest.py are dropped: the notebooks are sized for one device), with
its default sizes (the notebooks' EFFSEQ_* knobs are removed from the environment).
"""

import json
import os
import pathlib
import sys
import time

import jupytext
import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))
# A cell that runs longer than the whole notebook's budget (3 minutes on 2 cores) fails.
CELL_TIMEOUT_S = 180
KNOBS = ("EFFSEQ_RESULTS", "EFFSEQ_NB_STEPS", "EFFSEQ_NB_LENGTHS")


def test_every_source_has_its_notebook():
    assert SOURCES, f"no notebook sources in {NOTEBOOKS}"
    pairs = {p.stem for p in SOURCES}
    notebooks = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    assert pairs == notebooks, (
        f"sources without a notebook: {sorted(pairs - notebooks)}; notebooks without a "
        f"source: {sorted(notebooks - pairs)} (run `jupytext --sync notebooks/*.py`)"
    )


def _cells(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_matches_its_source(source):
    notebook = source.with_suffix(".ipynb")
    expected = _cells(jupytext.read(source))
    actual = _cells(nbformat.read(notebook, as_version=4))
    assert actual == expected, (
        f"{notebook.name} differs from {source.name}: regenerate it with "
        f"`jupytext --to ipynb {source.relative_to(NOTEBOOKS.parent)}`"
    )
    # Outputs stay out of the repository: they are big and change on every run.
    stored = [
        i for i, c in enumerate(nbformat.read(notebook, as_version=4).cells) if c.get("outputs")
    ]
    assert not stored, f"{notebook.name}: cells {stored} have stored outputs; clear them"


def _kernel_manager(tmp_path) -> KernelManager:
    """A kernel manager whose only kernelspec runs ipykernel on this interpreter."""
    spec_dir = tmp_path / "kernels" / "effseq-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "effseq test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    # IPC sockets in tmp_path: no TCP port is opened (nor left open) by the test.
    return KernelManager(
        kernel_name="effseq-test",
        kernel_spec_manager=specs,
        transport="ipc",
        ip=str(tmp_path / "kernel-ipc"),
    )


def _kernel_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    # The inline backend renders every figure to PNG at the end of its cell, headless, so a
    # plot that cannot be drawn fails here, and the figures come back as outputs.
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env.update(extra)
    return env


def _execute(name: str, tmp_path, **env: str):
    """Runs notebooks/NAME.ipynb top to bottom in a fresh kernel; returns (notebook, seconds).
    Raises CellExecutionError, with the failing cell's traceback, on any error."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    km = _kernel_manager(tmp_path)
    client = nbclient.NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    start = time.perf_counter()
    try:
        # TMPDIR: the notebooks' temporary workdirs land in tmp_path, which pytest cleans up.
        client.execute(env=_kernel_env(TMPDIR=str(tmp_path), **env))
    finally:
        # The client leaves a kernel manager it was given running: stop the kernel here.
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb, time.perf_counter() - start


def _outputs(nb, mime: str) -> list:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    return [o["data"][mime] for o in outputs if mime in o.get("data", {})]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs(source, tmp_path):
    nb, elapsed = _execute(source.stem, tmp_path)
    print(f"{source.stem}: {elapsed:.1f} s")
    # Every notebook shows at least one figure: its plots were drawn, not just built.
    assert _outputs(nb, "image/png"), f"{source.stem} produced no figure"


def _record(mixer: str, accuracy: float, params: int) -> dict:
    curve = [{"step": s, "wall_s": 0.5 * s, "val_accuracy": accuracy * s / 20} for s in (10, 20)]
    return {
        "task": "lra/listops",
        "mixer": mixer,
        "seed": 0,
        "generated": True,
        "params": params,
        "steps": 20,
        "wall_s": 10.0,
        "val_accuracy": accuracy,
        "test_accuracy": accuracy,
        "status": "completed",
        "curve": curve,
    }


def test_compare_notebook_reads_a_results_file(tmp_path):
    """With EFFSEQ_RESULTS set, 03_compare reports that file (no run of its own) beside the
    published LRA rows."""
    path = tmp_path / "results.json"
    records = [_record("s4d", 0.4125, 38_000), _record("attention", 0.3750, 40_000)]
    path.write_text(json.dumps(records))
    nb, _ = _execute("03_compare", tmp_path, EFFSEQ_RESULTS=str(path))
    tables = "\n".join(_outputs(nb, "text/markdown"))
    assert "| s4d | 38.0K | 41.25 |" in tables
    assert "| attention | 40.0K | 37.50 |" in tables
    assert "*transformer*" in tables  # a published row for ListOps
    stdout = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert f"2 records from {path}" in stdout
    assert "synthetic/mqar" not in stdout  # the tiny default comparison did not run
