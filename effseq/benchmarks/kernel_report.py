"""What each Pallas kernel costs on a Hopper GPU, found without one: Triton's own compile.

    python -m effseq.benchmarks.kernel_report          # `make kernel-report`; needs triton
    python -m effseq.benchmarks.kernel_report --ops gla --chunk-size 32

Every ``impl="pallas"`` op is lowered for the ``cuda`` platform at the GPU benchmark's shapes
(``effseq bench --plan gpu``: 16 heads x 128 for GLA and Gated DeltaNet, Mamba-2's 32 heads x
64 with state 128, Mamba's 2048 channels with state 16; T = 1024, bf16; each op's default
chunk on a GPU unless ``--chunk-size`` is given), forward and under
``grad``. The Triton IR Pallas emits for each kernel is then compiled by the ``triton``
package for sm_90 (Hopper) with the kernel's own ``num_warps`` / ``num_stages``, and its PTX
assembled by the ``ptxas`` that ships with triton (``-v``): registers per thread, spill bytes,
stack frame, and the shared memory the kernel asks for, against the 227 KiB a Hopper block
can have. A kernel over that limit cannot launch; spills cost local-memory traffic. Whether
the matrix products became ``wgmma`` (Hopper's warpgroup MMA) is read off the PTX.

This is the triton package's compiler, not the one inside jaxlib's CUDA plugin that compiles
the kernels in a real run (XLA's pinned Triton); the two can differ in detail, so the figures
are a check and a guide, not the run's. Results: ``results/kernels/kernels.{json,md}``; the
README's table is ``benchmarks/results/kernels.{json,md}`` (``--out benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pathlib
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from effseq.benchmarks import gpu

OUT = pathlib.Path("results/kernels")
# Hopper (sm_90): the most shared memory one block may use (227 KiB), registers per thread.
HOPPER_SMEM = 227 * 1024
MAX_REGISTERS = 255


# op -> its Pallas row of the GPU benchmark, whose case builder gives the inputs and the call.
ROWS = {
    "gla": "gla/pallas",
    "ssd": "mamba2/pallas",
    "gated_delta_rule": "gdn/pallas",
    "selective_scan": "mamba/pallas",
}


def _case(op: str, t: int, chunk_size: int | None, dtype):
    """The GPU plan's call of ``op`` at one row of length ``t`` -> (function, arguments)."""
    # GLA's default chunk depends on the backend (16 on a CPU, 64 on accelerators): the GPU's.
    if chunk_size is None and op == "gla":
        chunk_size = 64
    builder, impl, _ = gpu.ROWS[ROWS[op]]
    case = builder(gpu.GpuPlan(), 1, t, dtype, impl, chunk_size)
    return case.fn, case.args


OPS = tuple(ROWS)


def capture(fn, args) -> list[dict]:
    """The Triton IR (text), name, num_warps and num_stages of every Pallas kernel in
    ``fn(*args)`` lowered for cuda, in program order."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    from effseq.ops.pallas import _common

    modules = []
    original = reg.lowering.lower_jaxpr_to_triton_module

    def keep(*a, **k):
        result = original(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = keep
    try:
        text = _common.lower_for_gpu(fn, *args)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original
    calls = re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    if len(calls) != len(modules):
        raise RuntimeError(f"found {len(calls)} Triton calls but captured {len(modules)} modules")
    return [
        {"name": name, "num_stages": int(stages), "num_warps": int(warps), "ttir": ir}
        for (name, stages, warps), ir in zip(calls, modules, strict=True)
    ]


def _ptxas() -> str:
    import triton

    found = [
        p
        for p in glob.glob(
            os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")
        )
        if not p.endswith("blackwell")
    ]
    if not found:
        raise RuntimeError("no ptxas in the triton package")
    return found[0]


def compile_kernel(kernel: dict, workdir: pathlib.Path) -> dict:
    """Compiles one captured kernel for sm_90 -> registers, spills, shared memory, wgmma."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = workdir / f"{kernel['name']}.ttir"
    path.write_text(kernel["ttir"])
    compiled = triton.compile(
        str(path),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"]},
    )
    ptx = compiled.asm["ptx"]
    ptx_path = path.with_suffix(".ptx")
    ptx_path.write_text(ptx)
    run = subprocess.run(
        [_ptxas(), "-v", "--gpu-name", "sm_90a", str(ptx_path), "-o", os.devnull],
        capture_output=True,
        text=True,
        check=True,
    )
    info = run.stderr

    def number(pattern):
        found = re.search(pattern, info)
        return int(found.group(1)) if found else 0

    shared = int(compiled.metadata.shared)
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "shared_bytes": shared,
        "fits_shared": shared <= HOPPER_SMEM,
        "wgmma": "wgmma" in ptx,
    }


@dataclasses.dataclass(frozen=True)
class Options:
    ops: tuple[str, ...] = OPS
    t: int = 1024
    chunk_size: int | None = None
    dtype: str = "bfloat16"


def run(options: Options, log=print) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for op in options.ops:
            fn, args = _case(op, options.t, options.chunk_size, jnp.dtype(options.dtype))

            def loss(*a, fn=fn):
                return fn(*a).astype(jnp.float32).sum()

            grad = jax.grad(loss, argnums=tuple(range(len(args))))
            for mode, f in (("fwd", fn), ("grad", grad)):
                for kernel in capture(f, args):
                    row = {
                        "op": op,
                        "mode": mode,
                        "kernel": kernel["name"],
                        "num_warps": kernel["num_warps"],
                        "num_stages": kernel["num_stages"],
                    }
                    try:
                        row.update(compile_kernel(kernel, pathlib.Path(tmp)))
                    except Exception as err:  # noqa: BLE001 (reported per kernel)
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    rows.append(row)
                    log(_line(row))
    import triton

    from effseq.benchmarks.timing import provenance

    return {
        "provenance": provenance(),
        "options": dataclasses.asdict(options),
        "jax": jax.__version__,
        "triton": triton.__version__,
        "target": "sm_90 (Hopper), ptxas -v for sm_90a",
        "shared_limit_bytes": HOPPER_SMEM,
        "kernels": rows,
    }


def _line(row: dict) -> str:
    head = f"{row['op']:<17} {row['mode']:<4} {row['kernel']:<34}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    flag = "" if row["fits_shared"] else "  OVER the shared-memory limit"
    return (
        f"{head} {row['registers']:>3} regs, spills {row['spill_store_bytes']:>5} B, shared "
        f"{row['shared_bytes'] / 1024:6.1f} KiB, wgmma {row['wgmma']}{flag}"
    )


def markdown(result: dict) -> str:
    o = result["options"]
    lines = [
        "# Pallas kernels compiled for sm_90 (no GPU needed)",
        "",
        f"jax {result['jax']}, triton {result['triton']}, commit "
        f"{result['provenance']['git_commit']}; T = {o['t']}, {o['dtype']}, chunk "
        f"{o['chunk_size'] or 'default'}. Shared-memory limit per block: "
        f"{result['shared_limit_bytes'] // 1024} KiB.",
        "",
        "| op | mode | kernel | warps | stages | registers | spill stores (B) | shared (KiB) | "
        "fits | wgmma |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["kernels"]:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['mode']} | {r['kernel']} | | | error: {r['error']} |")
            continue
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['kernel']} | {r['num_warps']} | {r['num_stages']} "
            f"| {r['registers']} | {r['spill_store_bytes']} | {r['shared_bytes'] / 1024:.1f} | "
            f"{'yes' if r['fits_shared'] else 'NO'} | {'yes' if r['wgmma'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m effseq.benchmarks.kernel_report", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS)
    )
    p.add_argument("--t", type=int, default=1024)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--out", type=pathlib.Path, default=OUT)
    args = p.parse_args(argv)
    chosen = tuple(x.strip() for x in args.ops.split(","))
    unknown = [x for x in chosen if x not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; known: {', '.join(OPS)}")
    try:
        import triton  # noqa: F401
    except ImportError:
        p.error("needs the triton package (pip install triton==3.6.0; `make kernel-report`)")
    result = run(Options(chosen, args.t, args.chunk_size, args.dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "kernels.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
