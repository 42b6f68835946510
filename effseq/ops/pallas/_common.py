"""What every effseq Pallas kernel shares: how it is called, how its dots round, its checks.

Backend. Kernels are ``pl.pallas_call`` programs over a grid with ``BlockSpec`` tiles, lowered
on NVIDIA GPUs by Pallas's Triton backend (``compiler_params`` below pins it: jax 0.10's
default GPU backend for ``pallas_call`` is Mosaic GPU, which needs warpgroup-level kernels
written against its own primitives). Triton emits Hopper's wgmma for ``tl.dot`` on sm_90, and
this form has two checks that need no GPU: the kernel runs in Pallas's interpret mode on a CPU
(values), and it lowers for the ``cuda`` platform on a CPU (:func:`lower_for_gpu`: Triton's
rules on block shapes and supported operations are applied then; only Triton's own compile to
PTX waits for a GPU).

Precision. Inside a kernel every matrix product goes through :func:`dot`: float32
accumulation, operands in their own dtype (bf16 operands use the tensor cores as they are), and
float32 operands at the precision JAX is configured for (``jax_default_matmul_precision``):
the default lets Triton use TF32, ``"highest"`` asks for IEEE float32, as XLA's own dots do.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

# Triton: every array inside a kernel has power-of-two dimensions, and tl.dot wants each of
# its dimensions at least 16.
MIN_DOT = 16


def interpret() -> bool:
    """True where kernels run in Pallas's interpret mode: on CPU (Pallas has no compiled CPU
    path), or everywhere when ``EFFSEQ_PALLAS_INTERPRET=1`` (to debug a kernel on a GPU host)."""
    if gpu_lowering._depth:
        return False
    return jax.default_backend() == "cpu" or os.environ.get("EFFSEQ_PALLAS_INTERPRET") == "1"


def compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Triton compiler parameters (also what selects the Triton backend on GPUs)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def call(kernel, *, out_shape, grid, in_specs, out_specs, name, num_warps=4, num_stages=2):
    """``pl.pallas_call`` with effseq's backend choice: interpret mode on CPU, Triton on GPU."""
    run_interpreted = interpret()
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=run_interpreted,
        compiler_params=None if run_interpreted else compiler_params(num_warps, num_stages),
        name=name,
    )


def _precision():
    setting = jax.config.jax_default_matmul_precision
    if setting in ("highest", "float32", "fastest_f32_fp32"):  # noqa: SIM108 (readability)
        return lax.Precision.HIGHEST
    return None


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (or with a / b transposed) inside a kernel, accumulated in float32."""
    if trans_a:
        a = a.T
    if trans_b:
        b = b.T
    prec = _precision() if (a.dtype == jnp.float32 or b.dtype == jnp.float32) else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=prec)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def check_tile(op: str, name: str, value: int, *, dot_dim: bool = True) -> int:
    """A tile size that Triton accepts: a power of two (>= 16 where it is a dot dimension)."""
    if not is_power_of_two(value) or (dot_dim and value < MIN_DOT):
        need = f"a power of two >= {MIN_DOT}" if dot_dim else "a power of two"
        raise ValueError(f"{op}: impl='pallas' needs {name} to be {need}, got {value}")
    return value


def pad_axis(x, axis: int, multiple: int, value=0):
    """Pads ``x`` at the end of ``axis`` up to a multiple of ``multiple``."""
    extra = (-x.shape[axis]) % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def lower_for_gpu(fn, *args, **kwargs) -> str:
    """Lowers ``fn(*args, **kwargs)`` for the ``cuda`` platform (works on a CPU-only host) and
    returns the StableHLO text; raises what the Triton lowering raises (unsupported ops,
    non-power-of-two blocks). Traced under :class:`gpu_lowering`, so the kernels are built
    for Triton, not for interpret mode, whatever the host."""
    # Whether a kernel is interpreted is decided when it is traced, and JAX reuses traces of
    # the same function (jit's caches, inner jits): an earlier CPU trace would come back
    # interpreted. So the caches go first.
    jax.clear_caches()
    with gpu_lowering():
        traced = jax.jit(fn).trace(*args, **kwargs)
        return traced.lower(lowering_platforms=("cuda",)).as_text()


class gpu_lowering:  # noqa: N801 (a context manager used like a function)
    """Within it, :func:`interpret` is False on any host (for cross-lowering to ``cuda``)."""

    _depth = 0

    def __enter__(self):
        gpu_lowering._depth += 1
        return self

    def __exit__(self, *exc):
        gpu_lowering._depth -= 1
        return False


# The trainer's mesh axes (effseq.sharding.MESH_AXES) that a kernel call is mapped over by
# hand: rows over the batch axes, heads over the tensor axis. XLA cannot split a custom call
# (a Triton kernel is one), so under a mesh it would otherwise gather every operand whole
# onto each device and run the whole batch there.
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _free_axes(mesh, names) -> tuple[str, ...]:
    manual = set(getattr(mesh, "manual_axes", ()))
    return tuple(a for a in names if a in mesh.axis_names and a not in manual and mesh.shape[a] > 1)


def per_device(fn, args, batch_dims, head_dims, out_batch_dims, out_head_dims):
    """``fn(*args)``, run on each device's block of rows and heads under the current mesh.

    ``batch_dims`` / ``head_dims`` give, per argument (``None`` entries for arguments that are
    None), the position of its batch and head dimensions (None: it has none and every device
    gets it whole); ``out_*`` the same per output. Rows are split over the mesh's free
    ``data`` x ``fsdp`` axes when the batch divides by their size, and an array's head
    dimension over ``tensor`` when it divides (a head dimension that does not, e.g. SSD's one
    B/C group, is given whole: each device's heads then still find their group). Without a
    mesh, or with nothing to split, this is ``fn(*args)``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    batch_axes = _free_axes(mesh, BATCH_AXES)
    head_axes = _free_axes(mesh, (HEAD_AXIS,))
    n_batch = 1
    for a in batch_axes:
        n_batch *= mesh.shape[a]
    n_head = mesh.shape[HEAD_AXIS] if head_axes else 1
    sizes = [
        x.shape[d] for x, d in zip(args, batch_dims, strict=True) if x is not None and d is not None
    ]
    if not sizes or sizes[0] % n_batch:
        batch_axes, n_batch = (), 1
    if not batch_axes and not head_axes:
        return fn(*args)

    def spec(x, bd, hd):
        entries = [None] * x.ndim
        if bd is not None and batch_axes:
            entries[bd] = batch_axes
        if hd is not None and head_axes and x.shape[hd] % n_head == 0:
            entries[hd] = HEAD_AXIS
        return PartitionSpec(*entries)

    present = [i for i, x in enumerate(args) if x is not None]
    outs = jax.eval_shape(fn, *args)
    flat_outs, tree = jax.tree.flatten(outs)
    out_specs = jax.tree.unflatten(
        tree,
        [
            spec(o, bd, hd)
            for o, bd, hd in zip(flat_outs, out_batch_dims, out_head_dims, strict=True)
        ],
    )

    def local(*present_args):
        full = list(args)
        for i, x in zip(present, present_args, strict=True):
            full[i] = x
        return fn(*full)

    mapped = jax.shard_map(
        local,
        in_specs=tuple(spec(args[i], batch_dims[i], head_dims[i]) for i in present),
        out_specs=out_specs,
        axis_names=set(batch_axes) | set(head_axes),
        check_vma=False,
    )
    # Under jit even when called eagerly: JAX's eager transpose of a shard_map that is manual
    # over some mesh axes only names the others in its out_specs and fails (seen under
    # jax.grad outside jit, jax 0.10.2; the sequence-parallel ops share it).
    return jax.jit(mapped)(*(args[i] for i in present))
