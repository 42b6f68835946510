import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from effseq import sharding
from effseq.models import Backbone, LanguageModel
from tests.tolerances import assert_close

V, D, B, T = 64, 32, 8, 8
MIXERS = ["gla", "s4d", "mamba", "attention", "sgconv", "mamba2", "gdn", "rglru", "based"]
# Heads that the tensor axis (2) divides at D = 32, small states.
OPTIONS = {
    "mamba2": {"head_dim": 16, "state_size": 16},
    "gdn": {"num_heads": 4},
    "rglru": {"num_heads": 4},
    "based": {"num_heads": 4, "feature_dim": 8},
}
NEWER = "mamba2,gdn,rglru,based"
# (preset, (data, fsdp, tensor)) pairs the trainer will use on 8 devices.
LAYOUTS = [
    ("dp", (8, 1, 1)),
    ("fsdp", (1, 8, 1)),
    ("fsdp", (2, 4, 1)),
    ("fsdp_tp", (2, 2, 2)),
]


def _lm(mixer, options=None):
    # max_len 2048: the old LanguageModel default (SGConv's kernel scales depend on it).
    names = [m.strip() for m in mixer.split(",")]
    if options is None and any(n in OPTIONS for n in names):
        options = {n: OPTIONS[n] for n in names if n in OPTIONS}
    backbone = Backbone(mixer, D, max(2, len(names)), max_len=2048, mixer_options=options)
    return LanguageModel(backbone, vocab_size=V)


def _tokens():
    return jax.random.randint(jax.random.key(3), (B, T), 0, V)


def _abstract(model):
    return jax.eval_shape(model.init, jax.random.key(0), _tokens())


def _boxes(tree):
    """(path string, box) for every boxed leaf of a variables tree."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    return [
        ("/".join(str(k.key) for k in path), leaf)
        for path, leaf in flat[0]
        if isinstance(leaf, nn.Partitioned)
    ]


def _sharded_init(model, mesh, rules):
    shardings = sharding.param_shardings(_abstract(model), mesh, rules)
    init = jax.jit(lambda key, x: nn.unbox(model.init(key, x)), out_shardings=shardings)
    return init(jax.random.key(0), _tokens()), shardings


@functools.cache
def _reference_logits(mixer, options=None):
    """Logits of the unsharded model, initialised with the same key."""
    model = _lm(mixer, options)
    variables = jax.jit(model.init)(jax.random.key(0), _tokens())
    return np.asarray(jax.jit(model.apply)(variables, _tokens()))


# ----------------------------------------------------------------------------- make_mesh


@pytest.mark.devices(8)
@pytest.mark.parametrize(
    "sizes, shape",
    [
        (dict(), (8, 1, 1, 1)),
        (dict(data=2, fsdp=-1), (2, 4, 1, 1)),
        (dict(data=2, fsdp=2, tensor=-1), (2, 2, 1, 2)),
        (dict(data=1, fsdp=4, tensor=2), (1, 4, 1, 2)),
        (dict(data=2, sequence=4), (2, 1, 4, 1)),
        (dict(data=1, sequence=-1, tensor=2), (1, 1, 4, 2)),
    ],
)
def test_make_mesh_fills_the_minus_one(sizes, shape):
    mesh = sharding.make_mesh(**sizes)
    assert mesh.axis_names == sharding.MESH_AXES
    assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.devices(8)
def test_make_mesh_on_a_subset_of_devices():
    devices = jax.devices()[:4]
    mesh = sharding.make_mesh(data=-1, tensor=2, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 2}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


@pytest.mark.devices(8)
@pytest.mark.parametrize(
    "sizes, match",
    [
        (dict(data=-1, fsdp=-1), r"at most one.*mesh\.data=-1, mesh\.fsdp=-1"),
        (dict(data=-1, fsdp=3), r"mesh\.data=-1 cannot fill 8 devices.*mesh\.fsdp=3"),
        (
            dict(data=2, fsdp=2, tensor=1),
            r"mesh\.data=2, mesh\.fsdp=2, mesh\.sequence=1, mesh\.tensor=1.*count is 8",
        ),
        (dict(sequence=0), r"mesh\.sequence must be positive.*got 0"),
        (dict(data=4, fsdp=2, tensor=2), r"multiply to 16, but the device count is 8"),
        (dict(data=0), r"mesh\.data must be positive.*got 0"),
        (dict(fsdp=-2), r"mesh\.fsdp must be positive.*got -2"),
        (dict(tensor=1.5), r"mesh\.tensor must be an integer.*got 1\.5"),
        (dict(tensor=True), r"mesh\.tensor must be an integer.*got True"),
    ],
)
def test_make_mesh_errors_name_the_keys(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(**sizes)


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("name", sorted(sharding.RULES))
def test_every_preset_names_every_logical_axis_once(name):
    names = [logical for logical, _ in sharding.get_rules(name)]
    assert sorted(names) == sorted(sharding.PARAM_AXES + sharding.ACTIVATION_AXES)
    assert dict(sharding.get_rules(name))[sharding.ACT_BATCH] == ("data", "fsdp")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"'zero3'.*\['dp', 'fsdp', 'fsdp_tp'\]"):
        sharding.get_rules("zero3")


def test_logical_spec_uses_each_mesh_axis_once():
    tp = sharding.get_rules("fsdp_tp")
    assert sharding.logical_spec(("layers", "embed", "mlp"), tp) == PartitionSpec(
        None, "fsdp", "tensor"
    )
    # Two dimensions that both map to tensor: the later one is replicated.
    assert sharding.logical_spec(("mlp", "heads"), tp) == PartitionSpec("tensor", None)
    # The batch takes data and fsdp, so a width axis in the same array cannot take fsdp.
    assert sharding.logical_spec((sharding.ACT_BATCH, "embed"), tp) == PartitionSpec(
        ("data", "fsdp"), None
    )
    assert sharding.logical_spec((None, "vocab"), tp) == PartitionSpec(None, "tensor")


def test_logical_spec_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown logical axis name 'embd'.*'embed', 'mlp'"):
        sharding.logical_spec(("layers", "embd"), sharding.get_rules("fsdp"))


# ----------------------------------------------------------------------------- param_shardings


def _expected_spec(preset, names):
    """Each preset's documented behaviour, written out independently of the rules table."""
    if preset == "dp":
        return (None,) * len(names)
    if preset == "fsdp":
        return tuple("fsdp" if n == "embed" else None for n in names)
    spec, tensor_used = [], False
    for n in names:
        if n == "embed":
            spec.append("fsdp")
        elif n in ("mlp", "heads", "inner", "vocab") and not tensor_used:
            spec.append("tensor")
            tensor_used = True
        else:
            spec.append(None)
    return tuple(spec)


@pytest.mark.devices(8)
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("preset, shape", LAYOUTS)
def test_param_shardings_follow_the_preset(mixer, preset, shape):
    model = _lm(mixer)
    abstract = _abstract(model)
    mesh = sharding.make_mesh(*shape)
    shardings = sharding.param_shardings(abstract, mesh, sharding.get_rules(preset))
    assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(abstract))
    flat = dict(
        ("/".join(str(k.key) for k in path), s)
        for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
    )
    boxes = _boxes(abstract)
    assert len(boxes) == len(flat)
    for path, box in boxes:
        spec = flat[path].spec
        got = tuple(spec) + (None,) * (len(box.names) - len(spec))
        assert got == _expected_spec(preset, box.names), path
        assert flat[path].mesh == mesh
    if preset != "dp":
        # FSDP: the tied embedding is split over its width, never whole on one device.
        fsdp = dict(mesh.shape)["fsdp"]
        tensor = dict(mesh.shape)["tensor"]
        assert flat["params/embed"].shard_shape((V, D)) == (V // tensor, D // fsdp)


@pytest.mark.devices(8)
def test_param_shardings_of_concrete_variables_and_unboxed_leaves():
    mesh = sharding.make_mesh(1, 8, 1)
    tree = {
        "params": {"w": nn.LogicallyPartitioned(jnp.ones((16, 4)), ("embed", "mlp"))},
        "step": jnp.zeros((), jnp.int32),
        "table": jnp.ones((3, 5)),
    }
    shardings = sharding.param_shardings(tree, mesh, sharding.get_rules("fsdp"))
    assert shardings["params"]["w"].spec == PartitionSpec("fsdp", None)
    assert shardings["step"] == sharding.replicated(mesh)
    assert shardings["table"] == sharding.replicated(mesh)


@pytest.mark.devices(8)
def test_non_divisible_dimension_names_the_parameter():
    # GLA has 4 heads; fsdp_tp puts heads on tensor, here 8 wide.
    mesh = sharding.make_mesh(1, 1, 8)
    with pytest.raises(
        ValueError,
        match=r"params/stack/layers/0_gla/mix/br of shape \(2, 4, 8\): dimension 1 of size 4 "
        r"\(logical axis 'heads'\).*tensor=8",
    ):
        sharding.param_shardings(_abstract(_lm("gla")), mesh, sharding.get_rules("fsdp_tp"))
    # d_model 12 over fsdp 8.
    model = LanguageModel(Backbone("s4d", 12, 2, max_len=2048), vocab_size=V)
    fsdp = sharding.get_rules("fsdp")
    with pytest.raises(
        ValueError, match=r"params/embed .*size 12 \(logical axis 'embed'\).*fsdp=8"
    ):
        sharding.param_shardings(_abstract(model), sharding.make_mesh(1, 8, 1), fsdp)


def test_unknown_logical_name_in_a_model_names_the_parameter():
    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param(
                "w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "bogus")), (4, 2)
            )
            return x @ w

    abstract = jax.eval_shape(Bad().init, jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"params/w: unknown logical axis name 'bogus'.*'embed'"):
        sharding.param_shardings(abstract, sharding.make_mesh(), sharding.get_rules("dp"))


def test_mesh_axis_boxes_are_rejected():
    tree = {"w": nn.Partitioned(jnp.ones((8, 2)), ("fsdp", None))}
    with pytest.raises(ValueError, match=r"parameter w is boxed with mesh axes.*logical axes"):
        sharding.param_shardings(tree, sharding.make_mesh(), sharding.get_rules("fsdp"))


# ----------------------------------------------------------------------------- jitted init


def _check_sharded_model(mixer, preset, shape):
    model = _lm(mixer)
    mesh = sharding.make_mesh(*shape)
    variables, shardings = _sharded_init(model, mesh, sharding.get_rules(preset))
    arrays, wanted = jax.tree.leaves(variables), jax.tree.leaves(shardings)
    assert len(arrays) == len(wanted)
    for array, s in zip(arrays, wanted, strict=True):
        assert array.sharding == s
        for shard in array.addressable_shards:
            assert shard.data.shape == s.shard_shape(array.shape)
    tokens = jax.device_put(_tokens(), sharding.batch_sharding(mesh))
    logits = jax.jit(model.apply)(variables, tokens)
    # Sharded contractions and per-device batches reorder float32 sums.
    assert_close(logits, _reference_logits(mixer))


# Every layout once; every mixer on every layout is the slow test below.
@pytest.mark.devices(8)
@pytest.mark.parametrize(
    "mixer, preset, shape",
    [
        ("sgconv", "dp", (8, 1, 1)),
        ("mamba", "fsdp", (1, 8, 1)),
        ("s4d", "fsdp", (2, 4, 1)),
        ("gla", "fsdp_tp", (2, 2, 2)),
        pytest.param(NEWER, "fsdp_tp", (2, 2, 2), marks=pytest.mark.slow),
    ],
)
def test_jitted_init_lands_in_the_shardings(mixer, preset, shape):
    _check_sharded_model(mixer, preset, shape)


@pytest.mark.slow
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("preset, shape", LAYOUTS)
def test_jitted_init_lands_in_the_shardings_all(mixer, preset, shape):
    _check_sharded_model(mixer, preset, shape)


# ----------------------------------------------------------------------------- batch


@pytest.mark.devices(8)
def test_batch_sharding_splits_the_leading_dim_over_data_and_fsdp():
    mesh = sharding.make_mesh(2, 2, 2)
    s = sharding.batch_sharding(mesh)
    for shape in [(8,), (8, 5), (16, 3, 4)]:
        x = jax.device_put(jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape), s)
        assert x.sharding.shard_shape(shape) == (shape[0] // 4,) + shape[1:]
        # The two tensor devices of each (data, fsdp) pair hold the same examples.
        starts = {shard.index[0].start or 0 for shard in x.addressable_shards}
        assert starts == set(range(0, shape[0], shape[0] // 4))
    r = jax.device_put(jnp.ones((3, 5)), sharding.replicated(mesh))
    assert all(shard.data.shape == (3, 5) for shard in r.addressable_shards)
