"""The base config: every key of every run, with its default and what it means.

Experiments (the built-in ones in :mod:`effseq.experiments`, or a user's file; both found by
:func:`load_config`) start from :func:`get_config` and change values; they never add keys, and
code never reads a key with a fallback default. :func:`validate` checks a config against this
one, so a misspelt key fails with the closest valid name instead of being ignored.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.machinery
import importlib.util
import pathlib
import pkgutil

import ml_collections

ConfigDict = ml_collections.ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # parameter init, data order and dropout all derive from it

    c.task = ConfigDict()
    c.task.name = "synthetic/mqar"  # a name from effseq.data.list_tasks()
    # Options passed to effseq.data.load_task / task_info (e.g. seq_len, num_kv_pairs).
    c.task.options = ConfigDict()
    c.task.data_dir = ""  # empty: $EFFSEQ_DATA_DIR

    c.model = ConfigDict()
    c.model.mixer = "gla"  # s4d | sgconv | mamba | gla | attention, or a comma pattern
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.norm = "layernorm"  # layernorm | rmsnorm
    c.model.prenorm = True
    c.model.mlp = "glu"  # none | gelu | glu | sqrelu
    c.model.mlp_ratio = 2
    c.model.dropout = 0.0
    c.model.pooling = "mean"  # classifiers: mean | last | first
    c.model.bidirectional = "auto"  # classifiers: auto (where every mixer has a form) | yes | no
    c.model.tie_embeddings = True  # sequence-labelling (language-model) tasks
    c.model.remat = False  # recompute each layer's activations in the backward pass
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.model.mixer_options = ConfigDict()  # extra fields of the mixer layer, e.g. state_size
    # Taps of a short causal depthwise convolution in front of every mixer (Zoology's fairness
    # recipe, Arora et al. 2023); 0: none, the mixers as published.
    c.model.short_conv = 0

    c.train = ConfigDict()
    c.train.steps = 1000  # optimizer updates
    c.train.batch_size = 32  # global batch, over all processes and devices
    c.train.micro_batches = 1  # gradient accumulation: the batch in this many sequential parts
    # Optimizer steps per jitted call (a scan over k batches): fewer dispatches for small
    # models; the same updates, and logging, evaluation and checkpoints still on exact steps.
    c.train.steps_per_call = 1
    c.train.log_every = 50  # steps between metrics.jsonl lines
    c.train.eval_every = 200  # steps between validation passes (and best-checkpoint updates)
    c.train.eval_batches = 0  # validation batches per pass; 0 = the whole split
    c.train.checkpoint_every = 200  # steps between checkpoints (also saved at the end)
    c.train.keep_checkpoints = 2  # latest checkpoints kept (the best one is kept apart)
    c.train.max_bad_steps = 5  # consecutive non-finite steps before the run stops
    c.train.progress = True  # progress bar on stderr
    c.train.test = True  # evaluate the test split on the best-validation checkpoint at the end
    # supervised | denoise (self-pretraining on the task's inputs; Amos et al. 2023)
    c.train.objective = "supervised"
    c.train.mask_rate = 0.15  # denoise: fraction of positions masked (bidirectional models)
    # A workdir whose best checkpoint initialises every parameter it shares with this model
    # (fine-tuning after pretraining); empty: none. Only a fresh run reads it, not a resume.
    c.train.init_from = ""
    # Pack documents of varying length into the training rows (first-fit; effseq.data.packing),
    # the model told where each starts by batch["segment_ids"]. Token tasks trained per
    # position only: language-model tasks (MQAR, copying, induction heads; their min_len
    # option varies the lengths) and denoise pretraining on a classifier's token inputs.
    # Evaluation stays unpacked.
    c.train.pack = False

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # adamw | adam | sgd
    c.optim.learning_rate = 1e-3
    c.optim.ssm_learning_rate = 1e-3  # SSM-tagged parameters (A, dt, B, ...)
    c.optim.weight_decay = 0.01  # matrices; vectors and SSM parameters get none
    c.optim.ssm_weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9  # sgd
    c.optim.grad_clip_norm = 1.0  # global norm; 0 disables
    c.optim.schedule = "cosine"  # cosine | linear | constant | wsd | power
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 0.0  # final learning rate as a fraction of the peak
    c.optim.wsd_decay_fraction = 0.1  # wsd/power: fraction of steps in the final decay
    c.optim.power_a = 4.6  # Power scheduler (Shen et al. 2024) constants
    c.optim.power_b = 0.51
    c.optim.decay_vectors = False  # also weight-decay biases and norm scales

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1: all devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Sequence (context) parallelism: every row's time steps split over this many devices,
    # each op exchanging exactly what crosses the cut (effseq.ops.sequence).
    c.mesh.sequence = 1
    c.mesh.rules = "dp"  # dp | fsdp | fsdp_tp (effseq.sharding.RULES)

    c.distributed = ConfigDict()
    # Multi-host: set all three (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    # JAX_PROCESS_ID environment variables); empty/0 means one process.
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


def _flat_keys(config: ConfigDict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ConfigDict) and len(value) and not _free(path):
            out.update(_flat_keys(value, path + "."))
        else:
            out[path] = value
    return out


# Sections whose keys depend on the task or mixer: free-form, checked by the code they feed.
FREE_SECTIONS = ("task.options", "model.mixer_options")


def _free(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in FREE_SECTIONS)


def _unknown(key: str, valid) -> ValueError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}")


def validate(config: ConfigDict) -> ConfigDict:
    """Checks that ``config`` has exactly the base config's keys (free-form sections aside)
    and the values' types match; returns it. Raises ValueError naming the key."""
    base = _flat_keys(get_config())
    have = _flat_keys(config)
    for key, value in have.items():
        if _free(key):
            continue
        if key not in base:
            raise _unknown(key, base)
        want = base[key]
        if isinstance(want, bool) != isinstance(value, bool) or (
            not isinstance(value, type(want)) and not (isinstance(want, float) and _is_int(value))
        ):
            raise ValueError(
                f"config key {key!r} must be {type(want).__name__}, got {value!r} "
                f"({type(value).__name__})"
            )
    for key in base:
        if key not in have:
            raise ValueError(
                f"config key {key!r} is missing (start from effseq.configs.get_config)"
            )
    check_values(config)
    return config


# Keys whose values must be at least this (counts, cadences, sizes).
MINIMUM = {
    "model.d_model": 1,
    "model.n_layers": 1,
    "model.mlp_ratio": 1,
    "model.short_conv": 0,
    "train.steps": 1,
    "train.batch_size": 1,
    "train.micro_batches": 1,
    "train.steps_per_call": 1,
    "train.log_every": 1,
    "train.eval_every": 1,
    "train.eval_batches": 0,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 1,
    "train.max_bad_steps": 1,
    "optim.warmup_steps": 0,
}


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of every key that names a choice, from the modules that own them."""
    # Imported here: the config is plain data, and these modules import jax and flax.
    from effseq import sharding
    from effseq.models import backbone, build, classifier
    from effseq.train import objectives, optimizer

    return {
        "model.norm": backbone.NORMS,
        "model.mlp": backbone.MLPS,
        "model.pooling": classifier.POOLINGS,
        "model.dtype": tuple(build.DTYPES),
        "model.bidirectional": BIDIRECTIONAL_CHOICES,
        "train.objective": objectives.OBJECTIVES,
        "optim.name": optimizer.OPTIMIZERS,
        "optim.schedule": optimizer.SCHEDULES,
        "mesh.rules": tuple(sharding.RULES),
    }


BIDIRECTIONAL_CHOICES = ("auto", "yes", "no")


def check_values(config: ConfigDict) -> None:
    """The one check of a config's values, before anything is built; each error names its
    key: counts and cadences in range (e.g. ``train.checkpoint_every`` >= 1), fractions in
    [0, 1), choices among their values, the mixer pattern against the registry and the depth,
    the direction against the mixers, and mixer options against the mixers' fields."""
    from effseq.models import registry
    from effseq.train import optimizer

    flat = _flat_keys(config)
    for key, least in MINIMUM.items():
        if flat[key] < least:
            raise ValueError(f"config key {key!r} must be >= {least}, got {flat[key]!r}")
    if flat["model.short_conv"] == 1:
        raise ValueError("config key 'model.short_conv' must be 0 (none) or >= 2 taps, got 1")
    for key in ("model.dropout", "train.mask_rate"):
        if not 0.0 <= flat[key] < 1.0:
            raise ValueError(f"config key {key!r} must be in [0, 1), got {flat[key]!r}")
    if flat["train.objective"] == "denoise" and flat["train.mask_rate"] == 0:
        raise ValueError("config key 'train.mask_rate' must be > 0 for train.objective='denoise'")
    for key, allowed in choices().items():
        if flat[key] not in allowed:
            raise ValueError(
                f"config key {key!r}: unknown value {flat[key]!r}; choose one of {list(allowed)}"
            )
    model = config.model
    try:
        pattern = registry.parse_pattern(model.mixer, model.n_layers)
    except ValueError as e:
        raise ValueError(f"config key 'model.mixer': {e}") from None
    causal_only = registry.causal_only(pattern)
    if model.bidirectional == "yes" and causal_only:
        raise ValueError(
            f"config key 'model.bidirectional': 'yes' needs every mixer to have a bidirectional "
            f"form; mixer {causal_only[0]!r} is causal only"
        )
    options = model.mixer_options.to_dict()
    for name in dict.fromkeys(pattern):
        registry.check_fields(name, options)
    optimizer.check(config.optim, config.train.steps)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_value(text: str, like):
    if isinstance(like, str):
        return text
    if isinstance(like, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(like, float) and _is_int(value):
        value = float(value)
    return value


def split_assignment(item: str, what: str = "config override") -> tuple[str, str]:
    """``"KEY=VALUE"`` -> (KEY, VALUE text); ValueError naming ``what`` otherwise."""
    if "=" not in item:
        raise ValueError(f"{what} {item!r} must look like KEY=VALUE")
    key, text = item.split("=", 1)
    return key, text


def parse_literal(text: str):
    """A ``KEY=VALUE`` value with no existing value to follow: a Python literal where it
    parses (numbers, booleans, lists), else the text."""
    return _parse_value(text, None)


def override(config: ConfigDict, assignments: list[str]) -> ConfigDict:
    """Applies ``KEY=VALUE`` strings (the CLI's ``--config.KEY=VALUE``) to ``config``.

    Values are parsed as the existing value's type; keys in free-form sections
    (task.options, model.mixer_options) may be new and are parsed as Python literals.
    """
    base = _flat_keys(config)
    for item in assignments:
        key, text = split_assignment(item)
        if key not in base and not _free(key):
            raise _unknown(key, base)
        try:
            value = _parse_value(text, base.get(key))
        except ValueError as e:
            raise ValueError(f"config key {key!r}: {e}") from None
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split(".") if parent else []:
            node = node[part]
        try:
            with config.unlocked():
                node[leaf] = value
        except TypeError:
            raise ValueError(
                f"config key {key!r} must be {type(base.get(key)).__name__}, got {text!r}"
            ) from None
    return validate(config)


def run_file(path: str | pathlib.Path, prefix: str):
    """Runs the Python file ``path`` as a fresh module named ``{prefix}_{stem}``; returns it.
    (A user's file, named on the command line; the package's own modules are imported.)"""
    path = pathlib.Path(path)
    name = f"{prefix}_{path.stem}"
    # An explicit source loader: the file need not end in .py.
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The package of the built-in experiments, addressed by name ("smoke", "lra/listops").
EXPERIMENTS = "effseq.experiments"


@functools.cache
def builtin_experiments() -> tuple[str, ...]:
    """The built-in experiments' names, sorted: every module of :mod:`effseq.experiments`
    with a ``get_config``, "/" between subpackages (e.g. ``lra/listops``, ``smoke``)."""
    package = importlib.import_module(EXPERIMENTS)
    names = []
    for info in pkgutil.walk_packages(package.__path__, EXPERIMENTS + "."):
        if not info.ispkg and hasattr(importlib.import_module(info.name), "get_config"):
            names.append(info.name.removeprefix(EXPERIMENTS + ".").replace(".", "/"))
    return tuple(sorted(names))


def experiment_module(name: str):
    """The built-in experiment ``name`` (e.g. ``lra/listops``), imported; ValueError listing
    the built-in names when there is none of that name."""
    names = builtin_experiments()
    if name not in names:
        raise ValueError(
            f"unknown experiment {name!r}; built-in: {', '.join(names)} (or a file: PATH.py[:ARG])"
        )
    return importlib.import_module(f"{EXPERIMENTS}.{name.replace('/', '.')}")


def load_config(spec: str) -> ConfigDict:
    """A ``--config`` spec -> that experiment's ``get_config(ARG)``, validated.

    ``NAME[:ARG]``: the built-in experiment NAME (:func:`builtin_experiments`), imported
    from :mod:`effseq.experiments`: ``smoke:gla``, ``lra/listops:s4d:cpu``. ARG is
    everything after the first colon (here ``"s4d:cpu"``), passed to ``get_config``; without
    it ``get_config(None)``. ``PATH[:ARG]``: a user's experiment file, run by path, when the
    part before the first colon ends in ``.py`` or is an existing file
    (``experiments/example.py:gla``). Errors name the experiment or file (unknown name,
    missing file, no get_config) and the key (unknown keys).
    """
    name, _, arg = spec.partition(":")
    if name.endswith(".py") or pathlib.Path(name).is_file():
        if not pathlib.Path(name).is_file():
            raise FileNotFoundError(f"config file {name!r} does not exist")
        module = run_file(name, "effseq_config")
    else:
        module = experiment_module(name)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{name}: defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config(None)
    try:
        return validate(config)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
