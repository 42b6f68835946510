"""Long Range Arena: published accuracies (as data) and the recipe -> config step shared by the
six task configs in this folder.

``PUBLISHED[task][model] = (test accuracy in percent, source)``. Model keys: ``transformer``
(Tay et al. 2021, "Long Range Arena", Table 1), ``s4d-legs`` / ``s4d-inv`` / ``s4d-lin``
(Gu, Gupta, Goel & Re 2022, "On the Parameterization and Initialization of Diagonal State
Space Models", LRA table), ``sgconv`` (Li, Cai, Zhang, Chen & Dey 2022, "What Makes
Convolutional Models Great on Long Sequence Modeling?", LRA table). A model that failed a task
(chance accuracy, e.g. the Transformer and S4D-Lin on Path-X) has no entry there.

``UNVERIFIED`` lists the (task, model) entries that could not be checked against any text
during writing: they are quoted from memory of the papers' tables and must be checked against
the PDFs before being cited. The others were cross-checked against secondary reproductions of
the tables (not the primary PDFs): the Transformer and S4D-LegS rows against a public LRA
summary table that reproduces both rows to two decimals, and S4D-LegS again against the LRU
paper's Table 3 (Orvieto et al. 2023) to one decimal for every task except Image; S4D-Inv's
Path-X entry against a public Path-X leaderboard table.

The task configs import :func:`build` from here; ``effseq compare`` reads ``PUBLISHED``.
"""

from __future__ import annotations

_T = "Tay et al. 2021, Table 1"
_S4D = "Gu et al. 2022 (S4D), LRA table"
_SG = "Li et al. 2022 (SGConv), LRA table"

PUBLISHED: dict[str, dict[str, tuple[float, str]]] = {
    "lra/listops": {
        "transformer": (36.37, _T),
        "s4d-legs": (60.47, _S4D),
        "s4d-inv": (60.18, _S4D),
        "s4d-lin": (60.52, _S4D),
        "sgconv": (61.45, _SG),
    },
    "lra/text": {
        "transformer": (64.27, _T),
        "s4d-legs": (86.18, _S4D),
        "s4d-inv": (87.34, _S4D),
        "s4d-lin": (86.97, _S4D),
        "sgconv": (89.20, _SG),
    },
    "lra/retrieval": {
        "transformer": (57.46, _T),
        "s4d-legs": (89.46, _S4D),
        "s4d-inv": (91.09, _S4D),
        "s4d-lin": (90.96, _S4D),
        "sgconv": (91.11, _SG),
    },
    "lra/image": {
        "transformer": (42.44, _T),
        "s4d-legs": (88.19, _S4D),
        "s4d-inv": (87.83, _S4D),
        "s4d-lin": (87.93, _S4D),
        "sgconv": (87.97, _SG),
    },
    "lra/pathfinder32": {
        "transformer": (71.40, _T),
        "s4d-legs": (93.06, _S4D),
        "s4d-inv": (93.78, _S4D),
        "s4d-lin": (93.96, _S4D),
        "sgconv": (95.46, _SG),
    },
    "lra/pathx": {
        "s4d-legs": (91.95, _S4D),
        "s4d-inv": (92.80, _S4D),
        "sgconv": (97.83, _SG),
    },
}

# verified=False: quoted from memory, not found in any searchable text (see the docstring).
UNVERIFIED: frozenset[tuple[str, str]] = frozenset(
    {(task, "s4d-inv") for task in PUBLISHED if task != "lra/pathx"}
    | {(task, "s4d-lin") for task in PUBLISHED if "s4d-lin" in PUBLISHED[task]}
    | {(task, "sgconv") for task in PUBLISHED}
)

# Which published rows stand beside an effseq mixer's results.
MIXER_ROWS: dict[str, tuple[str, ...]] = {
    "s4d": ("s4d-legs", "s4d-inv", "s4d-lin"),
    "sgconv": ("sgconv",),
    "attention": ("transformer",),
}

PRESETS = ("cpu", "full")
DEFAULT_MIXER = "s4d"
DEFAULT_PRESET = "cpu"


def parse_arg(arg: str | None) -> tuple[str, str]:
    """``"MIXER"`` or ``"MIXER:PRESET"`` -> (mixer, preset). Mixer patterns contain commas, never
    colons, so the preset is whatever follows the last colon. Empty parts take the defaults."""
    text = arg or ""
    mixer, _, preset = text.rpartition(":") if ":" in text else (text, "", "")
    mixer = mixer.strip() or DEFAULT_MIXER
    preset = preset.strip() or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} in config argument {arg!r}; presets: {', '.join(PRESETS)}"
        )
    return mixer, preset


def mixer_options(mixer: str, table: dict[str, dict]) -> dict:
    """The mixer hyper-parameters for ``mixer`` (one name or a comma pattern) from ``table``
    (mixer name -> layer field -> value). A pattern gets only the fields every mixer in it has
    with the same value, since ``model.mixer_options`` goes to every layer of the stack."""
    from effseq.models import registry  # here: listing the experiments needs no flax

    names = registry.names(mixer)
    for name in names:
        if name not in table:
            raise ValueError(f"unknown mixer {name!r} in {mixer!r}; known: {', '.join(table)}")
    first = table[names[0]]
    return {
        key: value
        for key, value in first.items()
        if all(key in table[n] and table[n][key] == value for n in names[1:])
    }


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    # The trainer drops the incomplete last batch.
    return train_size // batch_size


def build(task: str, recipes: dict[str, dict], arg: str | None):
    """A validated base config for ``task`` from ``recipes[preset]`` and the mixer in ``arg``.

    A recipe has the keys: train_size, epochs or steps, batch_size, n_layers, d_model,
    learning_rate, ssm_learning_rate, weight_decay, warmup_steps, dropout, prenorm, pooling,
    task_options, mixers (mixer -> layer fields), eval_batches, log_every; optionally
    eval_every and checkpoint_every (default: once per epoch), steps_per_call, and
    ``per_mixer`` (mixer -> recipe keys that the mixer's own paper, or a learning-rate sweep,
    sets differently), applied when the whole model uses that one mixer.
    """
    from effseq.configs import get_config, validate
    from effseq.models.registry import parse_pattern

    mixer, preset = parse_arg(arg)
    recipe = dict(recipes[preset])
    recipe.update(recipe.pop("per_mixer", {}).get(mixer, {}))
    parse_pattern(mixer, recipe["n_layers"])  # names and depth checked before any model exists

    c = get_config()
    c.task.name = task
    for key, value in recipe["task_options"].items():
        c.task.options[key] = value
    c.model.mixer = mixer
    c.model.d_model = recipe["d_model"]
    c.model.n_layers = recipe["n_layers"]
    # The S4 backbone: norm -> mixer (whose output projection ends in a GLU) -> dropout ->
    # residual, with no separate MLP. The published recipes use BatchNorm on most tasks; effseq
    # has LayerNorm and RMSNorm only, so LayerNorm stands in for it.
    c.model.norm = "layernorm"
    c.model.mlp = "none"
    c.model.prenorm = recipe["prenorm"]
    c.model.dropout = recipe["dropout"]
    c.model.pooling = recipe["pooling"]
    c.model.bidirectional = "auto"  # bidirectional wherever the mixer has the form (not GLA)
    for key, value in mixer_options(mixer, recipe["mixers"]).items():
        c.model.mixer_options[key] = value

    epoch = steps_per_epoch(recipe["train_size"], recipe["batch_size"])
    steps = recipe["steps"] if "steps" in recipe else recipe["epochs"] * epoch
    every = min(epoch, steps)
    c.train.steps = steps
    c.train.batch_size = recipe["batch_size"]
    # Once per epoch unless the recipe sets its own cadence (the CPU presets validate more
    # often, so that the report can see whether a run was still improving at its end).
    c.train.eval_every = recipe["eval_every"] if "eval_every" in recipe else every
    c.train.checkpoint_every = recipe["checkpoint_every"] if "checkpoint_every" in recipe else every
    if "steps_per_call" in recipe:
        c.train.steps_per_call = recipe["steps_per_call"]
    c.train.log_every = recipe["log_every"]
    c.train.eval_batches = recipe["eval_batches"]

    c.optim.name = "adamw"
    c.optim.schedule = "cosine"
    c.optim.min_lr_ratio = 0.0
    c.optim.learning_rate = recipe["learning_rate"]
    c.optim.ssm_learning_rate = recipe["ssm_learning_rate"]
    c.optim.weight_decay = recipe["weight_decay"]
    c.optim.ssm_weight_decay = 0.0
    c.optim.warmup_steps = min(recipe["warmup_steps"], steps)
    c.mesh.data = -1
    return validate(c)
