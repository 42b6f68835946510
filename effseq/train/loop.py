"""The training loop: ``train_and_evaluate(config, workdir)``.

Abstract-first setup (shapes by ``jax.eval_shape``, then shardings from the logical-axis rules,
then a jitted init straight into them), one compiled ``train_step`` with pinned shardings and
the state donated, periodic validation and checkpoints, automatic resume from the newest
checkpoint that verifies, a clean stop on SIGTERM or SIGINT (exit status 75 from the CLI), and
the test split evaluated on the best-validation checkpoint. Before anything in the workdir is
written, :mod:`effseq.train.workdir` checks it, locks it for this trainer and refuses a config
that differs from the run it holds.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effseq import data as data_lib
from effseq import sharding
from effseq.configs import validate
from effseq.configs.base import split_assignment
from effseq.models import build
from effseq.train import checkpoint, objectives, optimizer
from effseq.train import step as step_lib
from effseq.train import workdir as workdir_lib
from effseq.train.metrics import MetricsWriter, read_jsonl, truncate_jsonl

# `effseq train`'s exit status when a signal (SIGTERM, SIGINT) stopped the run after saving a
# checkpoint: EX_TEMPFAIL, "try again", so a scheduler can tell a preempted run (resume it)
# from a finished one (0) and a failed one (1, or 2 for bad input).
PREEMPTED_EXIT = 75


class Log:
    """Startup and event messages: printed by process 0 and appended to ``DIR/train.log``."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "train.log"

    def __call__(self, message: str):
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, file=sys.stderr, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` when the config (or the JAX_* environment) asks for more
    than one process. Must run before anything touches the devices."""
    d = config.distributed
    address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = d.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    pid = d.process_id if d.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if num <= 1:
        return
    if not address or pid < 0:
        raise ValueError(
            "distributed.num_processes > 1 needs distributed.coordinator_address and "
            "distributed.process_id (or JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID)"
        )
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def check_batch(config, mesh) -> None:
    """Divisibility of the global batch by micro-batches, processes and batch-sharding axes."""
    b, m = config.train.batch_size, config.train.micro_batches
    if b < 1 or m < 1 or b % m:
        raise ValueError(
            f"train.batch_size={b} must be a positive multiple of train.micro_batches={m}"
        )
    shards = mesh.shape[sharding.DATA] * mesh.shape[sharding.FSDP]
    if (b // m) % shards:
        raise ValueError(
            f"train.batch_size / train.micro_batches = {b // m} must be divisible by "
            f"mesh.data x mesh.fsdp = {shards} (each device takes an equal share)"
        )
    if b % jax.process_count():
        raise ValueError(
            f"train.batch_size={b} must be divisible by the process count {jax.process_count()}"
        )


class _InMesh:
    """A jitted function whose calls and ``lower`` (ahead-of-time compiles) run under
    ``jax.set_mesh(mesh)``."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def check_sequence(info, mesh) -> None:
    """The task's rows split into mesh.sequence equal pieces (sequence parallelism)."""
    n = mesh.shape[sharding.SEQUENCE]
    if n > 1 and info.max_length % n:
        raise ValueError(
            f"mesh.sequence={n} must divide the task's sequence length {info.max_length} "
            f"(task {info.name!r}): every device holds an equal slice of each row"
        )


class Setup:
    """Everything a run builds before its first step (shared by train and eval)."""

    def __init__(self, config, *, devices=None, for_eval_only: bool = False):
        validate(config)
        self.config = config
        task = config.task
        self.info = data_lib.task_info(task.name, **dict(task.options))
        self.data_dir = task.data_dir or None
        self._datasets = {}
        m = config.mesh
        self.mesh = sharding.make_mesh(
            m.data, m.fsdp, m.tensor, m.get("sequence", 1), devices=devices
        )
        self.rules = sharding.get_rules(m.rules)
        check_sequence(self.info, self.mesh)
        if not for_eval_only:
            check_batch(config, self.mesh)
        tc = config.train
        self.objective = tc.objective
        self.model, boxed = build.abstract_model(config, self.info)
        if tc.pack:
            objectives.check_pack(self.info, tc.objective)
        self.loss_fn = objectives.make_loss_fn(self.model, self.info, tc.objective, tc.mask_rate)
        example = build.example_batch(self.info)
        rng = jax.random.key(config.seed)
        self.labels = optimizer.param_labels(boxed["params"], config.optim.decay_vectors)
        steps = config.train.steps
        b = config.train.batch_size
        kw = dict(tokens_per_step=b * self.info.max_length, batch_size=b)
        self.tx = optimizer.make_optimizer(config.optim, self.labels, steps, **kw)
        self.learning_rates = optimizer.learning_rates(config.optim, steps, **kw)
        var_shardings = sharding.param_shardings(boxed, self.mesh, self.rules)
        replicated = sharding.replicated(self.mesh)
        init = functools.partial(step_lib.init_state, self.model, self.tx)
        abstract = jax.eval_shape(init, rng, example)
        opt_shardings = mirror_shardings(
            abstract.opt_state, abstract.params, var_shardings["params"], replicated
        )
        self.state_shardings = step_lib.TrainState(
            step=replicated,
            params=var_shardings["params"],
            constants=var_shardings.get("constants", {}),
            opt_state=opt_shardings,
        )
        self.abstract_state = abstract
        self.target = checkpoint.abstract_with_shardings(abstract, self.state_shardings)
        self._init = self._in_mesh(jax.jit(init, out_shardings=self.state_shardings))
        self._example, self._rng = example, rng
        self.num_params = build.param_count(abstract.params)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.stacked_batch_sharding = jax.NamedSharding(
            self.mesh, jax.P(None, *self.batch_sharding.spec)
        )
        self.eval_fn = self._in_mesh(
            jax.jit(
                functools.partial(step_lib.eval_step, loss_fn=self.loss_fn),
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=replicated,
            )
        )

    def _in_mesh(self, jitted):
        """``jitted`` called (so traced) with this run's mesh set: the ops read its
        ``sequence`` axis to pick their sequence-parallel forms (:mod:`effseq.ops.sequence`),
        and activations are constrained to its axes (:func:`effseq.sharding.constrain`)."""
        return _InMesh(jitted, self.mesh)

    def init_state(self):
        return self._init(self._rng, self._example)

    def train_fn(self, steps_per_call: int = 1):
        """``train_step`` jitted once: shardings pinned in and out, the state donated. With
        ``steps_per_call`` k > 1, :func:`step.train_steps` over k stacked batches (the batch
        arrays gain a leading k axis; the metrics come back stacked)."""
        tc = self.config.train
        kwargs = dict(
            loss_fn=self.loss_fn,
            tx=self.tx,
            micro_batches=tc.micro_batches,
            base_rng=jax.random.key(self.config.seed + 1),
        )
        if steps_per_call == 1:
            step, batch_sharding = step_lib.train_step, self.batch_sharding
        else:
            step, batch_sharding = step_lib.train_steps, self.stacked_batch_sharding
        return self._in_mesh(
            jax.jit(
                functools.partial(step, **kwargs),
                in_shardings=(self.state_shardings, batch_sharding),
                out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                donate_argnums=(0,),
            )
        )

    def global_batch(self, local: dict) -> dict:
        """This process's rows -> global arrays sharded over the batch axes."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()
        }

    def global_batches(self, locals_: list[dict]) -> dict:
        """k batches of this process's rows -> global arrays (k, batch, ...)."""
        return {
            k: jax.make_array_from_process_local_data(
                self.stacked_batch_sharding, np.stack([b[k] for b in locals_])
            )
            for k in locals_[0]
        }

    def dataset(self, split: str):
        """The split's dataset, loaded once: its examples stay in memory after their first
        read (small tasks), so later epochs and evaluation passes reuse them."""
        if split not in self._datasets:
            dataset = data_lib.load_task(
                self.info.name, split, data_dir=self.data_dir, **dict(self.config.task.options)
            )
            # Every row of text-file data is parsed here, before the first step: a malformed
            # row is an error naming its file and line, not a failure mid-run.
            data_lib.validate(dataset)
            self._datasets[split] = dataset
        return self._datasets[split]

    def batches(self, split: str, *, train: bool):
        return data_lib.batches(
            self.dataset(split),
            global_batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            shuffle=train,
            num_epochs=None if train else 1,
            drop_remainder=train,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            # Training rows packed with documents (train.pack); evaluation one per row.
            pack=train and self.config.train.pack,
        )

    def evaluate(self, state, split: str, max_batches: int = 0) -> dict:
        """Loss and accuracy over ``split`` (every example once; the first ``max_batches``
        batches when > 0)."""
        totals = None
        for i, local in enumerate(self.batches(split, train=False)):
            if max_batches and i >= max_batches:
                break
            sums = self.eval_fn(state, self.global_batch(local))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        weight = max(float(totals["weight"]), 1e-9)
        return {
            f"{split}/loss": float(totals["loss"]) / weight,
            f"{split}/accuracy": float(totals["correct"]) / weight,
            f"{split}/examples": float(totals["weight"]),
        }


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def mirror_shardings(opt_state, params, param_shardings, default):
    """Shardings for the optimizer state: a leaf whose tree path ends with a parameter's path
    and has its shape (Adam's moments, momentum buffers) gets that parameter's sharding;
    everything else (step counts, scalars) ``default``.

    Matching by path and shape works for every optax state, including ``multi_transform``'s
    masked partitions, where ``optax.tree_map_params`` does not apply.
    """
    by_path = {}
    for (path, p), (_, s) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_flatten_with_path(param_shardings)[0],
        strict=True,
    ):
        by_path[_keys(path)] = (p.shape, s)

    def pick(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _leaf_path(tree, index: int) -> str:
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return paths[index] if 0 <= index < len(paths) else "?"


def _versions() -> str:
    import flax
    import orbax.checkpoint

    return (
        f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, "
        f"optax {optax.__version__}, orbax-checkpoint {orbax.checkpoint.__version__}"
    )


def _truncate_metrics(workdir: pathlib.Path, step: int, log) -> None:
    """Before the first step: drop the records after ``step`` (the restored one, or 0 for a
    fresh start) from ``metrics.jsonl``, and a line torn by a kill or a full disk, so each
    step appears once. TensorBoard hides the events after ``step`` itself: the new event
    file starts with a purge at ``step + 1`` (:class:`MetricsWriter`)."""
    removed = truncate_jsonl(workdir / "metrics.jsonl", step)
    if removed:
        log(
            f"removed {removed} metrics records after step {step} (an earlier attempt logged "
            "them; they are about to be redone, and TensorBoard shows the new ones)"
        )


def _agreed(flag: bool) -> bool:
    """True on every process when any process got the signal: all must stop at the same step,
    or the ones that go on wait forever in the next step's collectives."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


class _Preemption:
    """SIGTERM and SIGINT (Ctrl-C) ask the loop to save a checkpoint and stop between steps.
    A second signal stops the process at once (status 128 + the signal): a save in flight is
    abandoned in its temporary directory and the last complete checkpoint is untouched."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log=None):
        self.requested: str | None = None
        self._previous = {}
        self._log = log or (lambda message: None)

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            again = "again" if name == self.requested else f"after {self.requested}"
            self._log(f"{name} {again}: stopping now; the last complete checkpoint is kept")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = name
        self._log(
            f"{name}: saving a checkpoint at the next step, then stopping ({name} again "
            "stops at once)"
        )

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def train_and_evaluate(config, workdir: str | os.PathLike, *, devices=None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluates the
    test split on the best-validation checkpoint, writes ``summary.json`` and returns it.

    ``devices`` (default: all) is the device list the mesh is built from."""
    maybe_initialize_distributed(config)
    lead = jax.process_index() == 0
    workdir = workdir_lib.prepare(workdir) if lead else pathlib.Path(workdir).absolute()
    lock = workdir_lib.Lock(workdir).acquire() if lead else None
    try:
        return _train(config, workdir, devices, lead)
    finally:
        if lock is not None:
            lock.release()


def _train(config, workdir: pathlib.Path, devices, lead: bool) -> dict:
    # Nothing in the workdir changes before the run is known to be this one (or a resumable
    # change of it): config.json is replaced only after the check.
    changed = workdir_lib.check_compatible(workdir, workdir_lib.flat_config(config))
    setup = Setup(config, devices=devices)
    tc = config.train
    log = Log(workdir, lead)
    if lead:
        workdir_lib.write_config(workdir, config)
        workdir_lib.record_mixers(workdir, config)
    if changed:
        log(f"config keys changed since the run started: {', '.join(changed)}")
    log(_versions())
    log(
        f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); mesh {dict(setup.mesh.shape)}, rules {config.mesh.rules!r}"
    )
    log(
        f"task {setup.info.name}: model {type(setup.model).__name__} mixer "
        f"{config.model.mixer!r}, {setup.num_params:,} parameters"
    )

    for split in ("train", "val", "test") if tc.test else ("train", "val"):
        if split in setup.info.splits:
            setup.dataset(split)  # loaded and checked before anything else is done
    ckpts = checkpoint.Checkpoints(workdir, tc.keep_checkpoints, log, writer=lead)
    train_iter = setup.batches("train", train=True)
    restored = ckpts.restore_latest(setup.target)
    if restored is None:
        state = setup.init_state()
        start = 0
        if ckpts.best.latest_step() is not None:
            log(
                "no checkpoint to resume from: starting at step 0 (the best checkpoint of an "
                "earlier attempt is removed; this run produces it again)"
            )
            ckpts.discard_best()
        if tc.init_from:
            state = _init_from(setup, state, tc.init_from, devices, log)
    else:
        start, state, data_state = restored
        train_iter.set_state(data_state)
        log(f"resumed from the checkpoint at step {start}")
    if lead:
        _truncate_metrics(workdir, start, log)
    # Wall time counts across resumptions: continue from the last logged record's.
    wall_offset = _last_wall(workdir / "metrics.jsonl") if restored else 0.0
    best = ckpts.best_meta() if restored else None

    k = tc.steps_per_call
    train_fns = {1: setup.train_fn(1)}
    if k > 1:
        train_fns[k] = setup.train_fn(k)
    writer = MetricsWriter(workdir, enabled=lead, start=start)
    progress = _progress(tc, start, enabled=lead)
    tokens_per_step = tc.batch_size * setup.info.max_length
    step, status = start, "completed"
    data_state = train_iter.get_state()
    window = _Window(tokens_per_step)
    t_start = time.time()
    feed = _Prefetcher(_call_sizes(start, tc), train_iter, setup)
    try:
        with _Preemption(log) as preempt:
            while step < tc.steps:
                if _agreed(bool(preempt.requested)):
                    log(
                        f"{preempt.requested or 'a signal to another process'}: saving a "
                        f"checkpoint at step {step} and stopping"
                    )
                    ckpts.save(step, state, data_state)
                    status = "preempted"
                    break
                n, batch, data_state = feed.get()
                # No host sync here: the next call is dispatched while this one runs, and the
                # metrics are read only at the next logging, evaluation or checkpoint step.
                state, metrics = train_fns[n](state, batch)
                window.add(step, n, metrics)
                step += n
                progress.update(n)
                if not _boundary(step, tc):
                    continue
                window.check(state, writer, log, ckpts, workdir, tc)
                record = {}
                if step % tc.log_every == 0 or step == tc.steps:
                    record = window.record()
                    lrs = setup.learning_rates(step - 1)
                    record.update({f"train/{name}": float(v) for name, v in lrs.items()})
                    if "train/loss" in record:
                        progress.set_postfix(
                            loss=f"{record['train/loss']:.4f}",
                            acc=f"{record['train/accuracy']:.3f}",
                            tok_s=f"{record['train/tokens_per_s']:.0f}",
                        )
                if step % tc.eval_every == 0 or step == tc.steps:
                    val = setup.evaluate(state, "val", tc.eval_batches)
                    record.update(val)
                    if _better(val, best, setup.objective):
                        best = {"step": step, **val}
                        ckpts.save_best(step, state, best)
                    log(
                        f"step {step}: val/loss {val['val/loss']:.4f} val/accuracy "
                        f"{val['val/accuracy']:.4f} (best {best['val/accuracy']:.4f} at "
                        f"step {best['step']})"
                    )
                if record:
                    record["wall_s"] = wall_offset + time.time() - t_start
                    writer.write(step, record)
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    ckpts.save(step, state, data_state)
    except BaseException:
        # A save in flight is completed (or fails) before the error propagates, so a rerun
        # in this process or the next never races an unfinished save.
        try:
            ckpts.wait()
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log(f"the checkpoint save in progress failed too: {type(e).__name__}: {e}")
        raise
    finally:
        feed.close()
        progress.close()  # an error's message starts on a line of its own
    ckpts.wait()
    wall = wall_offset + time.time() - t_start
    summary = {
        "task": setup.info.name,
        "mixer": config.model.mixer,
        "seed": config.seed,
        "params": setup.num_params,
        "steps": step,
        "status": status,
        "wall_s": wall,
        "best_step": None if best is None else best["step"],
        "val_accuracy": None if best is None else best["val/accuracy"],
        "val_loss": None if best is None else best["val/loss"],
        "test_accuracy": None,
    }
    if status == "completed" and tc.test and "test" in setup.info.splits:
        _, best_state, _ = ckpts.restore_best(setup.target)
        test = setup.evaluate(best_state, "test")
        summary["test_accuracy"] = test["test/accuracy"]
        summary["test_loss"] = test["test/loss"]
        writer.write(step, test)
        log(
            f"test/accuracy {test['test/accuracy']:.4f} on the best-validation checkpoint "
            f"(step {best['step']})"
        )
    writer.close()
    ckpts.close()
    if lead:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _boundary(step: int, tc) -> bool:
    """Whether the loop stops at ``step`` to log, evaluate or checkpoint."""
    every = (tc.log_every, tc.eval_every, tc.checkpoint_every)
    return step == tc.steps or any(step % e == 0 for e in every)


def _call_sizes(start: int, tc):
    """Steps per jitted call from ``start`` to the end: ``train.steps_per_call`` where no
    boundary (:func:`_boundary`) falls strictly inside the call, else single steps, so every
    boundary lands on an exact step. Deterministic, so the prefetcher and the loop agree."""
    k, step = tc.steps_per_call, start
    while step < tc.steps:
        n = 1
        if k > 1 and step + k <= tc.steps:
            if not any(_boundary(step + j, tc) for j in range(1, k)):
                n = k
        yield n
        step += n


class _Prefetcher:
    """Assembles the next calls' batches in a background thread, ``depth`` calls ahead: each
    item is (steps, global batch arrays, the data iterator's position after them), so a
    checkpoint records exactly the batches consumed. Errors (e.g. a malformed data row) are
    raised in the loop's thread."""

    _DONE = object()

    def __init__(self, sizes, iterator, setup: Setup, depth: int = 2):
        import queue
        import threading

        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work():
            try:
                for n in sizes:
                    locals_ = [next(iterator) for _ in range(n)]
                    batch = (
                        setup.global_batch(locals_[0]) if n == 1 else setup.global_batches(locals_)
                    )
                    if not self._put((n, batch, iterator.get_state())):
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread
                self._put(e)
            self._put(self._DONE)

        self._thread = threading.Thread(target=work, name="effseq-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._DONE:
            raise RuntimeError("the training data ended before train.steps")
        return item

    def close(self):
        self._stop.set()
        self._thread.join()


class _Window:
    """Metrics of the steps since the last logged record. They stay on the device until the
    next boundary step, where :meth:`check` reads them in one host sync."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.pending: list[tuple[int, int, dict]] = []
        self.bad_in_a_row = 0
        self._reset()

    def _reset(self):
        self.sums, self.finite, self.steps = {}, 0, 0
        self.started = time.time()

    def add(self, first_step: int, n: int, metrics: dict):
        self.pending.append((first_step, n, metrics))

    def check(self, state, writer, log, ckpts, workdir, tc) -> None:
        """Reads the pending metrics, logs skipped (non-finite) steps, and stops the run after
        ``train.max_bad_steps`` of them in a row."""
        pending, self.pending = jax.device_get(self.pending), []
        for first, n, metrics in pending:
            for i in range(n):
                m = {key: (v[i] if n > 1 else v) for key, v in metrics.items()}
                at = first + i + 1
                self.steps += 1
                if not bool(m["train/finite"]):
                    self.bad_in_a_row += 1
                    path = _leaf_path(state.params, int(m["train/bad_leaf"]))
                    log(
                        f"step {at}: non-finite loss or gradient (first bad gradient: {path}); "
                        f"update skipped ({self.bad_in_a_row} in a row)"
                    )
                    writer.write(at, {"train/skipped": 1, "train/bad_parameter": path})
                    if self.bad_in_a_row >= tc.max_bad_steps:
                        ckpts.wait()
                        raise RuntimeError(
                            f"{self.bad_in_a_row} consecutive non-finite steps "
                            f"(train.max_bad_steps={tc.max_bad_steps}); stopped at step {at}. "
                            f"The last good checkpoint (step {ckpts.latest_step()}) in "
                            f"{workdir} is intact."
                        )
                    continue
                self.bad_in_a_row = 0
                self.finite += 1
                for key, v in m.items():
                    if key not in ("train/finite", "train/bad_leaf"):
                        self.sums[key] = self.sums.get(key, 0.0) + float(v)

    def record(self) -> dict:
        """The window's means over its finite steps and its tokens/s; starts a new window."""
        record = {key: total / self.finite for key, total in self.sums.items()}
        elapsed = max(time.time() - self.started, 1e-9)
        record["train/tokens_per_s"] = self.steps * self.tokens_per_step / elapsed
        self._reset()
        return record


def _init_from(setup: Setup, state, source: str, devices, log):
    """``state`` with every parameter that ``source``'s best checkpoint has at the same path
    and shape (the backbone after self-pretraining); the rest (heads) keep their fresh init."""
    source = pathlib.Path(source)
    config = saved_config(source, "train.init_from")
    # Restore onto this run's mesh, so the shared parameters already have its shardings.
    for key in ("data", "fsdp", "tensor", "sequence", "rules"):
        config.mesh[key] = setup.config.mesh.get(key, 1)
    other = Setup(config, devices=devices, for_eval_only=True)
    ckpts = checkpoint.Checkpoints(source, config.train.keep_checkpoints, writer=False)
    restored = ckpts.restore_best(other.target)
    ckpts.close()
    if restored is None:
        raise FileNotFoundError(f"train.init_from: {source / 'best'} holds no checkpoint")
    step, pretrained, _ = restored
    by_path = {_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(pretrained.params)[0]}
    copied = []

    def take(p, x):
        y = by_path.get(_keys(p))
        if y is not None and y.shape == x.shape and y.dtype == x.dtype:
            copied.append(x.size)
            return y
        return x

    params = jax.tree_util.tree_map_with_path(take, state.params)
    total = build.param_count(state.params)
    log(
        f"initialised {sum(copied):,} of {total:,} parameters ({len(copied)} arrays) from "
        f"{source} (step {step})"
    )
    if not copied:
        raise ValueError(f"train.init_from: {source} shares no parameter with this model")
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)


def _better(val: dict, best: dict | None, objective: str) -> bool:
    """Best by validation accuracy; pretraining (whose L1 objective has no accuracy) by loss."""
    if best is None:
        return True
    if objective == "denoise":
        return val["val/loss"] < best["val/loss"]
    return val["val/accuracy"] > best["val/accuracy"]


def _last_wall(path: pathlib.Path) -> float:
    if not path.exists():
        return 0.0
    walls = [r["wall_s"] for r in read_jsonl(path) if "wall_s" in r]
    return walls[-1] if walls else 0.0


def _progress(tc, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=tc.steps,
        initial=start,
        disable=not (enabled and tc.progress),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )


def evaluate_workdir(
    workdir: str | os.PathLike, splits=("val", "test"), *, devices=None, overrides=()
) -> dict:
    """Re-evaluates the best-validation checkpoint of a finished or running ``workdir``.

    ``overrides`` (``KEY=VALUE``) may change where it runs: ``mesh.*`` (e.g. another device
    count) and ``task.data_dir``; any other key is refused, since it would evaluate another
    model than the one saved."""
    workdir = pathlib.Path(workdir)
    for item in overrides:
        key, _ = split_assignment(item)
        if not (key.startswith("mesh.") or key == "task.data_dir"):
            raise ValueError(
                f"effseq eval: --config.{key} cannot change: only mesh.* and task.data_dir "
                "(where the saved model runs) may be overridden"
            )
    config = saved_config(workdir, "effseq eval")
    if overrides:
        from effseq.configs import override

        config = override(config, list(overrides))
    sizes = [config.mesh.get(k, 1) for k in ("data", "fsdp", "tensor", "sequence")]
    if devices is None and min(sizes) > 0 and np.prod(sizes) < jax.device_count():
        # An explicit smaller mesh: evaluate on the first of the devices.
        devices = jax.devices()[: int(np.prod(sizes))]
    setup = Setup(config, devices=devices, for_eval_only=True)
    ckpts = checkpoint.Checkpoints(workdir, config.train.keep_checkpoints, writer=False)
    restored = ckpts.restore_best(setup.target)
    if restored is None:
        raise FileNotFoundError(f"{workdir / 'best'} holds no checkpoint yet")
    step, state, _ = restored
    out = {"step": step}
    for split in splits:
        if split in setup.info.splits:
            out.update(setup.evaluate(state, split))
    ckpts.close()
    return out


def saved_config(workdir: pathlib.Path, who: str):
    """The validated config a workdir's run was started with (its recorded mixers
    registered first)."""
    from effseq.configs import get_config

    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{who}: {path} does not exist: is {workdir} a training workdir?")
    workdir_lib.load_recorded_mixers(workdir)
    flat = workdir_lib.read_config(workdir)
    config = get_config()
    try:
        config.update_from_flattened_dict(flat)
        return validate(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{who}: {path}: {e}") from None
