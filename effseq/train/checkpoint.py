"""Checkpoints with orbax: the latest few (with the data position) and the best-by-validation.

Layout under the workdir: ``checkpoints/<step>/{state,data}`` (keep-last-k, written
asynchronously) and ``best/<step>/{state,meta}`` (one, replaced when validation improves).
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a save
interrupted by a crash or kill never replaces or damages the previous checkpoint; leftovers of
an interrupted save are removed when the run restarts.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


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


class Checkpoints:
    def __init__(self, workdir: str | pathlib.Path, keep: int):
        workdir = pathlib.Path(workdir).absolute()
        self.latest = _manager(workdir / "checkpoints", keep, ("state", "data"))
        self.best = _manager(workdir / "best", 1, ("state", "meta"))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state, data_state: dict):
        """Starts an asynchronous save of ``state`` and the data iterator's position; a step
        already saved (e.g. SIGTERM right after a periodic save, or right after a resume) is
        kept as it is."""
        if step in self.latest.all_steps():
            return
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def save_best(self, step: int, state, meta: dict):
        self.best.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore_latest(self, target):
        """(step, state, data_state) from the latest checkpoint, placed like ``target`` (a tree
        of ShapeDtypeStructs with shardings), or None when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        out = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
        return step, out["state"], out["data"]

    def restore_best(self, target):
        """(step, state, meta) of the best-validation checkpoint, or None."""
        step = self.best.latest_step()
        if step is None:
            return None
        out = self.best.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return step, out["state"], out["meta"]

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        self.best.close()
