"""A workdir's guards: it exists and is writable, one trainer owns it at a time, and a resumed
run has the config of the run it continues.

Every check here runs before anything in the workdir is written, and every failure is one
:class:`WorkdirError` line that names the path (the CLI prints it without a traceback).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import sys

# Keys a resumed run may change: how long it runs, how often it reports and saves, where it
# runs (mesh, processes, data location). Any other difference means another run, whose
# checkpoints and metrics would be mixed with this one's.
RESUMABLE = (
    "train.steps",
    "train.steps_per_call",
    "train.micro_batches",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.progress",
    "train.test",
    "train.init_from",  # read by a fresh run only
    "task.data_dir",
    "mesh.",
    "distributed.",
)


class WorkdirError(ValueError):
    """A problem with a workdir, in one line that names it."""


def prepare(workdir: str | os.PathLike) -> pathlib.Path:
    """The workdir as an absolute path, created if missing; a file in its place, a parent that
    cannot be created or a directory that cannot be written is one error line."""
    path = pathlib.Path(workdir).absolute()
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {path} is not writable")
    return path


class Lock:
    """``WORKDIR/lock``: an exclusive ``flock`` held while a trainer runs in the workdir.

    The kernel drops the lock when its process ends, however it ends, so a lock left by a dead
    process needs no recovery. The file holds the holder (pid, host, start time, command) for
    the error a second trainer gets."""

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / "lock"
        self._fd: int | None = None

    def acquire(self) -> Lock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot open {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirError(
                f"workdir {self.path.parent} is in use by {holder}; wait for that run to end "
                "or use another workdir"
            ) from None
        except OSError:
            # A filesystem without flock (some network mounts): run without the guard rather
            # than refuse to run at all.
            os.close(fd)
            return self
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # The file stays (removing it would race with a trainer that has just opened it);
            # the next holder rewrites it.
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')} since "
        f"{info.get('started', '?')} ({info.get('command', '?')})"
    )


def flatten(tree: dict, prefix: str = "", free=()) -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; sections named in ``free`` stay whole."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in free:
            out.update(flatten(v, key + ".", free))
        else:
            out[key] = v
    return out


def flat_config(config) -> dict:
    """A config (ConfigDict) flat, as :func:`read_config` reads it back from config.json
    (through JSON, so tuples compare equal to the lists saved)."""
    from effseq.configs.base import FREE_SECTIONS

    return flatten(json.loads(config.to_json()), free=FREE_SECTIONS)


MIXERS_FILE = "mixers.json"


def record_mixers(workdir: pathlib.Path, config) -> None:
    """``WORKDIR/mixers.json``: the source file of each registered (not built-in) mixer the
    model uses, so ``effseq eval`` and ``effseq compare`` can register it again."""
    from effseq.models import registry

    sources = registry.sources(config.model.mixer)
    if sources:
        write_atomic(workdir / MIXERS_FILE, json.dumps(sources, indent=2) + "\n")


def load_recorded_mixers(workdir: pathlib.Path) -> list[str]:
    """Registers the mixers ``WORKDIR/mixers.json`` records (running the files that define
    them) where they are not registered yet; returns their names."""
    from effseq.models import registry

    path = workdir / MIXERS_FILE
    if not path.exists():
        return []
    try:
        sources = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for name, source in sources.items():
        if name not in registry.MIXERS:
            registry.load_source(source)
        if name not in registry.MIXERS:
            raise ValueError(f"{path}: running {source} did not register mixer {name!r}")
    return list(sources)


def write_config(workdir: pathlib.Path, config) -> None:
    """Writes ``config`` (a ConfigDict) as the workdir's config.json, atomically; the one
    writer of the file that :func:`read_config` reads."""
    write_atomic(workdir / "config.json", config.to_json(indent=2) + "\n")


def read_config(workdir: pathlib.Path) -> dict | None:
    """The flat config a workdir's run was started with, or None when it has none yet."""
    from effseq.configs.base import FREE_SECTIONS

    path = workdir / "config.json"
    if not path.exists():
        return None
    try:
        return flatten(json.loads(path.read_text()), free=FREE_SECTIONS)
    except (OSError, ValueError) as e:
        raise WorkdirError(
            f"{path} is unreadable ({e}); restore it or use another workdir"
        ) from None


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def check_compatible(workdir: pathlib.Path, new: dict) -> list[str]:
    """Refuses (one line naming every differing key, old -> new) when ``workdir`` holds a run
    whose config differs from ``new`` (flat) in a key that changes the run; returns the keys
    that differ but may (:data:`RESUMABLE`).

    A key the saved config lacks (added to effseq after the run started, e.g. ``train.pack``)
    counts as the base config's default: the run is the same if ``new`` keeps that default."""
    from effseq.configs.base import get_config

    old = read_config(workdir)
    if old is None:
        return []
    defaults = flat_config(get_config())
    old = {**{k: defaults[k] for k in set(new) - set(old) if k in defaults}, **old}
    keys = sorted(set(old) | set(new))
    differ = [k for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>")]
    bad = [k for k in differ if not _resumable(k)]
    if bad:
        changes = ", ".join(
            f"{k} {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in bad
        )
        raise WorkdirError(
            f"workdir {workdir} holds another run (config.json differs: {changes}); nothing "
            "was changed there. Use another workdir, or the same config to resume"
        )
    return differ


def write_atomic(path: pathlib.Path, data: str | bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it into place, so the
    file is the old one or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
