import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding

from effseq import sharding
from effseq.layers import params as params_lib
from effseq.models import Backbone, SequenceClassifier, registry
from effseq.train import optimizer as opt_lib

# The `optim` section with the base config's defaults (the lead's base config owns them).
DEFAULTS = dict(
    name="adamw",
    learning_rate=1e-3,
    ssm_learning_rate=1e-3,
    weight_decay=0.01,
    ssm_weight_decay=0.0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    momentum=0.9,
    grad_clip_norm=1.0,
    schedule="cosine",
    warmup_steps=0,
    min_lr_ratio=0.0,
    wsd_decay_fraction=0.1,
    power_a=4.6,
    power_b=0.51,
    decay_vectors=False,
)


def _optim(**overrides):
    unknown = set(overrides) - set(DEFAULTS)
    assert not unknown, f"not optim keys: {unknown}"
    config = ml_collections.ConfigDict(dict(DEFAULTS, **overrides))
    config.lock()
    return config


def _at(schedule, step):
    return float(schedule(step))


# --- schedules against their closed forms --------------------------------------------------------

PEAK, R, W, S = 2.0, 0.1, 10, 110


@pytest.mark.parametrize(
    "kind,expected",
    [
        # x = fraction of the post-warmup steps done: 35 -> 0.25, 60 -> 0.5.
        (
            "cosine",
            {
                35: PEAK * (R + (1 - R) * 0.5 * (1 + math.cos(math.pi / 4))),
                60: PEAK * (R + (1 - R) * 0.5),
            },
        ),
        ("linear", {35: PEAK * (R + (1 - R) * 0.75), 60: PEAK * (R + (1 - R) * 0.5)}),
        ("constant", {35: PEAK, 60: PEAK}),
    ],
)
def test_warmup_then_decay_schedules(kind, expected):
    schedule = opt_lib.make_schedule(
        _optim(schedule=kind, warmup_steps=W, min_lr_ratio=R), S, peak=PEAK
    )
    end = PEAK if kind == "constant" else PEAK * R
    expected = {0: 0.0, 5: PEAK / 2, W: PEAK, **expected, S: end, 3 * S: end}
    got = {step: _at(schedule, step) for step in expected}
    np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-6, atol=1e-7)


def test_wsd_is_stable_then_one_minus_sqrt():
    # 100 steps, the last 20 decay: y = 0.25 at step 85.
    optim = _optim(schedule="wsd", warmup_steps=10, min_lr_ratio=R, wsd_decay_fraction=0.2)
    schedule = opt_lib.make_schedule(optim, 100, peak=PEAK)
    expected = {
        5: PEAK / 2,
        10: PEAK,
        50: PEAK,
        80: PEAK,
        85: PEAK * (R + (1 - R) * (1 - math.sqrt(0.25))),
        100: PEAK * R,
    }
    got = [_at(schedule, s) for s in expected]
    np.testing.assert_allclose(got, list(expected.values()), rtol=1e-6)


def test_power_scheduler_follows_the_papers_formula():
    # eta(n) = min(peak, beta * a * n**-b), n = step * tokens_per_step; linear warmup to
    # eta(n_warmup); exponential decay over the last 10% to min_lr_ratio * eta(n_decay_start).
    tps, beta, a, b, peak, r = 100_000, 8, 4.6, 0.51, 0.02, 0.05
    optim = _optim(
        schedule="power",
        learning_rate=peak,
        warmup_steps=10,
        power_a=a,
        power_b=b,
        min_lr_ratio=r,
        wsd_decay_fraction=0.1,
    )
    schedule = opt_lib.make_schedule(optim, 1000, tokens_per_step=tps, batch_size=beta)

    def eta(step):
        return min(peak, beta * a * (step * tps) ** -b)

    assert beta * a * (10 * tps) ** -b > peak  # the cap is active at the end of warmup...
    assert beta * a * (100 * tps) ** -b < peak  # ...and the power law from step 100 on
    decay = {
        950: eta(900) * (r + (1 - r) * (math.e**0.5 - 1) / (math.e - 1)),
        1000: eta(900) * r,
        2000: eta(900) * r,
    }
    expected = {
        0: 0.0,
        4: eta(10) * 4 / 10,
        10: eta(10),
        100: eta(100),
        317: eta(317),
        900: eta(900),
        **decay,
    }
    got = [_at(schedule, s) for s in expected]
    np.testing.assert_allclose(got, list(expected.values()), rtol=2e-6)
    # Without warmup the first update gets the cap.
    no_warmup = opt_lib.make_schedule(
        _optim(schedule="power", learning_rate=peak), 1000, tokens_per_step=tps, batch_size=beta
    )
    assert _at(no_warmup, 0) == pytest.approx(peak)


def test_learning_rates_report_both_groups_and_trace_under_jit():
    optim = _optim(schedule="cosine", warmup_steps=4, learning_rate=0.5, ssm_learning_rate=0.125)
    rates = opt_lib.learning_rates(optim, 20)
    eager = rates(2)
    assert float(eager["lr"]) == pytest.approx(0.25) and float(eager["ssm_lr"]) == pytest.approx(
        1 / 16
    )
    jitted = jax.jit(rates)(jnp.int32(12))
    np.testing.assert_allclose(float(jitted["lr"]), 0.5 * 0.5, rtol=1e-6)  # halfway: x = 0.5
    np.testing.assert_allclose(float(jitted["ssm_lr"]), 0.125 * 0.5, rtol=1e-6)


# --- groups on real models ----------------------------------------------------------------------


@functools.cache
def _boxed(mixer):
    # The old classifier defaults: auto direction, max_len 1024.
    causal = bool(registry.causal_only(registry.names(mixer)))
    backbone = Backbone(mixer, 16, 2, causal=causal, max_len=1024)
    model = SequenceClassifier(backbone, num_classes=3, vocab_size=11)
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))["params"]


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("mixer", ["s4d", "mamba"])
def test_labels_follow_tags_and_ignore_the_layers_axis(mixer):
    boxed = _boxed(mixer)
    labels = opt_lib.param_labels(boxed)
    assert jax.tree.structure(labels) == jax.tree.structure(nn.unbox(boxed))
    flat = _flat(labels)
    named = {k: g for k, g in _flat(params_lib.groups(boxed)).items() if g}
    assert {k: flat[k] for k in named} == named  # a named group always wins
    assert len(named) >= 3
    layer = f"['stack']['layers']['0_{mixer}']"
    assert flat["['embed']"] == "decay" and flat["['head']"] == "decay"
    assert flat["['final_norm']['scale']"] == "no_decay"
    # (layers, embed): a stacked vector.
    assert flat[f"{layer}['norm_mix']['scale']"] == "no_decay"
    assert flat[f"{layer}['norm_mlp']['bias']"] == "no_decay"
    assert flat[f"{layer}['ffn']['w_in']"] == "decay"  # (layers, embed, mlp)
    if mixer == "s4d":
        assert flat[f"{layer}['mix']['kernel']['log_dt']"] == "ssm"
        assert flat[f"{layer}['mix']['kernel']['A_imag']"] == "ssm"
        assert flat[f"{layer}['mix']['D']"] == "decay"  # a vector the recipe decays
        assert flat[f"{layer}['mix']['out_bias']"] == "no_decay"
    else:
        assert flat[f"{layer}['mix']['A_log']"] == "no_decay"  # a matrix the recipe does not
        assert flat[f"{layer}['mix']['conv_bias']"] == "no_decay"
        assert flat[f"{layer}['mix']['conv_kernel']"] == "decay"
    everything = _flat(opt_lib.param_labels(boxed, decay_vectors=True))
    assert {k: everything[k] for k in named} == named
    assert set(everything.values()) == {"decay"} | set(named.values())


def _groups(labels, tree):
    flat, lab = _flat(tree), _flat(labels)
    return {g: {k: flat[k] for k in flat if lab[k] == g} for g in opt_lib.LABELS}


# Adam's bias corrections divide by 1 - b2**t computed in float32: b2 = 0.999 is stored with a
# relative error of 6e-8, which 1 / (1 - b2) amplifies 1000-fold; through the square root the
# first step's size is off by ~1e-5 relative.
ADAM_RTOL = 2e-5


def _update(optim, boxed, grads=None):
    """One optimizer step from fresh state: (old, new) parameters split by group."""
    params = nn.unbox(boxed)
    labels = opt_lib.param_labels(boxed)
    tx = opt_lib.make_optimizer(optim, labels, 100)
    grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads

    @jax.jit
    def step(params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    return _groups(labels, params), _groups(labels, step(params, grads))


@pytest.mark.parametrize("mixer", ["s4d", "mamba", "sgconv"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("ssm_wd", [0.0, 0.4])
def test_zero_gradient_step_applies_each_groups_decoupled_weight_decay(mixer, name, ssm_wd):
    lr, wd, ssm_lr = 0.1, 0.1, 0.05
    optim = _optim(
        name=name,
        schedule="constant",
        learning_rate=lr,
        weight_decay=wd,
        ssm_learning_rate=ssm_lr,
        ssm_weight_decay=ssm_wd,
    )
    old, new = _update(optim, _boxed(mixer))
    present = {"s4d": "ssm", "mamba": None, "sgconv": "ssm_decay"}[mixer]
    factors = [
        ("decay", 1 - lr * wd),
        ("no_decay", 1.0),
        ("ssm", 1 - ssm_lr * ssm_wd),
        ("ssm_decay", 1 - ssm_lr * wd),
    ]
    for group, factor in factors:
        if group.startswith("ssm") and group != present:
            assert not old[group], group
            continue
        assert old[group], group
        for key, w in old[group].items():
            if factor == 1.0:
                np.testing.assert_array_equal(new[group][key], w, err_msg=key)
            else:
                np.testing.assert_allclose(new[group][key], w * factor, rtol=1e-6, err_msg=key)
                assert not np.array_equal(new[group][key], w), key


@pytest.mark.parametrize(
    "mixer,ssm_param",
    [
        ("s4d", "['stack']['layers']['0_s4d']['mix']['kernel']['log_dt']"),
        ("sgconv", "['stack']['layers']['0_sgconv']['mix']['sub_kernels']"),
    ],
)
def test_one_hot_gradient_moves_an_ssm_parameter_by_the_ssm_learning_rate(mixer, ssm_param):
    lr, ssm_lr, eps = 0.1, 0.003, 1e-8
    optim = _optim(
        schedule="constant", learning_rate=lr, ssm_learning_rate=ssm_lr, weight_decay=0.0, eps=eps
    )
    boxed = _boxed(mixer)
    params = nn.unbox(boxed)
    paths = _flat(params)
    # Second layer of the scanned stack, channel 3; a weight of the classifier head.
    ndim = paths[ssm_param].ndim
    hot = {ssm_param: (1,) + (0,) * (ndim - 2) + (3,), "['head']": (5, 2)}
    grads = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jnp.zeros_like(x).at[hot[jax.tree_util.keystr(p)]].set(1.0)
            if jax.tree_util.keystr(p) in hot
            else jnp.zeros_like(x)
        ),
        params,
    )
    # Global norm sqrt(2) > grad_clip_norm = 1: both entries are scaled to 1/sqrt(2) first.
    g = 1 / math.sqrt(2)
    old, new = _update(optim, boxed, grads)
    # First Adam step: m_hat = g, v_hat = g**2, so the move is lr * g / (|g| + eps).
    ssm_group = "ssm" if mixer == "s4d" else "ssm_decay"
    for group, key, rate in [(ssm_group, ssm_param, ssm_lr), ("decay", "['head']", lr)]:
        moved = np.array(old[group][key] - new[group][key])
        # w - lr is rounded to float32: exact up to one ulp of w.
        ulp = np.spacing(np.abs(np.asarray(old[group][key])[hot[key]]))
        np.testing.assert_allclose(moved[hot[key]], rate * g / (g + eps), rtol=ADAM_RTOL, atol=ulp)
        moved[hot[key]] = 0.0
        np.testing.assert_array_equal(moved, 0.0)
    assert ssm_param in paths
    for group in opt_lib.LABELS:
        for key, w in old[group].items():
            if key not in hot:
                np.testing.assert_array_equal(new[group][key], w, err_msg=key)


# --- optimizer state mirrors the parameters, and works sharded ----------------------------------


def _param_of(state_path, param_shapes):
    """The parameter path a state leaf belongs to: the longest suffix that is a parameter path."""
    for k in range(len(state_path)):
        if tuple(state_path[k:]) in param_shapes:
            return tuple(state_path[k:])
    return None


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_state_leaves_have_their_parameters_shapes(name):
    boxed = _boxed("s4d")
    params = nn.unbox(boxed)
    tx = opt_lib.make_optimizer(_optim(name=name), opt_lib.param_labels(boxed), 100)
    state = jax.eval_shape(tx.init, params)
    param_shapes = {tuple(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    seen = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        match = _param_of(path, param_shapes)
        if leaf.ndim == 0 and match is None:
            continue  # step counters
        assert match is not None, jax.tree_util.keystr(path)
        assert leaf.shape == param_shapes[match] and leaf.dtype == jnp.float32
        seen[match] = seen.get(match, 0) + 1
    # Adam keeps mu and nu, SGD one momentum trace, for every parameter, in exactly one group.
    assert seen == {p: 2 if name == "adamw" else 1 for p in param_shapes}


def _rules():
    return [(name, "fsdp" if name == sharding.EMBED else None) for name in sharding.PARAM_AXES]


@pytest.mark.devices(8)
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_update_keeps_shardings_and_matches_one_device(axis_type):
    boxed = _boxed("s4d")
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, _rules())
    params = nn.unbox(boxed)
    grads = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), params
    )
    optim = _optim(ssm_learning_rate=0.01, warmup_steps=2, weight_decay=0.1)
    tx = opt_lib.make_optimizer(optim, opt_lib.param_labels(boxed), 10)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # The same two steps unsharded, on one device.
    expected, state = params, jax.jit(tx.init)(params)
    for _ in range(2):
        expected, state = jax.jit(step)(expected, state, grads)

    sharded = jax.device_put(params, shardings)
    assert any(not s.is_fully_replicated for s in _flat(shardings).values())
    # Explicit axes need the mesh in context; Auto axes run the same either way.
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(sharded)
        step = jax.jit(step, donate_argnums=(1,))
        new, state = step(sharded, state, jax.device_put(grads, shardings))
        new, state = step(new, state, jax.device_put(grads, shardings))

    param_shardings = {tuple(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(new):
        assert leaf.sharding.is_equivalent_to(param_shardings[tuple(path)], leaf.ndim)
    mirrored = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        match = _param_of(path, param_shardings)
        if match is not None:
            assert leaf.sharding.is_equivalent_to(param_shardings[match], leaf.ndim), path
            mirrored += 1
    assert mirrored == 2 * len(param_shardings)  # Adam's mu and nu
    for key, value in _flat(new).items():
        np.testing.assert_allclose(value, _flat(expected)[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert isinstance(next(iter(_flat(new).values())).sharding, NamedSharding)


# --- errors --------------------------------------------------------------------------------------


def test_errors_name_the_bad_setting():
    labels = {"w": "decay"}
    with pytest.raises(ValueError, match=r"optim.name='lion'.*'adamw', 'adam', 'sgd'"):
        opt_lib.make_optimizer(_optim(name="lion"), labels, 10)
    with pytest.raises(ValueError, match=r"optim.schedule='step'.*'cosine', .*'power'"):
        opt_lib.make_schedule(_optim(schedule="step"), 10)
    with pytest.raises(ValueError, match=r"optim.warmup_steps=11 exceeds .*total_steps=10"):
        opt_lib.make_schedule(_optim(warmup_steps=11), 10)
    with pytest.raises(ValueError, match=r"needs tokens_per_step"):
        opt_lib.make_schedule(_optim(schedule="power"), 10, batch_size=4)
    with pytest.raises(ValueError, match=r"needs batch_size"):
        opt_lib.learning_rates(_optim(schedule="power"), 10, tokens_per_step=64)
    with pytest.raises(ValueError, match=r"optim.wsd_decay_fraction=0.5"):
        opt_lib.make_schedule(_optim(schedule="wsd", warmup_steps=6, wsd_decay_fraction=0.5), 10)
    with pytest.raises(
        ValueError, match=r"optim.name='adam' has no weight decay.*weight_decay=0.01"
    ):
        opt_lib.make_optimizer(_optim(name="adam"), labels, 10)
    with pytest.raises(ValueError, match=r"optim.grad_clip_norm must be >= 0"):
        opt_lib.make_optimizer(_optim(grad_clip_norm=-1.0), labels, 10)
    with pytest.raises(ValueError, match=r"unknown groups \['bias'\]"):
        opt_lib.make_optimizer(_optim(), {"w": "bias"}, 10)
    # Adam without weight decay is accepted: its first step moves by lr * g / (|g| + eps).
    tx = opt_lib.make_optimizer(_optim(name="adam", weight_decay=0.0), labels, 10)
    w = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 0.5)}, tx.init(w), w)
    np.testing.assert_allclose(updates["w"], -1e-3 * 0.5 / (0.5 + 1e-8), rtol=ADAM_RTOL)
