"""train.pack: packed training batches through the objective and the loop."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest

from effseq.configs import load_config, override
from effseq.data import TaskInfo
from effseq.train import objectives
from effseq.train.loop import Setup, train_and_evaluate
from effseq.train.metrics import read_jsonl

TINY = {
    "train.steps": 3,
    "train.steps_per_call": 1,
    "train.eval_every": 3,
    "train.eval_batches": 1,
    "train.checkpoint_every": 3,
    "train.log_every": 1,
    "train.progress": False,
    "train.test": False,
    "train.batch_size": 4,
    "optim.warmup_steps": 1,
    "model.d_model": 16,
    "model.n_layers": 1,
    "task.options.num_examples": 256,
    "task.options.num_eval_examples": 16,
    "task.options.seq_len": 64,
    "task.options.min_len": 16,  # MQAR documents of 16..64 tokens
}


def _config(**extra):
    items = {**TINY, "train.pack": True, **extra}
    return override(load_config("smoke:gla"), [f"{k}={v}" for k, v in items.items()])


def test_pack_refused_where_a_task_cannot_be_packed():
    with pytest.raises(ValueError, match=r"train.pack=True: task 'lra/listops' cannot be packed"):
        Setup(override(load_config("lra/listops:gla:cpu"), ["train.pack=True"]))
    pixels = TaskInfo("lra/image", None, 1, 10, 1024)
    with pytest.raises(ValueError, match="train.pack=True.*continuous"):
        objectives.check_pack(pixels, "denoise")
    pairs = TaskInfo("lra/retrieval", 257, None, 2, 64, two_sequence=True)
    with pytest.raises(ValueError, match="train.pack=True.*pairs"):
        objectives.check_pack(pairs, "denoise")
    objectives.check_pack(TaskInfo("lra/listops", 20, None, 10, 64), "denoise")  # packable


def _unpacked(batch):
    """Each packed document in a row of its own (right-padded), without segment_ids."""
    rows = {k: [] for k in ("inputs", "label", "weights", "mask") if k in batch}
    for r, seg in enumerate(batch["segment_ids"]):
        for k in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == k)
            for key, out in rows.items():
                row = np.zeros_like(batch[key][r])
                row[: len(where)] = batch[key][r, where]
                out.append(row)
    out = {k: np.stack(v) for k, v in rows.items()}
    out["example_weight"] = np.ones(len(out["inputs"]), np.float32)
    return out


def test_packed_loss_equals_each_document_alone():
    """The objective on a packed batch sums exactly the documents' own losses: nothing of one
    document reaches another (the model reads batch["segment_ids"]; every mixer's own packing
    is checked by the mixers' tests)."""
    setup = Setup(_config(), devices=jax.devices()[:1])
    state = setup.init_state()
    batch = next(setup.batches("train", train=True))
    assert batch["segment_ids"].max() >= 2  # several documents in a row
    loss_fn = jax.jit(lambda v, b: setup.loss_fn(v, b, jax.random.key(0), False))
    packed = loss_fn(state.variables(), batch)
    alone = loss_fn(state.variables(), _unpacked(batch))
    for p, a in zip(packed, alone, strict=True):
        np.testing.assert_allclose(float(p), float(a), rtol=2e-5)


def test_denoise_next_token_never_crosses_a_document():
    info = TaskInfo("toy", 20, None, 4, 8)
    seen = {}

    class Spy:  # a causal model that records the batch it is given
        backbone = types.SimpleNamespace(causal=True)

        def apply(self, variables, batch, deterministic, method, **kw):
            seen.update(batch)
            b, t = batch["inputs"].shape
            return jax.numpy.zeros((b, t, 20))

    loss_fn = objectives.make_loss_fn(Spy(), info, "denoise", 0.1)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0]], np.int32)
    batch = {
        "inputs": np.array([[5, 6, 7, 8, 9, 10, 0, 0]], np.int32),
        "mask": seg != 0,
        "segment_ids": seg,
        "example_weight": np.ones(1, np.float32),
    }
    _, _, weight = loss_fn({}, batch, jax.random.key(0), True)
    # Scored: 5->6, 6->7, 8->9 (not 7->8 or 9->10, each a document's last token).
    assert float(weight) == 3.0
    np.testing.assert_array_equal(seen["segment_ids"], seg)


def test_train_with_pack_end_to_end(tmp_path):
    summary = train_and_evaluate(_config(), tmp_path, devices=jax.devices()[:1])
    assert summary["status"] == "completed" and np.isfinite(summary["val_loss"])
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    # The checkpoint records the packed stream's position: more documents than rows consumed.
    data_state = json.loads((tmp_path / "checkpoints" / "3" / "data" / "metadata").read_text())
    assert data_state["next_document"] > 3 * TINY["train.batch_size"]


def test_denoise_pretraining_packs_a_classifiers_tokens(tmp_path):
    """Self-pretraining (next-token prediction, causal) on ListOps' expressions, packed: the
    classifier's scalar labels are dropped and each document's loss is its own."""
    from effseq.data.generators import generate_listops

    generate_listops(tmp_path / "listops-1000", 64, 16, 16, min_length=8, max_length=40,
                     progress=False)  # fmt: skip
    items = {
        **{k: v for k, v in TINY.items() if not k.startswith("task.options")},
        "task.data_dir": str(tmp_path),
        "task.options.max_length": 40,
        "train.objective": "denoise",
        "model.bidirectional": "no",
        "train.pack": True,
    }
    config = override(load_config("lra/listops:gla:cpu"), [f"{k}={v}" for k, v in items.items()])
    setup = Setup(config, devices=jax.devices()[:1])
    batch = next(setup.batches("train", train=True))
    assert set(batch) == {"inputs", "mask", "segment_ids", "example_weight"}
    assert batch["segment_ids"].max() >= 2
    state = setup.init_state()
    loss_fn = jax.jit(lambda v, b: setup.loss_fn(v, b, jax.random.key(0), False))
    packed = loss_fn(state.variables(), batch)
    alone = loss_fn(state.variables(), _unpacked(batch))
    for p, a in zip(packed, alone, strict=True):
        np.testing.assert_allclose(float(p), float(a), rtol=2e-5)
