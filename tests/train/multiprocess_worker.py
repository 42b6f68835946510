"""One process of the multi-process training test: ``python multiprocess_worker.py WORKDIR
[--config.KEY=VALUE ...]``.

Runs ``effseq.train.loop.train_and_evaluate`` on the built-in ``smoke:gla`` with the given
overrides. The launcher sets the device count (XLA_FLAGS), JAX_PLATFORMS and, for a
multi-process run, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
``maybe_initialize_distributed`` reads. If the run is still going after
EFFSEQ_WORKER_STACK_DUMP_S seconds, every thread's stack is written to stderr (and again at
that interval) so a hung collective shows where it waits before the launcher kills the process.
"""

from __future__ import annotations

import faulthandler
import os
import sys

SMOKE = "smoke"  # the built-in experiment, by name


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: multiprocess_worker.py WORKDIR [--config.KEY=VALUE ...]")
    dump_after = float(os.environ.get("EFFSEQ_WORKER_STACK_DUMP_S", "0"))
    if dump_after > 0:
        faulthandler.dump_traceback_later(dump_after, repeat=True, file=sys.stderr)

    from effseq.configs import load_config, override
    from effseq.train.loop import train_and_evaluate

    workdir, rest = argv[0], argv[1:]
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        raise SystemExit(f"overrides must look like --config.KEY=VALUE, got {bad}")
    config = override(load_config(f"{SMOKE}:gla"), [a.removeprefix("--config.") for a in rest])
    train_and_evaluate(config, workdir)
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
