"""Self-pretraining (denoising on the task's own inputs), then fine-tuning from it."""

import json

import jax
import numpy as np
import pytest

from effseq.compare import run_compare
from effseq.configs import load_config, override
from effseq.data.generators import generate_listops
from effseq.train.checkpoint import Checkpoints
from effseq.train.loop import Setup, train_and_evaluate
from effseq.train.metrics import read_jsonl

LISTOPS = "lra/listops"  # the built-in experiment, by name
TINY = {
    "train.steps": 4,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "train.progress": False,
    "train.batch_size": 8,
    "optim.warmup_steps": 1,
    "model.d_model": 16,
    "task.options.max_length": 40,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_listops(root / "listops-1000", 64, 16, 16, min_length=8, max_length=40, progress=False)
    return root


def _config(mixer, data_dir, **extra):
    items = {**TINY, "task.data_dir": str(data_dir), **extra}
    return override(load_config(f"{LISTOPS}:{mixer}:cpu"), [f"{k}={v}" for k, v in items.items()])


def _params(workdir, config):
    setup = Setup(config, devices=jax.devices()[:1])
    ckpts = Checkpoints(workdir, 2)
    _, state, _ = ckpts.restore_best(setup.target)
    ckpts.close()
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }


# Masked-token prediction (bidirectional S4D); next-token prediction (causal GLA).
@pytest.mark.parametrize("mixer", ["s4d", pytest.param("gla", marks=pytest.mark.slow)])
def test_pretrain_then_finetune(tmp_path, data_dir, mixer):
    one = jax.devices()[:1]
    pre = _config(mixer, data_dir, **{"train.objective": "denoise", "train.mask_rate": 0.1})
    summary = train_and_evaluate(pre, tmp_path / "pre", devices=one)
    assert summary["status"] == "completed" and np.isfinite(summary["val_loss"])
    records = read_jsonl(tmp_path / "pre" / "metrics.jsonl")
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    model = Setup(pre, devices=one).model
    assert model.denoise_outputs == 16  # ListOps' vocabulary
    assert model.backbone.causal == (mixer == "gla")

    # Zero steps is not a run: the config check (before anything is built) names the key.
    with pytest.raises(ValueError, match="config key 'train.steps' must be >= 1"):
        tuned = _config(
            mixer, data_dir, **{"train.init_from": str(tmp_path / "pre"), "train.steps": 0}
        )
        train_and_evaluate(tuned, tmp_path / "bad", devices=one)
    tuned = _config(
        mixer,
        data_dir,
        **{
            "train.init_from": str(tmp_path / "pre"),
            "train.eval_every": 1,
            "train.steps": 1,
            "optim.learning_rate": 1e-12,
            "optim.ssm_learning_rate": 1e-12,
        },
    )
    train_and_evaluate(tuned, tmp_path / "tuned", devices=one)
    log = (tmp_path / "tuned" / "train.log").read_text()
    assert "initialised" in log and "from" in log
    # After one step at a negligible learning rate the backbone still equals the pretrained
    # one, and the classification head (absent from pretraining) exists.
    before, after = _params(tmp_path / "pre", pre), _params(tmp_path / "tuned", tuned)
    shared = [k for k in after if k in before]
    assert "['head']" in after and "['head']" not in before and "['denoise_head']" not in after
    assert len(shared) == len(after) - 1
    for k in shared:
        np.testing.assert_allclose(after[k], before[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_compare_pretrain_reports_both(tmp_path, data_dir):
    overrides = tuple(f"{k}={v}" for k, v in TINY.items() if not k.startswith("task.options"))
    records = run_compare(
        "default",
        mixers=("gla", "attention"),
        out=tmp_path / "out",
        data_dir=str(data_dir),
        overrides=overrides + ("train.eval_batches=2", "model.d_model=32"),
        pretrain=True,
        devices=jax.devices()[:1],
        log=lambda m: None,
    )
    listops = {r["mixer"]: r for r in records if r["task"] == "lra/listops"}
    assert set(listops) == {"gla", "attention", "gla+pretrain", "attention+pretrain"}
    for name in ("gla+pretrain", "attention+pretrain"):
        r = listops[name]
        assert r["status"] == "completed" and r["pretrained"] is True
        assert r["pretrain_status"] == "completed" and r["pretrain_steps"] == 4
    mqar = [r for r in records if r["task"] == "synthetic/mqar"]
    assert {r["mixer"] for r in mqar} == {"gla", "attention"}  # language-model task: no SPT
    table = (tmp_path / "out" / "results.md").read_text()
    assert "gla+pretrain" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["task"] == "lra/listops"
