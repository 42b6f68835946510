"""What a workdir survives: a changed config, a second trainer, damaged checkpoints, torn and
duplicated metrics, a full disk, bad data and bad paths. Each test checks what a user cares
about: nothing saved is lost, the workdir resumes, the resumed run equals an uninterrupted
one bitwise, and the error names the problem in one line."""

import errno
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from effseq.cli import main as cli_main
from effseq.train import metrics as metrics_lib
from effseq.train.checkpoint import Checkpoints
from effseq.train.loop import Setup, evaluate_workdir, train_and_evaluate
from effseq.train.metrics import read_jsonl
from effseq.train.workdir import Lock, WorkdirError
from tests.train.test_loop import SMOKE, jsonl_scalars, losses, tensorboard_scalars, tiny

ONE = jax.devices()[:1]
# A constant learning rate, so a run stopped early and continued with more steps follows the
# same updates as one run straight through.
STEADY = {"optim.schedule": "constant", "optim.warmup_steps": 0, "train.checkpoint_every": 5}


def _run(workdir, steps=10, **extra):
    return train_and_evaluate(tiny(steps=steps, **{**STEADY, **extra}), workdir, devices=ONE)


def _params(workdir, steps=10):
    setup = Setup(tiny(steps=steps, **STEADY), devices=ONE)
    ckpts = Checkpoints(workdir, 2, writer=False)
    step, state, _ = ckpts.restore_latest(setup.target)
    ckpts.close()
    return step, jax.device_get(state.params)


def _same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _snapshot(workdir: pathlib.Path) -> dict:
    return {
        str(p.relative_to(workdir)): p.read_bytes()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and p.name not in ("lock", "train.log")  # the log records attempts
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 10-step run: its losses and final parameters."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir)
    return losses(workdir), _params(workdir)[1]


def test_a_changed_model_is_refused_and_nothing_is_touched(tmp_path, reference):
    _run(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(WorkdirError) as e:
        _run(tmp_path, **{"model.d_model": 32, "model.mixer": "attention"})
    message = str(e.value)
    assert "\n" not in message
    assert "model.d_model 16 -> 32" in message and "model.mixer 'gla' -> 'attention'" in message
    assert _snapshot(tmp_path) == before  # config.json, checkpoints, metrics: byte for byte
    # The intact run still evaluates, and an allowed change (more steps) still resumes it.
    assert evaluate_workdir(tmp_path, devices=ONE)["step"] == 10
    summary = _run(tmp_path, steps=12)
    assert summary["steps"] == 12
    (line,) = [x for x in (tmp_path / "train.log").read_text().splitlines() if "changed" in x]
    assert "config keys changed since the run started:" in line and "train.steps" in line


def test_a_second_trainer_is_refused_while_the_first_holds_the_workdir(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with Lock(tmp_path):
        with pytest.raises(WorkdirError, match=f"in use by pid {os.getpid()} on "):
            _run(tmp_path)
        assert not (tmp_path / "config.json").exists()
    # Released (as the kernel releases it when a holder dies): the next trainer runs.
    assert _run(tmp_path, steps=2)["status"] == "completed"


# "flip" is caught by the checksums, "no_checksums_truncate" by orbax failing to read; a
# truncated or deleted file with its checksums (caught the way "flip" is) runs with -m slow.
@pytest.mark.parametrize(
    "damage",
    ["flip", "no_checksums_truncate", pytest.param("truncate", marks=pytest.mark.slow),
     pytest.param("delete", marks=pytest.mark.slow)],
)  # fmt: skip
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, damage):
    _run(tmp_path)
    latest = tmp_path / "checkpoints" / "10"
    files = sorted(p for p in (latest / "state").rglob("*") if p.is_file() and p.stat().st_size)
    victim = max(files, key=lambda p: p.stat().st_size)  # the array data
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[:64])
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(bytes(data[: len(data) // 3]))
        if damage == "no_checksums_truncate":  # killed before the checksums were written
            (latest / "checksums.json").unlink()
    # A half-written save of a later step is never taken.
    (tmp_path / "checkpoints" / "15.orbax-checkpoint-tmp-1234").mkdir()
    summary = _run(tmp_path, steps=10)
    log = (tmp_path / "train.log").read_text()
    assert f"checkpoint {latest} is damaged" in log
    assert "resumed from the checkpoint at step 5" in log
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))  # removed, not restored
    (kept,) = (tmp_path / "corrupt").iterdir()  # set aside, not deleted
    assert kept.name.startswith("checkpoints-10-")
    ref_losses, ref_params = reference
    assert losses(tmp_path) == ref_losses
    step, params = _params(tmp_path)
    assert step == 10
    _same_params(params, ref_params)


def test_no_restorable_checkpoint_is_one_error_listing_each(tmp_path):
    _run(tmp_path)
    for step in (5, 10):
        (tmp_path / "checkpoints" / str(step) / "checksums.json").write_text('{"x": [1, "0"]}')
    before = _snapshot(tmp_path)
    with pytest.raises(WorkdirError, match=r"no latest checkpoint .* restores \(step 10: x is"):
        _run(tmp_path)
    assert _snapshot(tmp_path) == before


def test_torn_and_repeated_metrics_are_dropped_on_resume(tmp_path, reference):
    # A run that logged steps 6-8 and half of step 9 but was killed before its step-10 save:
    # on resume each step appears once, in metrics.jsonl and in TensorBoard, with the values
    # of the resumed run (also val/ and test/, which the first run logged at step 8 only).
    _run(tmp_path, steps=8)
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')
    summary = _run(tmp_path, steps=10)
    assert summary["steps"] == 10
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(1, 11))
    assert losses(tmp_path) == reference[0]
    # One event file per start, the first one's steps 6-8 still in it: TensorBoard hides them.
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == jsonl_scalars(records)
    assert {s: v for (s, t), v in scalars.items() if t == "train/loss"} == {
        s: np.float32(v) for s, v in reference[0].items()
    }


def test_a_run_killed_before_its_first_checkpoint_restarts_clean(tmp_path, reference):
    _run(tmp_path, steps=6, **{"train.eval_every": 3})
    shutil.rmtree(tmp_path / "checkpoints")  # as if killed before the first save
    summary = _run(tmp_path, steps=10)
    log = (tmp_path / "train.log").read_text()
    assert "starting at step 0" in log and "metrics records after step 0" in log
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 11))
    # TensorBoard shows the second attempt only (the first one's val/ at step 3 and 6 too).
    assert tensorboard_scalars(tmp_path / "tensorboard") == jsonl_scalars(records)
    assert summary["best_step"] == 10 and losses(tmp_path) == reference[0]


class _FullDisk:
    """A file whose writes fail with ENOSPC after the first ``budget`` characters, leaving
    what fit (a torn line), like a disk that fills up mid-write."""

    def __init__(self, file, budget: int):
        self.file, self.budget = file, budget

    def write(self, text):
        if len(text) > self.budget:
            self.file.write(text[: self.budget])
            self.file.flush()
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(text)
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes(tmp_path, reference, monkeypatch):
    original = metrics_lib.MetricsWriter.__init__

    def filling(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._jsonl = _FullDisk(self._jsonl, budget=1500)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "__init__", filling)
    with pytest.raises(metrics_lib.MetricsWriteError) as e:
        _run(tmp_path)
    message = str(e.value)
    assert f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device" in message
    assert "\n" not in message
    assert not (tmp_path / "metrics.jsonl").read_text().endswith("\n")  # torn
    monkeypatch.setattr(metrics_lib.MetricsWriter, "__init__", original)
    assert _run(tmp_path)["status"] == "completed"  # space freed: it resumes
    assert losses(tmp_path) == reference[0]


def test_filesystem_problems_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for workdir, expected in (
        (a_file, f"workdir {a_file} is a file, not a directory"),
        (a_file / "run", f"cannot create workdir {a_file / 'run'}: Not a directory"),
    ):
        code = cli_main(["train", "--config", f"{SMOKE}:gla", "--workdir", str(workdir)])
        err = capsys.readouterr().err
        assert code == 2 and err.strip() == f"effseq train: error: {expected}"


def test_an_unknown_mixer_option_is_one_line_naming_it(tmp_path, capsys):
    code = cli_main(
        ["train", "--config", f"{SMOKE}:gla", "--workdir", str(tmp_path / "w"),
         "--config.model.mixer_options.num_headz=2"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("effseq train: error: model.mixer_options: GLA (mixer 'gla') has no ")
    assert "'num_headz'" in err and "num_heads" in err


def test_a_malformed_data_row_fails_before_the_first_step(tmp_path):
    from effseq.configs import load_config, override
    from effseq.data.generators import generate_listops

    root = tmp_path / "data"
    generate_listops(root / "listops-1000", 64, 16, 16, min_length=8, max_length=40, progress=False)
    val = root / "listops-1000" / "basic_val.tsv"
    lines = val.read_text().splitlines()
    lines[7] = lines[7].split("\t")[0] + "\t12"
    val.write_text("\n".join(lines) + "\n")
    config = override(
        load_config("lra/listops:s4d:cpu"),
        [f"task.data_dir={root}", "train.steps=4", "train.progress=false", "optim.warmup_steps=0"],
    )
    with pytest.raises(ValueError, match=rf"{val}:8: malformed row: target must be 0-9"):
        train_and_evaluate(config, tmp_path / "w", devices=ONE)
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_cifar_labels_out_of_range_name_the_file_and_image(tmp_path):
    from effseq.data import load_task
    from tests.data.fixtures import write_cifar

    rgb = np.zeros((3, 3, 32, 32), np.uint8)
    write_cifar(tmp_path, "test_batch", rgb, [1, 42, -1])
    with pytest.raises(ValueError, match=r"test_batch: image 1 \(0-based\) has label 42, outside "):
        load_task("lra/image", "test", data_dir=tmp_path)


def test_metrics_errors_name_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not a JSON record"):
        read_jsonl(path, torn_tail_ok=True)
    path.write_text('{"step": 1}\n{"step": 2')
    assert read_jsonl(path, torn_tail_ok=True) == [{"step": 1}]
    assert metrics_lib.truncate_jsonl(path, 5) == 0 and path.read_text() == '{"step": 1}\n'


EXPERIMENT = """
from effseq.experiments import smoke
from effseq.models import register_mixer
from tests.models.test_registry import Decay

register_mixer("decay", Decay)


def get_config(arg):
    config = smoke.get_config("gla")
    config.model.mixer = "decay"
    return config
"""


def test_eval_finds_a_mixer_the_experiment_registered_and_runs_on_another_mesh(tmp_path):
    # Two fresh processes, as a user runs them: the second has never seen the experiment.
    import subprocess
    import sys

    from tests.train.test_loop import ROOT

    experiment = tmp_path / "decay_experiment.py"
    experiment.write_text(EXPERIMENT)
    workdir = tmp_path / "w"
    tiny_args = [
        "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.progress=false",
        "--config.task.options.num_examples=64", "--config.task.options.num_eval_examples=16",
        "--config.model.d_model=16", "--config.optim.warmup_steps=0",
    ]  # fmt: skip
    effseq = [sys.executable, "-m", "effseq.cli"]
    train = [*effseq, "train", "--config", str(experiment), "--workdir", str(workdir), *tiny_args]
    done = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((workdir / "mixers.json").read_text()) == {"decay": str(experiment)}
    evaluate = [*effseq, "eval", "--workdir", str(workdir), "--config.mesh.data=1"]
    done = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["step"] == 2 and 0 <= out["val/accuracy"] <= 1
    # Only where the model runs may change.
    with pytest.raises(ValueError, match=r"--config.model.d_model cannot change"):
        evaluate_workdir(workdir, overrides=("model.d_model=32",))


def test_a_key_added_since_the_run_started_counts_as_its_default(tmp_path):
    """A workdir written before a config key existed (e.g. train.pack) resumes with that key
    at its default, and is refused with it changed."""
    import json

    from effseq.configs import get_config
    from effseq.train import workdir as workdir_lib

    saved = json.loads(get_config().to_json())
    del saved["train"]["pack"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    new = workdir_lib.flat_config(get_config())
    assert workdir_lib.check_compatible(tmp_path, new) == []
    with pytest.raises(workdir_lib.WorkdirError, match="train.pack"):
        workdir_lib.check_compatible(tmp_path, {**new, "train.pack": True})
