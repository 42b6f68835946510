"""The training loop end to end on tiny configs, on the 8 fake CPU devices of conftest."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from effseq.configs import get_config, load_config, override
from effseq.train.loop import Setup, evaluate_workdir, train_and_evaluate
from effseq.train.metrics import read_jsonl
from tests.tolerances import assert_close

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOKE = "smoke"  # the built-in experiment, by name


def tiny(mixer="gla", steps=4, **overrides):
    """The smoke config, shrunk: every step logged, a 16-sequence global batch."""
    c = load_config(f"{SMOKE}:{mixer}")
    items = {
        "train.steps": steps,
        "train.batch_size": 16,
        "train.log_every": 1,
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "train.progress": False,
        "task.options.num_examples": 256,
        "task.options.num_eval_examples": 32,
        "model.d_model": 16,
        "optim.warmup_steps": 1,
        **overrides,
    }
    return override(c, [f"{k}={v}" for k, v in items.items()])


def losses(workdir):
    records = read_jsonl(workdir / "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_run_writes_config_metrics_tensorboard_and_summary(tmp_path):
    summary = train_and_evaluate(tiny(), tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert set(summary) >= {"task", "mixer", "seed", "params", "wall_s", "val_accuracy"}
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert {"val/loss", "val/accuracy"} <= set(records[3])
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert {"train/loss", "val/accuracy", "test/accuracy"} <= {tag for _, tag in scalars}
    assert scalars == jsonl_scalars(records)
    log = (tmp_path / "train.log").read_text()
    assert "jax " in log and "parameters" in log and "mesh" in log


def tensorboard_scalars(logdir) -> dict:
    """What TensorBoard shows of the scalars under ``logdir``, read by tensorboard's own
    loader (which checks the records' checksums and applies the purge of a resumed run):
    {(step, tag): value}. A step shown twice for a tag is a failure."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep all
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            assert (event.step, tag) not in out, f"TensorBoard shows step {event.step} twice"
            out[(event.step, tag)] = event.value
    return out


def jsonl_scalars(records) -> dict:
    """The numbers of ``metrics.jsonl``'s records as TensorBoard should show them (float32;
    strings such as a non-finite value or a parameter path are not scalars)."""
    return {
        (r["step"], k): np.float32(v)
        for r in records
        for k, v in r.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    """The 4-step losses of the tiny config on a single device: the reference."""
    workdir = tmp_path_factory.mktemp("one")
    train_and_evaluate(tiny(**{"mesh.data": 1}), workdir, devices=jax.devices()[:1])
    return losses(workdir)


@pytest.mark.devices(8)
@pytest.mark.parametrize(
    "rules,mesh",
    [
        # The fast suite trains on the mesh that uses the three parameter/batch axes (data,
        # fsdp, tensor) and on one that splits time (sequence) with data; the single-axis
        # meshes run with -m slow. mesh = (data, fsdp, tensor, sequence).
        pytest.param("dp", (8, 1, 1, 1), marks=pytest.mark.slow),
        pytest.param("fsdp", (2, 4, 1, 1), marks=pytest.mark.slow),
        ("fsdp_tp", (2, 2, 2, 1)),
        ("fsdp", (2, 1, 1, 4)),
        pytest.param("dp", (1, 1, 1, 8), marks=pytest.mark.slow),
        pytest.param("fsdp_tp", (1, 2, 2, 2), marks=pytest.mark.slow),
    ],
)
def test_eight_devices_match_one_and_keep_their_shardings(tmp_path, one_device_losses, rules, mesh):
    keys = ("mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.sequence")
    many = tiny(**dict(zip(keys, mesh, strict=True)), **{"mesh.rules": rules})
    train_and_evaluate(many, tmp_path / "many")
    a, b = one_device_losses, losses(tmp_path / "many")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert_close(np.array(list(b.values())), np.array(list(a.values())))

    setup = Setup(many)
    state = setup.init_state()
    train_fn = setup.train_fn()
    batches = setup.batches("train", train=True)
    batch = setup.global_batch(next(batches))
    if mesh[3] > 1:  # the time axis really was split: the ops ran their sharded forms
        with jax.set_mesh(setup.mesh):
            text = str(jax.make_jaxpr(train_fn.jitted)(state, batch))
        assert text.count("shard_map") >= 2, "the train step has no sequence shard_map"
    for _ in range(2):
        state, _ = train_fn(state, batch)
        batch = setup.global_batch(next(batches))
    jax.tree.map(
        lambda x, s: _same_sharding(x, s), state, setup.state_shardings, is_leaf=_is_sharding
    )


def _is_sharding(x):
    return isinstance(x, jax.sharding.Sharding)


def _same_sharding(x, s):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)


@pytest.mark.devices(8)
def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    train_and_evaluate(tiny(), tmp_path / "full")
    train_and_evaluate(tiny(**{"train.micro_batches": 2, "mesh.data": 8}), tmp_path / "acc")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "acc")
    assert_close(np.array(list(b.values())), np.array(list(a.values())))


@pytest.mark.devices(8)
def test_resume_on_another_mesh_continues_the_run(tmp_path):
    ref = tmp_path / "ref"
    train_and_evaluate(tiny(steps=6, **{"train.checkpoint_every": 3}), ref)
    # The data-parallel run's step-3 checkpoint, resumed on an fsdp mesh.
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "3", run / "checkpoints" / "3")
    rest = tiny(steps=6, **{"mesh.data": 1, "mesh.fsdp": 8, "mesh.rules": "fsdp"})
    summary = train_and_evaluate(rest, run)
    assert summary["steps"] == 6
    assert "resumed from the checkpoint at step 3" in (run / "train.log").read_text()
    a, b = losses(ref), losses(run)
    assert b.keys() == {4, 5, 6}
    assert_close(np.array([b[s] for s in (4, 5, 6)]), np.array([a[s] for s in (4, 5, 6)]))


def test_test_split_is_evaluated_on_the_best_validation_checkpoint(tmp_path):
    config = tiny(steps=6, **{"train.eval_every": 2, "optim.learning_rate": 0.05})
    summary = train_and_evaluate(config, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    vals = {r["step"]: r["val/accuracy"] for r in records if "val/accuracy" in r}
    best_step = max(vals, key=lambda s: (vals[s], -s))
    assert summary["best_step"] == best_step
    assert summary["val_accuracy"] == vals[best_step]
    again = evaluate_workdir(tmp_path)
    assert again["step"] == best_step
    assert again["val/accuracy"] == pytest.approx(vals[best_step], abs=1e-7)
    assert again["test/accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-7)


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    # A huge learning rate blows the parameters up after the first update; every later
    # gradient is non-finite, so those updates are skipped until max_bad_steps.
    config = tiny(
        steps=10,
        **{
            "optim.learning_rate": 1e30,
            "optim.grad_clip_norm": 0.0,
            "optim.weight_decay": 0.0,
            "train.checkpoint_every": 1,
            "train.max_bad_steps": 3,
        },
    )
    with pytest.raises(RuntimeError, match="3 consecutive non-finite steps.*intact"):
        train_and_evaluate(config, tmp_path)
    skipped = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/skipped" in r]
    assert len(skipped) == 3
    assert all(r["train/bad_parameter"].startswith("[") for r in skipped)
    # The last good checkpoint restores.
    setup = Setup(config)
    from effseq.train.checkpoint import Checkpoints

    ckpts = Checkpoints(tmp_path, 2)
    step, state, _ = ckpts.restore_latest(setup.target)
    ckpts.close()
    assert step == int(state.step) >= 1


@pytest.mark.devices(8)
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(
        ValueError, match="unknown config key 'train.stepz'; did you mean 'train.steps'"
    ):
        override(get_config(), ["train.stepz=3"])
    with pytest.raises(ValueError, match="'train.steps' must be int"):
        override(get_config(), ["train.steps=abc"])
    with pytest.raises(
        ValueError, match="train.batch_size=10 must be a positive multiple of train.micro_batches=4"
    ):
        train_and_evaluate(tiny(**{"train.batch_size": 10, "train.micro_batches": 4}), tmp_path)
    with pytest.raises(ValueError, match="mesh.data"):
        train_and_evaluate(tiny(**{"mesh.data": 3}), tmp_path)
    with pytest.raises(ValueError, match="must be divisible by mesh.data x mesh.fsdp = 8"):
        train_and_evaluate(tiny(**{"train.batch_size": 12}), tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("nope.py:gla")


@pytest.mark.parametrize(
    "item, match",
    [
        ("train.checkpoint_every=0", "'train.checkpoint_every' must be >= 1, got 0"),
        ("train.steps_per_call=0", "'train.steps_per_call' must be >= 1, got 0"),
        ("train.eval_every=-5", "'train.eval_every' must be >= 1, got -5"),
        ("model.short_conv=1", "'model.short_conv' must be 0 .none. or >= 2 taps"),
        ("model.dropout=1.0", r"'model.dropout' must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_values_are_checked_with_their_key(item, match):
    with pytest.raises(ValueError, match=match):
        override(get_config(), [item])


def test_saving_a_step_twice_keeps_the_first(tmp_path):
    # SIGTERM can land right after the periodic save of the same step (or right after a
    # resume): the second save must be a no-op, not an error that loses the clean stop.
    from effseq.train.checkpoint import Checkpoints

    ckpts = Checkpoints(tmp_path, 2)
    state = {"x": jax.numpy.arange(3.0)}
    ckpts.save(5, state, {"next_index": 5})
    ckpts.save(5, {"x": jax.numpy.zeros(3)}, {"next_index": 99})
    ckpts.wait()
    target = {"x": jax.ShapeDtypeStruct((3,), np.float32)}
    step, restored, data = ckpts.restore_latest(target)
    ckpts.close()
    assert step == 5 and data == {"next_index": 5}
    np.testing.assert_array_equal(np.asarray(restored["x"]), [0.0, 1.0, 2.0])


def test_call_sizes_land_every_boundary_on_an_exact_step():
    from effseq.train.loop import _boundary, _call_sizes

    tc = tiny(
        steps=23,
        **{
            "train.steps_per_call": 4,
            "train.log_every": 5,
            "train.eval_every": 10,
            "train.checkpoint_every": 7,
        },
    ).train
    for start in (0, 3, 7):
        sizes = list(_call_sizes(start, tc))
        assert sum(sizes) == 23 - start and set(sizes) <= {1, 4}
        ends = np.cumsum(sizes) + start
        # Every boundary step ends a call; no call spans one.
        assert {s for s in range(start + 1, 24) if _boundary(s, tc)} <= set(ends.tolist())
        assert 4 in sizes


def test_steps_per_call_gives_bitwise_the_single_step_run(tmp_path):
    every = {"train.log_every": 3, "train.eval_every": 6, "train.checkpoint_every": 6}
    runs = {}
    for k in (1, 3):
        workdir = tmp_path / f"k{k}"
        summary = train_and_evaluate(
            tiny(steps=12, **{"train.steps_per_call": k, **every}), workdir
        )
        records = [r for r in read_jsonl(workdir / "metrics.jsonl")]
        for r in records:
            r.pop("wall_s", None), r.pop("train/tokens_per_s", None)
        config = tiny(steps=12)
        setup = Setup(config)
        from effseq.train.checkpoint import Checkpoints

        ckpts = Checkpoints(workdir, 2)
        assert ckpts.latest.all_steps() == [6, 12]
        step, state, data = ckpts.restore_latest(setup.target)
        ckpts.close()
        runs[k] = (records, jax.device_get(state), data, summary)
    (rec1, state1, data1, sum1), (rec3, state3, data3, sum3) = runs[1], runs[3]
    assert rec1 == rec3  # every logged loss, accuracy and validation metric, exactly
    assert data1 == data3
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state3), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sum1["test_accuracy"] == sum3["test_accuracy"]


def test_prefetcher_hands_errors_and_the_data_position_to_the_loop():
    from effseq.train.loop import _Prefetcher

    class Source:
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            if self.i == 4:
                raise ValueError("data/file.tsv:4: malformed row")
            return {"x": np.full((2,), self.i)}

        def get_state(self):
            return {"i": self.i}

    class Place:  # stands in for Setup: no device placement needed here
        def global_batch(self, local):
            return local

        def global_batches(self, locals_):
            return {"x": np.stack([b["x"] for b in locals_])}

    feed = _Prefetcher(iter([1, 2, 5]), Source(), Place())
    n, batch, state = feed.get()
    assert n == 1 and batch["x"].tolist() == [1, 1] and state == {"i": 1}
    n, batch, state = feed.get()
    assert n == 2 and batch["x"][:, 0].tolist() == [2, 3] and state == {"i": 3}
    with pytest.raises(ValueError, match="file.tsv:4: malformed row"):
        feed.get()
    feed.close()
