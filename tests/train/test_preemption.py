"""Training in real processes, stopped the hard ways: kill -9, SIGTERM, Ctrl-C (once and
twice), and a second trainer on a live workdir. Each stopped run is resumed and must give the
losses of a run straight through, bitwise."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from effseq.train.metrics import read_jsonl
from tests.train.test_loop import ROOT, SMOKE, losses


def _cli(workdir, *extra, steps=40):
    cmd = [
        sys.executable, "-m", "effseq.cli", "train", "--config", f"{SMOKE}:gla",
        "--workdir", str(workdir), f"--config.train.steps={steps}",
        "--config.train.log_every=1", "--config.train.checkpoint_every=5",
        "--config.train.eval_every=100", "--config.train.progress=false",
        "--config.train.batch_size=16", "--config.model.d_model=16",
        "--config.task.options.num_examples=256", "--config.task.options.num_eval_examples=32",
        "--config.optim.warmup_steps=1", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _wait_for_step(workdir, step, proc, timeout=120):
    path = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and any(r["step"] >= step for r in read_jsonl(path, torn_tail_ok=True)):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def _finish(proc, timeout=180, status=0):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == status, out.decode()
    return out.decode()


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """The 40 losses of `_cli`'s run straight through, in a process of its own."""
    workdir = tmp_path_factory.mktemp("cli_reference")
    _finish(_cli(workdir))
    return losses(workdir)


def _same_losses(workdir, reference):
    got = losses(workdir)
    assert got.keys() == reference.keys() == set(range(1, 41))
    assert [got[s] for s in sorted(got)] == [reference[s] for s in sorted(reference)]


def test_killed_run_resumes_bitwise_and_a_live_run_keeps_its_workdir(tmp_path, cli_reference):
    run = tmp_path / "run"
    proc = _cli(run)
    _wait_for_step(run, 13, proc)
    # A second trainer on the live workdir is refused at once, naming the holder, and
    # writes nothing there.
    second = _cli(run)
    out = _finish(second, timeout=60, status=2)
    assert f"is in use by pid {proc.pid} on " in out and out.count("\n") == 1, out
    proc.send_signal(signal.SIGKILL)  # no chance to save: resumes from the step-10 (or 5) save
    proc.wait()
    _finish(_cli(run))  # the dead holder's lock is gone with it
    log = (run / "train.log").read_text()
    assert "resumed from the checkpoint at step" in log
    _same_losses(run, cli_reference)


# SIGTERM and SIGINT share one handler; the fast suite signals with SIGINT here, and with
# SIGTERM as the second signal below.
@pytest.mark.parametrize(
    "sig",
    [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_saves_stops_with_status_75_and_the_run_resumes(tmp_path, sig, cli_reference):
    proc = _cli(tmp_path)
    _wait_for_step(tmp_path, 3, proc)
    proc.send_signal(sig)
    out = _finish(proc, status=75)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "preempted", out
    stopped = summary["steps"]
    assert 3 <= stopped < 40
    assert (tmp_path / "checkpoints" / str(stopped)).is_dir()
    log = (tmp_path / "train.log").read_text()
    assert f"{sig.name}: saving a checkpoint at step {stopped}" in log
    _finish(_cli(tmp_path))
    assert f"resumed from the checkpoint at step {stopped}" in (tmp_path / "train.log").read_text()
    _same_losses(tmp_path, cli_reference)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, cli_reference):
    proc = _cli(tmp_path)
    _wait_for_step(tmp_path, 7, proc)
    # Two signals while the process is stopped reach its handler one after the other when it
    # continues (two of the same kind would merge into one): Ctrl-C, then another stop
    # request before the save it asked for is done.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out = _finish(proc, timeout=30, status=128 + signal.SIGTERM)
    assert "SIGTERM after SIGINT: stopping now" in out
    _finish(_cli(tmp_path))  # resumes from the last complete checkpoint
    _same_losses(tmp_path, cli_reference)
