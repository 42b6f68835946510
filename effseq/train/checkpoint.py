"""Checkpoints with orbax: the latest few (with the data position) and the best-by-validation.

Layout under the workdir: ``checkpoints/<step>/{state,data}`` (keep-last-k, written
asynchronously) and ``best/<step>/{state,meta}`` (one, replaced when validation improves).
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a save
interrupted by a crash or kill never replaces or damages the previous checkpoint; leftovers of
an interrupted save are removed when the run restarts.

Once a save has completed, the size and SHA-256 of each of its files go to
``<step>/checksums.json``. A restore takes the newest checkpoint whose files match their
checksums and that orbax reads completely; a newer one that fails is moved to
``WORKDIR/corrupt/`` (kept, not deleted) with a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import time

import jax
import orbax.checkpoint as ocp

from effseq.train.workdir import WorkdirError, write_atomic


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs that carry the target shardings (restoring onto any mesh)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _manager(directory: pathlib.Path, keep: int, items: tuple[str, ...]):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        create=True,
        # Orbax names its cross-process barriers by step: the latest and best managers both
        # save the final step, so without distinct prefixes their barriers collide.
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=directory.name
        ),
    )
    return ocp.CheckpointManager(directory, options=options, item_names=items)


CHECKSUMS = "checksums.json"


def file_checksums(directory: pathlib.Path) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file under ``directory`` (the checksum
    file itself aside)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != CHECKSUMS:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[str(path.relative_to(directory))] = [path.stat().st_size, digest.hexdigest()]
    return out


def verify(directory: pathlib.Path) -> str | None:
    """None when every file listed in ``directory``'s checksums matches (or it has no
    checksum file: a save that finished just before a kill); else what is wrong."""
    listed = directory / CHECKSUMS
    if not listed.exists():
        return None
    try:
        want = json.loads(listed.read_text())
    except (OSError, ValueError):
        return f"{listed} is unreadable"
    have = file_checksums(directory)
    for name, (size, digest) in want.items():
        if name not in have:
            return f"{name} is missing"
        if have[name][0] != size:
            return f"{name} has {have[name][0]} bytes, {size} were saved"
        if have[name][1] != digest:
            return f"{name} does not match its checksum"
    return None


class Checkpoints:
    def __init__(self, workdir: str | pathlib.Path, keep: int, log=None, *, writer: bool = True):
        self.workdir = pathlib.Path(workdir).absolute()
        self.latest = _manager(self.workdir / "checkpoints", keep, ("state", "data"))
        self.best = _manager(self.workdir / "best", 1, ("state", "meta"))
        self._log = log or (lambda message: None)
        self._writer = writer  # process 0 records checksums and moves damaged checkpoints
        self._unrecorded: list[tuple[ocp.CheckpointManager, int]] = []

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def _record_checksums(self, manager) -> None:
        """Checksums of ``manager``'s saves, once its last save has completed (call after its
        ``wait_until_finished``)."""
        pending = [step for m, step in self._unrecorded if m is manager]
        self._unrecorded = [(m, step) for m, step in self._unrecorded if m is not manager]
        if not self._writer:
            return
        for step in pending:
            directory = pathlib.Path(manager.directory) / str(step)
            if directory.is_dir():
                sums = file_checksums(directory)
                write_atomic(directory / CHECKSUMS, json.dumps(sums, indent=1) + "\n")

    def save(self, step: int, state, data_state: dict):
        """Starts an asynchronous save of ``state`` and the data iterator's position; a step
        already saved (e.g. SIGTERM right after a periodic save, or right after a resume) is
        kept as it is."""
        if step in self.latest.all_steps():
            return
        self.latest.wait_until_finished()
        self._record_checksums(self.latest)
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )
        self._unrecorded.append((self.latest, step))

    def save_best(self, step: int, state, meta: dict):
        self.best.wait_until_finished()
        self._record_checksums(self.best)
        self.best.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._unrecorded.append((self.best, step))

    def _restore_verified(self, manager, items: dict, what: str):
        """(step, restored items) from the newest step of ``manager`` that verifies and
        restores; newer ones that fail are moved to ``WORKDIR/corrupt/``. None when there is
        no step; an error listing every attempt when none restores."""
        manager.reload()  # the steps on disk now, not those this manager last saw
        steps = sorted(manager.all_steps(), reverse=True)
        tried = []
        for step in steps:
            directory = pathlib.Path(manager.directory) / str(step)
            problem = verify(directory)
            if problem is None:
                try:
                    out = manager.restore(step, args=ocp.args.Composite(**items))
                except Exception as e:  # noqa: BLE001 - any failure to read means damaged
                    problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                else:
                    if tried:
                        self._set_aside(manager, tried)
                    return step, out
            self._log(f"WARNING: the {what} checkpoint {directory} is damaged ({problem})")
            tried.append((step, directory, problem))
        if not tried:
            return None
        listing = "; ".join(f"step {s}: {p}" for s, _, p in tried)
        raise WorkdirError(
            f"no {what} checkpoint in {self.workdir} restores ({listing}). Nothing was "
            "changed; move the damaged checkpoints away to start the run again"
        )

    def _set_aside(self, manager, tried) -> None:
        """Moves damaged steps out of orbax's directory (so the resumed run saves those steps
        again) into ``WORKDIR/corrupt/``."""
        if self._writer:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step, directory, _ in tried:
                target = self.workdir / "corrupt" / f"{directory.parent.name}-{step}-{stamp}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(directory), str(target))
                self._log(f"moved the damaged checkpoint to {target}")
        _sync_processes("effseq_set_aside")
        manager.reload()

    def restore_latest(self, target):
        """(step, state, data_state) from the newest intact checkpoint, placed like ``target``
        (a tree of ShapeDtypeStructs with shardings), or None when there is none."""
        items = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        found = self._restore_verified(self.latest, items, "latest")
        if found is None:
            return None
        step, out = found
        return step, out["state"], out["data"]

    def restore_best(self, target):
        """(step, state, meta) of the best-validation checkpoint, or None."""
        items = dict(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        found = self._restore_verified(self.best, items, "best")
        if found is None:
            return None
        step, out = found
        return step, out["state"], out["meta"]

    def best_meta(self) -> dict | None:
        """The best checkpoint's metadata (its step and validation metrics) without reading
        its state, or None."""
        step = self.best.latest_step()
        if step is None:
            return None
        for path in sorted((pathlib.Path(self.best.directory) / str(step) / "meta").glob("*")):
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return None

    def discard_best(self) -> None:
        """Removes the best checkpoint of an earlier attempt that left no latest checkpoint
        (the restarted run will produce it again)."""
        if self._writer:
            self.best.reload()
            for step in self.best.all_steps():
                shutil.rmtree(pathlib.Path(self.best.directory) / str(step), ignore_errors=True)
        _sync_processes("effseq_discard_best")
        self.best.reload()

    def wait(self):
        for manager in (self.latest, self.best):
            manager.wait_until_finished()
            self._record_checksums(manager)

    def close(self):
        self.wait()
        self.latest.close()
        self.best.close()


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
