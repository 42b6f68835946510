"""Logical axis names, rule presets, the device mesh, and logical names -> ``NamedSharding``.

Layers never build a ``PartitionSpec``. They label each parameter dimension with one of the
names below (``effseq.layers.params.param``); a rules table (a preset in :data:`RULES`) maps
names to the axes of a mesh with axes (data, fsdp, sequence, tensor) built by :func:`make_mesh`.
Parameter axes and activation axes are kept apart so the two can be sharded differently: every
preset splits activations' batch over (data, fsdp) and their time axis over ``sequence``
(:func:`constrain`), and the ops that mix along time run their sequence-parallel forms when the
current mesh (``jax.set_mesh``) has ``sequence`` > 1 (:mod:`effseq.ops.sequence`).

The trainer initialises abstractly first, so no parameter is ever whole on one device::

    mesh = make_mesh(data=-1, fsdp=4)
    abstract = jax.eval_shape(model.init, key, batch)
    shardings = param_shardings(abstract, mesh, get_rules("fsdp"))
    variables = jax.jit(lambda k, x: nn.unbox(model.init(k, x)), out_shardings=shardings)(
        key, batch
    )
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from effseq.ops.sequence import SEQUENCE

# Parameter axes.
EMBED = "embed"  # model width d
MLP = "mlp"  # hidden width of an MLP / GLU
VOCAB = "vocab"  # token vocabulary
HEADS = "heads"  # attention / GLA heads
HEAD_DIM = "head_dim"  # per-head key or value width
INNER = "inner"  # Mamba's expanded width (expand * d)
STATE = "state"  # SSM state size n
LOW_RANK = "low_rank"  # low-rank projections (Mamba's dt, GLA's gate)
CONV = "conv"  # taps of a short convolution
SCALES = "scales"  # SGConv sub-kernel scales
KERNEL = "kernel"  # SGConv sub-kernel taps
LAYERS = "layers"  # the stacked-layers axis of a scanned stack
COMPLEX = "complex"  # the (real, imaginary) pair of a complex parameter stored as reals
CLASSES = "classes"  # classifier outputs

# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"

PARAM_AXES = (
    EMBED,
    MLP,
    VOCAB,
    HEADS,
    HEAD_DIM,
    INNER,
    STATE,
    LOW_RANK,
    CONV,
    SCALES,
    KERNEL,
    LAYERS,
    COMPLEX,
    CLASSES,
)
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)

# Mesh axes: pure data parallelism, data parallelism whose parameters and optimizer state are
# sharded too (ZeRO-3 / FSDP), sequence (context) parallelism that splits every row's time
# steps, and tensor (Megatron-style) parallelism inside a layer. Listed outermost first: the
# axes that talk most (tensor, then sequence) get the devices that are closest.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, SEQUENCE, TENSOR)
# Every device along data and fsdp holds different examples; tensor devices share theirs.
BATCH_MESH_AXES = (DATA, FSDP)

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]


def _preset(mapped: dict[str, MeshAxes]) -> Rules:
    """A rules table naming every logical axis: ``mapped`` ones to mesh axes, the rest to None.

    Listing every name (even replicated ones) is what lets :func:`logical_spec` reject a name
    that no preset knows, instead of silently replicating a typo.
    """
    return tuple((name, mapped.get(name)) for name in PARAM_AXES + ACTIVATION_AXES)


# Activations in every preset: batch over (data, fsdp), time over sequence.
_ACTIVATIONS = {ACT_BATCH: BATCH_MESH_AXES, ACT_LENGTH: SEQUENCE}

RULES: dict[str, Rules] = {
    # Parameters replicated on every device; only the batch (and time) is split.
    "dp": _preset(_ACTIVATIONS),
    # Every parameter that has the model width is split along it (the width is in nearly
    # every matrix and divides evenly for usual widths); the rest are small and replicated.
    "fsdp": _preset({**_ACTIVATIONS, EMBED: FSDP}),
    # As fsdp, plus the hidden/head/expanded/vocabulary dimensions over tensor, so a layer's
    # two projections are split column-wise then row-wise (Shoeybi et al. 2019, Megatron-LM).
    "fsdp_tp": _preset(
        {
            **_ACTIVATIONS,
            EMBED: FSDP,
            MLP: TENSOR,
            HEADS: TENSOR,
            INNER: TENSOR,
            VOCAB: TENSOR,
        }
    ),
}


def get_rules(name: str) -> Rules:
    """The rules preset called ``name`` (a key of :data:`RULES`)."""
    if name not in RULES:
        raise ValueError(f"unknown sharding rules {name!r}; presets are {sorted(RULES)}")
    return RULES[name]


def _check_size(key: str, size) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(f"{key} must be an integer (-1 to fill), got {size!r}")
    if size != -1 and size < 1:
        raise ValueError(f"{key} must be positive, or -1 to fill the remaining devices, got {size}")


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, *, devices=None
) -> Mesh:
    """A mesh with axes :data:`MESH_AXES` over ``devices`` (default: all devices).

    At most one size may be -1: it takes whatever the others leave of the device count.
    Otherwise the product of the sizes must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {
        f"mesh.{DATA}": data,
        f"mesh.{FSDP}": fsdp,
        f"mesh.{SEQUENCE}": sequence,
        f"mesh.{TENSOR}": tensor,
    }
    for key, size in sizes.items():
        _check_size(key, size)
    given = ", ".join(f"{key}={size}" for key, size in sizes.items())
    fill = [key for key, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh size may be -1 (fill), got {given}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    n = len(devices)
    if fill:
        if n % fixed:
            raise ValueError(
                f"{fill[0]}=-1 cannot fill {n} devices: the other sizes ({given}) multiply to "
                f"{fixed}, which does not divide the device count {n}"
            )
        sizes[fill[0]] = n // fixed
    elif fixed != n:
        raise ValueError(
            f"mesh sizes {given} multiply to {fixed}, but the device count is {n}; "
            "set one of them to -1 to fill"
        )
    shape = tuple(int(size) for size in sizes.values())
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The ``PartitionSpec`` of an array whose dimensions are named ``names`` (None: unnamed).

    A mesh axis is used at most once per array: when a later dimension maps to a mesh axis an
    earlier one already uses, the later dimension is replicated (as Flax's logical_to_mesh).
    """
    table = dict(rules)
    spec = []
    used: set[str] = set()
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"unknown logical axis name {name!r}; the rules know {list(table)}")
        axes = _as_tuple(table[name])
        if not axes or used.intersection(axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _check_divisible(path: str, shape, names, spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, name, axes) in enumerate(zip(shape, names, spec, strict=False)):
        axes = _as_tuple(axes)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise ValueError(
                f"parameter {path} of shape {tuple(shape)}: dimension {dim} of size {size} "
                f"(logical axis {name!r}) is not divisible by the mesh axes it maps to "
                f"({sizes}; {parts} shards)"
            )


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def param_shardings(boxed_tree, mesh: Mesh, rules: Rules):
    """A ``NamedSharding`` per leaf of ``nn.unbox(boxed_tree)``.

    ``boxed_tree`` is a variables tree as ``model.init`` returns it, or its abstract form from
    ``jax.eval_shape(model.init, ...)``. Boxed leaves are sharded by their logical names; other
    leaves are replicated. Raises when a dimension does not divide into its shards, naming the
    parameter's path.
    """

    def sharding(path, leaf):
        if not _is_box(leaf):
            return NamedSharding(mesh, PartitionSpec())
        where = _path_str(path)
        if not isinstance(leaf, nn.LogicallyPartitioned):
            # A box of mesh-axis names (nn.with_partitioning) would bypass the rules table.
            raise ValueError(
                f"parameter {where} is boxed with mesh axes {leaf.names} by "
                f"{type(leaf).__name__}; layers must name logical axes (nn.LogicallyPartitioned)"
            )
        try:
            spec = logical_spec(leaf.names, rules)
        except ValueError as err:
            raise ValueError(f"parameter {where}: {err}") from None
        _check_divisible(where, leaf.value.shape, leaf.names, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, boxed_tree, is_leaf=_is_box)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp, the rest replicated; any rank."""
    return NamedSharding(mesh, PartitionSpec(BATCH_MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def constrain(x, names: Sequence[str | None]):
    """``x`` pinned to the activation sharding its dimension ``names`` get (the presets' shared
    activation rules: batch over data and fsdp, time over sequence) when a mesh is set
    (``jax.set_mesh``); unchanged otherwise. A dimension that does not divide into its shards
    is left whole (e.g. an evaluation batch of 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    if set(MESH_AXES) & set(getattr(mesh, "manual_axes", ())):
        return x
    spec = []
    for size, name in zip(x.shape, names, strict=True):
        axes = _as_tuple(_ACTIVATIONS.get(name)) if name is not None else ()
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
        else:
            spec.append(axes[0] if len(axes) == 1 else axes)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
