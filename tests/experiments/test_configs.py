"""Every experiment config loads by name, validates and builds its model; user files load by
path; the LRA published data is well formed. Models are only traced (jax.eval_shape), never
trained."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from effseq import data
from effseq.configs import builtin_experiments, load_config
from effseq.experiments.lra import listops, published
from effseq.models import build
from effseq.models.registry import MIXERS
from effseq.train import objectives

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
TASKS = {
    "listops": "lra/listops",
    "text": "lra/text",
    "retrieval": "lra/retrieval",
    "image": "lra/image",
    "pathfinder": "lra/pathfinder32",
    "pathx": "lra/pathx",
}
PRESETS = ("cpu", "full")
MIXER_NAMES = ("s4d", "sgconv", "mamba", "gla", "attention")


def _abstract_variables(config):
    info = data.task_info(config.task.name, **config.task.options)
    _, variables = build.abstract_model(config, info)  # jax.eval_shape: nothing computed
    return info, variables


def _num_params(variables) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


@pytest.mark.parametrize("mixer", MIXER_NAMES)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", MODULES)
def test_lra_config_builds(name, preset, mixer):
    config = load_config(f"lra/{name}:{mixer}:{preset}")
    assert config.task.name == TASKS[name]
    assert config.model.mixer == mixer
    assert config.task.data_dir == ""  # $EFFSEQ_DATA_DIR
    assert config.mesh.data == -1
    assert 0 < config.optim.warmup_steps <= config.train.steps
    assert 0 < config.train.eval_every <= config.train.steps
    # Only fields the mixer's layer has may be passed to it.
    fields = {f.name for f in dataclasses.fields(MIXERS[mixer])}
    assert set(config.model.mixer_options) <= fields, set(config.model.mixer_options) - fields
    info, variables = _abstract_variables(config)
    assert info.name == TASKS[name]
    assert _num_params(variables) > 0


EPOCHS = {"listops": 40, "text": 32, "retrieval": 20, "image": 200, "pathfinder": 200, "pathx": 50}


def test_full_recipes_match_published_numbers():
    """Spot checks of the S4D recipe numbers (state-spaces/s4 s4-lra-*.yaml) and the epoch ->
    step conversion (dataset size // batch x epochs)."""
    expect = {  # name: (layers, width, batch, steps, lr, weight decay, prenorm, pooling)
        "listops": (8, 128, 50, 96_000 // 50 * 40, 0.01, 0.05, False, "mean"),
        "text": (6, 256, 16, 25_000 // 16 * 32, 0.01, 0.05, True, "mean"),
        "retrieval": (6, 256, 64, 147_086 // 64 * 20, 0.01, 0.05, True, "mean"),
        "image": (6, 512, 50, 45_000 // 50 * 200, 0.01, 0.05, False, "mean"),
        "pathfinder": (6, 256, 64, 160_000 // 64 * 200, 0.004, 0.03, True, "last"),
        "pathx": (6, 256, 16, 160_000 // 16 * 50, 0.001, 0.05, True, "mean"),
    }
    for name, want in expect.items():
        c = load_config(f"lra/{name}:s4d:full")
        got = (
            c.model.n_layers,
            c.model.d_model,
            c.train.batch_size,
            c.train.steps,
            c.optim.learning_rate,
            c.optim.weight_decay,
            c.model.prenorm,
            c.model.pooling,
        )
        assert got == want, name
        assert c.model.mixer_options.state_size == 32  # complex modes: the paper's N = 64
        assert c.optim.ssm_weight_decay == 0.0
        assert c.optim.ssm_learning_rate == (0.0005 if name == "pathx" else 0.001)
        assert c.train.eval_every == c.train.steps // EPOCHS[name]  # about an epoch


def test_sgconv_uses_its_own_recipe_where_published():
    c = load_config("lra/pathx:sgconv:full")
    assert (c.train.batch_size, c.optim.learning_rate, c.train.steps) == (64, 0.004, 125_000)
    assert c.model.mixer_options.kernel_dim == 64
    image = load_config("lra/image:sgconv:full")
    assert image.model.dropout == 0.2
    assert load_config("lra/image:s4d:full").model.dropout == 0.1


def test_listops_cpu_preset_runs_forward():
    """The preset `make run` trains: real parameters and one forward pass on a zero batch."""
    config = listops.get_config("s4d:cpu")
    assert config.task.options.max_length == listops.CPU_DATA["max_length"]
    assert listops.CPU_DATA["min_length"] < listops.CPU_DATA["max_length"] - 1
    info = data.task_info(config.task.name, **config.task.options)
    model = build.build_model(config.model, info)
    batch = build.example_batch(info, batch=2)
    variables = build.init_variables(model, jax.random.key(0), batch)
    logits = objectives.apply_model(model, variables, batch)
    assert logits.shape == (2, info.num_classes)
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize(
    "arg, mixer, preset",
    [
        (None, "s4d", "cpu"),
        ("gla", "gla", "cpu"),
        ("attention:full", "attention", "full"),
        ("gla,attention:full", "gla,attention", "full"),
        (":full", "s4d", "full"),
    ],
)
def test_arg_parsing(arg, mixer, preset):
    config = listops.get_config(arg)
    assert config.model.mixer == mixer
    assert config.train.steps == (1500 if preset == "cpu" else 76_800)


def test_hybrid_pattern_gets_only_shared_options():
    config = load_config("lra/listops:gla,gla,gla,attention:full")
    assert dict(config.model.mixer_options) == {"num_heads": 4}
    _abstract_variables(config)


def test_pattern_not_dividing_depth_is_rejected():
    with pytest.raises(ValueError, match="multiple of the pattern length"):
        load_config("lra/text:gla,gla,gla,attention:full")  # 6 layers


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*cpu, full"):
        load_config("lra/listops:s4d:huge")


def test_unknown_mixer_is_named():
    with pytest.raises(ValueError, match="unknown mixer 'lstm'"):
        load_config("lra/listops:lstm:cpu")


def test_published_table():
    assert set(published.PUBLISHED) == set(TASKS.values())
    for task, rows in published.PUBLISHED.items():
        assert task in data.list_tasks()
        for model, (accuracy, source) in rows.items():
            assert 0.0 < accuracy <= 100.0, (task, model)
            assert source, (task, model)
    assert published.PUBLISHED["lra/listops"]["transformer"][0] == 36.37
    assert "transformer" not in published.PUBLISHED["lra/pathx"]  # failed there
    for task, model in published.UNVERIFIED:
        assert model in published.PUBLISHED[task]
    for mixer, rows in published.MIXER_ROWS.items():
        assert mixer in MIXERS
        assert all(any(r in t for t in published.PUBLISHED.values()) for r in rows)


@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_smoke_config_builds(mixer):
    config = load_config(f"smoke:{mixer}")
    assert config.model.mixer == mixer
    _, variables = _abstract_variables(config)
    assert _num_params(variables) > 0


# Every built-in experiment with the arguments its docstring documents, and what they set.
DOCUMENTED = {
    "smoke": ("gla", {"model.mixer": "gla", "model.d_model": 64}),
    "mqar": ("attention:32", {"model.mixer": "attention", "model.d_model": 32}),
    "lra/listops": ("s4d:cpu", {"task.name": "lra/listops", "model.mixer": "s4d"}),
    "lra/text": ("gla:full", {"task.name": "lra/text", "model.mixer": "gla"}),
    "lra/retrieval": ("mamba", {"task.name": "lra/retrieval", "model.mixer": "mamba"}),
    "lra/image": ("sgconv:cpu", {"task.name": "lra/image", "model.mixer": "sgconv"}),
    "lra/pathfinder": ("attention:full", {"task.name": "lra/pathfinder32"}),
    "lra/pathx": ("s4d:full", {"task.name": "lra/pathx", "model.mixer": "s4d"}),
}


def test_every_builtin_name_resolves_from_any_directory(tmp_path, monkeypatch):
    """NAME[:ARG] with ARG everything after the first colon, from outside the checkout."""
    monkeypatch.chdir(tmp_path)
    assert set(builtin_experiments()) == set(DOCUMENTED)
    for name, (arg, want) in DOCUMENTED.items():
        config = load_config(f"{name}:{arg}")
        for key, value in want.items():
            section, leaf = key.split(".")
            assert config[section][leaf] == value, (name, key)
        assert load_config(name).task.name == config.task.name  # no ARG: get_config(None)


def test_unknown_name_lists_the_builtin_names():
    with pytest.raises(ValueError) as e:
        load_config("lra/listop:s4d:cpu")
    message = str(e.value)
    assert "\n" not in message and "unknown experiment 'lra/listop'" in message
    assert all(name in message for name in DOCUMENTED)
    with pytest.raises(ValueError, match="unknown experiment 'lra/published'"):
        load_config("lra/published")  # a module of the package, but no experiment


def test_user_file_loads_by_path(tmp_path, monkeypatch):
    """The checkout's example experiment, by relative path, and a file that is not named .py."""
    monkeypatch.chdir(ROOT)
    config = load_config("experiments/example.py:attention")
    assert (config.model.mixer, config.model.d_model) == ("attention", 32)
    assert config.model.mixer_options.attention.rotary  # the smoke experiment's, kept
    plain = tmp_path / "smoke"  # an existing file wins over the built-in of the same name
    plain.write_text("from effseq.experiments import mqar\nget_config = mqar.get_config\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("smoke:gla:16").model.d_model == 16
    with pytest.raises(FileNotFoundError, match="config file 'missing.py' does not exist"):
        load_config("missing.py:gla")


def test_cli_names_an_unknown_experiment_in_one_line(tmp_path, capsys):
    from effseq.cli import main

    assert main(["train", "--config", "smok:gla", "--workdir", str(tmp_path / "w")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("effseq train: error: unknown experiment 'smok'; built-in: lra/image")
    assert not (tmp_path / "w").exists()
