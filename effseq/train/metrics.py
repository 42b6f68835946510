"""Metrics: one JSON object per line in ``metrics.jsonl``, and TensorBoard event files.

The event files are written with tensorboardX (its ``RecordWriter`` frames and checksums the
records, its protocol buffers and ``summary.scalar`` make them). A run that resumes from the
checkpoint at step S starts a new event file with a ``SessionLog.START`` event at step S + 1
(what tensorboardX's ``SummaryWriter(purge_step=...)`` writes): TensorBoard then hides the
events that earlier files hold at steps after S, so each step is shown once, with the values
of the run that resumed. Event files are never read or rewritten here.
"""

from __future__ import annotations

import json
import math
import pathlib
import socket
import time

import numpy as np
from tensorboardX import RecordWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import scalar

from effseq.train.workdir import WorkdirError, write_atomic


class TensorBoardWriter:
    """Scalars to a new ``DIR/events.out.tfevents.<seconds>.<host>.<nanoseconds>``, each
    write flushed to disk before it returns (so a crash loses none, and a write error is
    raised here). The name orders the files of a directory by when they were started, as
    TensorBoard reads them; the events of earlier files at steps from ``purge_step`` on are
    hidden."""

    def __init__(self, logdir: str | pathlib.Path, purge_step: int):
        # tensorboardX's SummaryWriter writes from a background thread fed by a bounded
        # queue: a failed write there (a full disk) ends the thread and the queue, once full,
        # blocks the training loop for good; and events reach the file up to flush_secs late.
        logdir = pathlib.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        ns = time.time_ns()
        host = socket.gethostname()
        self.path = logdir / f"events.out.tfevents.{ns // 10**9:010d}.{host}.{ns % 10**9:09d}"
        self._records = RecordWriter(str(self.path))
        now = time.time()
        self._write(Event(wall_time=now, file_version="brain.Event:2"))
        start = SessionLog(status=SessionLog.START)
        self._write(Event(wall_time=now, step=purge_step, session_log=start))

    def _write(self, event: Event):
        self._records.write(event.SerializeToString())
        self._records.flush()

    def write(self, step: int, scalars: dict[str, float]):
        values = [v for k, x in scalars.items() if _is_number(x) for v in scalar(k, x).value]
        if values:
            self._write(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def close(self):
        self._records.close()


class MetricsWriteError(WorkdirError):
    """A metrics file could not be written (e.g. the disk is full); names the file."""


class _named:
    """Re-raises an OSError as :class:`MetricsWriteError` naming ``path``."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if (
            kind is not None
            and issubclass(kind, OSError)
            and not isinstance(error, MetricsWriteError)
        ):
            reason = error.strerror or str(error)
            raise MetricsWriteError(
                f"cannot write {self.path}: {reason}; the run stopped, and resumes from its "
                "last checkpoint once this is fixed"
            ) from None
        return False


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _jsonable(v):
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf; keep them visible as strings
    return v


class MetricsWriter:
    """``DIR/metrics.jsonl`` (one object per logged step, with ``step``) and TensorBoard files
    under ``DIR/tensorboard``. Only process 0 writes (``enabled``). ``start``: the step the
    run starts from (the restored checkpoint's, 0 for a fresh start); TensorBoard hides what
    earlier attempts logged after it."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, *, start: int = 0):
        self.enabled = enabled
        if enabled:
            workdir = pathlib.Path(workdir)
            self._path = workdir / "metrics.jsonl"
            with _named(self._path):
                self._jsonl = open(self._path, "a")
            with _named(workdir / "tensorboard"):
                self._tb = TensorBoardWriter(workdir / "tensorboard", purge_step=start + 1)

    def write(self, step: int, metrics: dict):
        """Appends one record to both files. A failed write (a full disk) raises one error
        naming the file; what it left half-written is dropped when the run resumes."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with _named(self._path):
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        with _named(self._tb.path):
            self._tb.write(step, {k: v for k, v in record.items() if k != "step"})

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str | pathlib.Path, *, torn_tail_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file. A line that does not parse is an error naming
    ``file:line``, except, with ``torn_tail_ok``, a last line without its newline: what a
    write cut short (a kill or a full disk) leaves, dropped."""
    path = pathlib.Path(path)
    text = path.read_text()
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_tail_ok and number == len(lines):  # the text did not end with a newline
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from None
    return out


def truncate_jsonl(path: pathlib.Path, step: int) -> int:
    """Keeps the records up to ``step`` (a torn last line dropped), atomically; returns how
    many records were removed."""
    if not path.exists():
        return 0
    records = read_jsonl(path, torn_tail_ok=True)
    kept = [r for r in records if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != path.read_text():
        write_atomic(path, text)
    return len(records) - len(kept)
