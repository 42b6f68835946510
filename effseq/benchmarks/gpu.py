"""Every mixer's op at realistic GPU shapes, forward and forward+backward, against cuDNN attention.

    effseq bench --plan gpu                    # on a GPU: benchmarks/results/<device>/gpu.*
    effseq bench --plan gpu --tiny             # any backend, tiny shapes: checks the plan runs
    effseq bench --plan gpu --chunk-sizes 32,64,128   # the XLA/Pallas chunk-size sweep

Shapes follow flash-linear-attention's op benchmarks: a fixed number of tokens per batch
(B x T = ``--tokens``, 16k by default) at T = 1k..16k, model width H x D = 2048 (16 heads of
128), bf16 inputs with float32 accumulation. Each mixer's core op runs at that width with its
own natural head shape (``CASES``): attention, GLA, Gated DeltaNet and Based with 16 x 128
(Based: feature maps of 16 -> 273), Mamba-2's SSD with 32 heads of 64 and state 128, Mamba's
selective scan over 2048 channels with state 16, the RG-LRU's diagonal scan over 2048
channels, S4D (state 64) and SGConv (d = 64) as FFT convolutions over 2048 channels. Every
implementation of an op is a row (``impl=``: XLA paths, ``"pallas"``), and the attention
baselines are ``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` and ``"xla"``.

Per row and length: compile time, median / min / max of ``--repeats`` timed calls after a
warm-up (``jax.block_until_ready``; the inputs are random normal, never zeros), the compiled
executable's peak memory (arguments + outputs + temporaries), and achieved rates: TFLOP/s from
the counted FLOPs of the algorithm (:func:`flops`, documented per op) and GB/s from the fewest
bytes the op must move (inputs read once, outputs written once), each against the card's
ceilings. On a GPU the ceilings are measured first in the same run (a bf16 matrix product of
8192^3 and a device-to-device copy of 2 GiB, as ``/work/.library/device/METHOD.md``
recommends); the vendor's datasheet figures for known cards are recorded beside them.

Results are written after every measurement (``gpu.json``, ``gpu.md``), so a run cut off by a
time limit keeps what it measured; ``--max-minutes`` stops starting new measurements in time.
On a CPU the cuDNN row is recorded as unavailable and the Pallas rows run in Pallas's
interpret mode: such a run checks that the plan works, and its timings mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from effseq import ops
from effseq.benchmarks.timing import memory, positive_ints, provenance

RESULTS = pathlib.Path("benchmarks/results")
QUICK_RESULTS = pathlib.Path("results/bench-gpu")

# Vendor datasheet figures (dense bf16 TFLOP/s, memory bandwidth in bytes/s): leads only; the
# run's own measured ceilings are what the rates are divided by.
DATASHEET = {
    "NVIDIA H100 80GB HBM3": (989.0, 3.35e12),
    "NVIDIA H200": (989.0, 4.8e12),
    "NVIDIA A100-SXM4-80GB": (312.0, 2.04e12),
}


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    tokens: int = 16384  # B x T per call
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    heads: int = 16
    head_dim: int = 128
    dtype: str = "bfloat16"
    repeats: int = 10
    modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    rows: tuple[str, ...] = ()  # empty: every row of ROWS
    chunk_sizes: tuple[int, ...] = ()  # empty: each op's default chunk size
    max_minutes: float = 8.0
    lower_only: bool = False  # lower every row for cuda (any host) instead of running it

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


PLANS = {
    "gpu": GpuPlan(),
    # Tiny shapes for any backend: the plan's code paths, in seconds (tests, CPU checks).
    "tiny": GpuPlan(tokens=64, lengths=(16, 32), heads=2, head_dim=16, dtype="float32", repeats=2),
}


@dataclasses.dataclass
class Case:
    fn: Callable
    args: tuple
    flops_fwd: float | None  # counted FLOPs of one forward call (None: not matrix work)
    bwd_factor: float  # forward+backward FLOPs = flops_fwd * bwd_factor
    note: str


def _normal(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def _heads(plan, b, t, dtype, seed):
    k = _keys(seed, 3)
    shape = (b, t, plan.heads, plan.head_dim)
    return tuple(_normal(kk, shape, dtype) for kk in k)


def _linear_attention_flops(b, t, h, dk, dv, c):
    # Per token and head, the chunk form's matrix products: the (c x c) in-chunk scores
    # (2 c dk), their product with the values (2 c dv), the read-out of the carried state
    # (2 dk dv) and the state update (2 dk dv); whole c x c blocks, as computed.
    return b * t * h * (2 * c * dk + 2 * c * dv + 4 * dk * dv)


def case_attention(plan, b, t, dtype, impl, chunk):
    q, k, v = _heads(plan, b, t, dtype, 0)
    flops = 2 * b * plan.heads * t * t * plan.head_dim  # 4 b h t^2 d, halved by causality
    if impl in ("cudnn", "xla-dpa"):
        which = "cudnn" if impl == "cudnn" else "xla"

        def fn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=which)

        note = f"jax.nn.dot_product_attention(implementation={which!r}), causal"
    else:

        def fn(q, k, v):
            return ops.attention(q, k, v, causal=True, impl=impl)

        note = f"effseq.ops.attention impl={impl!r}, causal"
    # Backward: five products of the forward's size against its two (FlashAttention's count).
    return Case(fn, (q, k, v), flops, 3.5, note)


def _chunk_kw(chunk):
    return {} if chunk is None else {"chunk_size": chunk}


def case_gla(plan, b, t, dtype, impl, chunk):
    q, k, v = _heads(plan, b, t, dtype, 1)
    log_g = jax.nn.log_sigmoid(_normal(_keys(11, 1)[0], q.shape, jnp.float32)) / 16

    def fn(q, k, v, log_g):
        return ops.gated_linear_attention(q, k, v, log_g, impl=impl, **_chunk_kw(chunk))[0]

    c = chunk or 64
    flops = _linear_attention_flops(b, t, plan.heads, plan.head_dim, plan.head_dim, c)
    return Case(fn, (q, k, v, log_g), flops, 3.0, f"GLA impl={impl!r}, chunk {chunk or 'default'}")


def case_gdn(plan, b, t, dtype, impl, chunk):
    q, k, v = _heads(plan, b, t, dtype, 2)

    def unit(z):
        z = z.astype(jnp.float32)
        return (z / jnp.linalg.norm(z, axis=-1, keepdims=True)).astype(dtype)

    kg = _keys(12, 2)
    log_g = jax.nn.log_sigmoid(_normal(kg[0], q.shape[:3], jnp.float32) + 3.0)
    beta = jax.nn.sigmoid(_normal(kg[1], q.shape[:3], jnp.float32))

    def fn(q, k, v, log_g, beta):
        return ops.gated_delta_rule(q, k, v, log_g, beta, impl=impl, **_chunk_kw(chunk))[0]

    c, d = chunk or 64, plan.head_dim
    # GLA's products, plus the WY/UT terms: k k^T in the chunk (2 c d), the triangular inverse
    # (c^2 / 3 per token), its products with the keys and values (2 c d each) and the
    # correction W S (2 d^2).
    extra = b * t * plan.heads * (2 * c * d + c * c / 3 + 4 * c * d + 2 * d * d)
    flops = _linear_attention_flops(b, t, plan.heads, d, d, c) + extra
    return Case(
        fn, (unit(q), unit(k), v, log_g, beta), flops, 3.0, f"gated delta rule impl={impl!r}"
    )


def case_ssd(plan, b, t, dtype, impl, chunk):
    p = min(64, plan.width)  # Mamba-2: head dim 64, state 128
    h, n = plan.width // p, 128
    kk = _keys(3, 5)
    x = _normal(kk[0], (b, t, h, p), dtype)
    dt = jax.nn.softplus(_normal(kk[1], (b, t, h), jnp.float32) - 4.0)
    A = -jax.random.uniform(kk[2], (h,), minval=1.0, maxval=16.0)
    B = _normal(kk[3], (b, t, 1, n), dtype)
    C = _normal(kk[4], (b, t, 1, n), dtype)

    def fn(x, dt, A, B, C):
        return ops.ssd(x, dt, A, B, C, impl=impl, **_chunk_kw(chunk))[0]

    c = chunk or 64
    flops = b * t * h * (2 * c * n + 2 * c * p + 4 * p * n)
    return Case(fn, (x, dt, A, B, C), flops, 3.0, f"SSD impl={impl!r}, {h} heads x {p}, n {n}")


def case_mamba(plan, b, t, dtype, impl, chunk):
    d, n = plan.width, 16
    kk = _keys(4, 5)
    u = _normal(kk[0], (b, t, d), dtype)
    delta = jax.nn.softplus(_normal(kk[1], (b, t, d), jnp.float32) - 4.0).astype(dtype)
    A = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n))
    B = _normal(kk[2], (b, t, n), dtype)
    C = _normal(kk[3], (b, t, n), dtype)

    def fn(u, delta, A, B, C):
        return ops.selective_scan(u, delta, A, B, C, impl=impl, **_chunk_kw(chunk))[0]

    # Elementwise work, memory-bound: no FLOP rate is reported, bytes are.
    return Case(fn, (u, delta, A, B, C), None, 3.0, f"selective scan impl={impl!r}, d {d}, n 16")


def case_rglru(plan, b, t, dtype, impl, chunk):
    kk = _keys(5, 2)
    a = jax.nn.sigmoid(_normal(kk[0], (b, t, plan.width), jnp.float32) + 4.0)
    x = _normal(kk[1], (b, t, plan.width), dtype)

    def fn(a, x):
        return ops.linear_scan(a, x.astype(jnp.float32), impl=impl)[0]

    return Case(fn, (a, x), None, 3.0, f"RG-LRU's linear_scan impl={impl!r}")


def case_s4d(plan, b, t, dtype, impl, chunk):
    h, n = plan.width, 64
    kk = _keys(6, 4)
    log_dt = jax.random.uniform(kk[0], (h,), minval=math.log(1e-3), maxval=math.log(1e-1))
    A = jnp.broadcast_to(-0.5 + 1j * jnp.pi * jnp.arange(n), (h, n)).astype(jnp.complex64)
    Bc = (jax.random.normal(kk[1], (h, n)) * 0.5).astype(jnp.complex64)
    Cc = (jax.random.normal(kk[2], (h, n)) * 0.5).astype(jnp.complex64)
    u = _normal(kk[3], (b, t, h), dtype)

    def fn(u, log_dt, A, B, C):
        return ops.causal_conv(u, ops.s4d_kernel(log_dt, A, B, C, t), impl=impl)

    return Case(fn, (u, log_dt, A, Bc, Cc), None, 3.0, f"S4D kernel + conv impl={impl!r}")


def case_sgconv(plan, b, t, dtype, impl, chunk):
    d = 64
    scales = 1
    while ops.sgconv_length(scales, d) < t:
        scales += 1
    kk = _keys(7, 2)
    w = _normal(kk[0], (scales, plan.width, d), jnp.float32, 0.1)
    u = _normal(kk[1], (b, t, plan.width), dtype)

    def fn(u, w):
        return ops.causal_conv(u, ops.sgconv_kernel(w, t), impl=impl)

    return Case(fn, (u, w), None, 3.0, f"SGConv kernel + conv impl={impl!r}")


def case_based(plan, b, t, dtype, impl, chunk):
    from effseq.layers.based import taylor_features

    f = 16
    kk = _keys(8, 3)
    q = _normal(kk[0], (b, t, plan.heads, f), dtype)
    k = _normal(kk[1], (b, t, plan.heads, f), dtype)
    v = _normal(kk[2], (b, t, plan.heads, plan.head_dim), dtype)

    def fn(q, k, v):
        fq, fk = taylor_features(q), taylor_features(k)
        ones = jnp.ones((*v.shape[:-1], 1), v.dtype)
        o, _ = ops.gated_linear_attention(
            fq, fk, jnp.concatenate([v, ones], -1), jnp.zeros(fk.shape, jnp.float32), impl=impl
        )
        return o[..., :-1] / (o[..., -1:] + 1e-6)

    dk = 1 + f + f * f
    flops = _linear_attention_flops(b, t, plan.heads, dk, plan.head_dim + 1, 64)
    return Case(fn, (q, k, v), flops, 3.0, f"Based: GLA impl={impl!r} on Taylor features")


# Row name -> (case builder, impl, whether chunk_size applies).
ROWS: dict[str, tuple[Callable, str | None, bool]] = {
    "attention/cudnn": (case_attention, "cudnn", False),
    "attention/xla-dpa": (case_attention, "xla-dpa", False),
    "attention/effseq-xla": (case_attention, "xla", False),
    "attention/effseq-blockwise": (case_attention, "blockwise", False),
    "gla/chunked": (case_gla, "chunked", True),
    "gla/pallas": (case_gla, "pallas", True),
    "mamba2/chunked": (case_ssd, "chunked", True),
    "mamba2/pallas": (case_ssd, "pallas", True),
    "gdn/chunked": (case_gdn, "chunked", True),
    "gdn/pallas": (case_gdn, "pallas", True),
    "mamba/chunked": (case_mamba, "chunked", True),
    "mamba/associative": (case_mamba, "associative", False),
    "mamba/pallas": (case_mamba, "pallas", True),
    "rglru/sequential": (case_rglru, "sequential", False),
    "rglru/associative": (case_rglru, "associative", False),
    "s4d/fft": (case_s4d, "fft", False),
    "sgconv/fft": (case_sgconv, "fft", False),
    "based/chunked": (case_based, "chunked", False),
}
BASELINE = "attention/cudnn"
# The goals at T = 8k and 16k, forward+backward: (row, length, times faster than the
# baseline at least) against cuDNN attention; the selective scan against its XLA path.
GOALS = (
    ("gla/pallas", BASELINE, 8192, 1.0),
    ("gla/pallas", BASELINE, 16384, 2.0),
    ("mamba2/pallas", BASELINE, 8192, 1.0),
    ("mamba2/pallas", BASELINE, 16384, 2.0),
    ("mamba/pallas", "mamba/chunked", 8192, 3.0),
    ("mamba/pallas", "mamba/chunked", 16384, 3.0),
)


def unavailable(row: str) -> str | None:
    """Why ``row`` cannot run on this backend (None: it can)."""
    backend = jax.default_backend()
    if row == "attention/cudnn" and backend != "gpu":
        return f"cuDNN attention needs a CUDA GPU (backend here: {backend})"
    _, impl, _ = ROWS[row]
    if impl == "pallas" and backend not in ("gpu", "cpu"):
        return f"effseq's Pallas kernels target NVIDIA GPUs (backend here: {backend})"
    return None


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(plan: GpuPlan, row: str, t: int, mode: str, chunk: int | None) -> dict:
    """One (row, length, mode[, chunk]) measurement -> a record (never raises: errors are
    recorded with their message, so one failing row does not end the run)."""
    b = max(1, plan.tokens // t)
    rec = {"row": row, "t": t, "batch": b, "mode": mode, "chunk_size": chunk}
    # cuDNN's attention checks for cuDNN when traced, so it lowers only where it runs.
    reason = unavailable(row) if not plan.lower_only or row == BASELINE else None
    if reason:
        return {**rec, "skipped": reason}
    builder, impl, _ = ROWS[row]
    try:
        case = builder(plan, b, t, jnp.dtype(plan.dtype), impl, chunk)
        fn, args = case.fn, case.args
        rec["note"] = case.note
        out_bytes = _nbytes(jax.eval_shape(fn, *args))
        in_bytes = _nbytes(args)
        if mode == "fwd_bwd":
            fwd = fn
            fn = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=range(len(args)))
            rec["min_bytes"] = 2 * in_bytes + 2 * out_bytes
            rec["flops"] = None if case.flops_fwd is None else case.flops_fwd * case.bwd_factor
        else:
            rec["min_bytes"] = in_bytes + out_bytes
            rec["flops"] = case.flops_fwd
        if plan.lower_only:
            from effseq.ops.pallas._common import lower_for_gpu

            start = time.perf_counter()
            text = lower_for_gpu(fn, *args)
            rec["lower_s"] = time.perf_counter() - start
            rec["triton_calls"] = text.count("__gpu$xla.gpu.triton")
            rec["cudnn_calls"] = text.count("__cudnn$fmha")
            return rec
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        rec["compile_s"] = time.perf_counter() - start
        rec.update(memory(compiled))
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(plan.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        times.sort()
        rec.update(median_s=times[len(times) // 2], min_s=times[0], max_s=times[-1])
        rec["runs"] = len(times)
        rec["interpret"] = impl == "pallas" and jax.default_backend() == "cpu"
    except Exception as err:  # noqa: BLE001 (recorded, reported, the run goes on)
        rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return rec


def measure_ceilings() -> dict:
    """The card's bf16 matrix rate and copy bandwidth, measured now (GPU only)."""
    if jax.default_backend() != "gpu":
        return {}
    n = 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b).lower(a, a).compile()
    x = jax.random.normal(jax.random.key(1), (2**30,), jnp.bfloat16)  # 2 GiB
    cp = jax.jit(lambda x: x * jnp.bfloat16(1.0)).lower(x).compile()  # read + write

    def best(f, *args):
        jax.block_until_ready(f(*args))
        out = []
        for _ in range(10):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            out.append(time.perf_counter() - start)
        return sorted(out)[5]

    return {
        "matmul_bf16_tflops": 2 * n**3 / best(mm, a, a) / 1e12,
        "copy_bytes_per_s": 2 * x.size * 2 / best(cp, x),
    }


def device_slug(kind: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the results folder's name."""
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def rates(rec: dict, ceilings: dict) -> dict:
    out = {}
    if "median_s" not in rec:
        return out
    if rec.get("flops"):
        out["tflops"] = rec["flops"] / rec["median_s"] / 1e12
        if ceilings.get("matmul_bf16_tflops"):
            out["tflops_share"] = out["tflops"] / ceilings["matmul_bf16_tflops"]
    out["gb_per_s"] = rec["min_bytes"] / rec["median_s"] / 1e9
    if ceilings.get("copy_bytes_per_s"):
        out["bandwidth_share"] = rec["min_bytes"] / rec["median_s"] / ceilings["copy_bytes_per_s"]
    return out


def _find(records, row, t, mode="fwd_bwd"):
    found = [r for r in records if (r["row"], r["t"], r["mode"]) == (row, t, mode)]
    timed = [r for r in found if "median_s" in r]
    return min(timed, key=lambda r: r["median_s"]) if timed else None


def goals(records) -> list[dict]:
    out = []
    for row, base, t, target in GOALS:
        a, b = _find(records, row, t), _find(records, base, t)
        speedup = None if a is None or b is None else b["median_s"] / a["median_s"]
        out.append(
            {
                "row": row,
                "against": base,
                "t": t,
                "target_speedup": target,
                "speedup": speedup,
                "met": None if speedup is None else speedup >= target,
            }
        )
    return out


def tuning(records) -> list[dict]:
    """The fastest chunk size per (row, length, mode) among those measured (a sweep)."""
    best: dict[tuple, dict] = {}
    for r in records:
        if "median_s" not in r or r.get("chunk_size") is None:
            continue
        key = (r["row"], r["t"], r["mode"])
        if key not in best or r["median_s"] < best[key]["median_s"]:
            best[key] = r
    return [
        {"row": k[0], "t": k[1], "mode": k[2], "chunk_size": r["chunk_size"]}
        for k, r in sorted(best.items())
    ]


def markdown(result: dict) -> str:
    prov = result["provenance"]
    plan = result["plan"]
    lines = [
        f"# effseq bench --plan gpu: {prov['device_kind']} ({prov['backend']})",
        "",
        f"jax {prov['jax']}, commit {prov['git_commit']}{' (dirty)' if prov['git_dirty'] else ''}"
        f", {prov['date']}. B x T = {plan['tokens']} tokens, width {plan['heads']} x "
        f"{plan['head_dim']}, {plan['dtype']}; median of {plan['repeats']} calls after a "
        "warm-up. Times in ms; x = speed-up over cuDNN attention, fwd+bwd, same length.",
        "",
    ]
    if result.get("ceilings"):
        c = result["ceilings"]
        lines += [
            f"Measured ceilings: bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s, copy "
            f"{c['copy_bytes_per_s'] / 1e12:.2f} TB/s.",
            "",
        ]
    if prov["backend"] == "cpu":
        lines += ["CPU run: a check that the plan works; Pallas rows ran interpreted.", ""]
    records = result["records"]
    lengths = plan["lengths"]
    head = "| row | " + " | ".join(f"T={t} fwd / fwd+bwd" for t in lengths) + " |"
    lines += [head, "|---|" + "---|" * len(lengths)]
    for row in dict.fromkeys(r["row"] for r in records):
        cells = []
        for t in lengths:
            f, fb = _find(records, row, t, "fwd"), _find(records, row, t, "fwd_bwd")
            base = _find(records, BASELINE, t)
            if f is None and fb is None:
                miss = [r for r in records if r["row"] == row and r["t"] == t]
                if not miss:
                    cells.append("not run")
                elif all("lower_s" in r for r in miss):
                    calls = "/".join(str(r["triton_calls"]) for r in miss)
                    cells.append(f"lowered ({calls} Triton calls)")
                elif "skipped" in miss[0]:
                    cells.append("n/a")
                else:
                    cells.append("error")
                continue
            text = f"{f['median_s'] * 1e3:.2f}" if f else "-"
            text += f" / {fb['median_s'] * 1e3:.2f}" if fb else " / -"
            if fb and base:
                text += f" ({base['median_s'] / fb['median_s']:.2f}x)"
            if fb and fb.get("tflops"):
                text += f" {fb['tflops']:.3g} TF/s"
            cells.append(text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Goals (fwd+bwd):", ""]
    for g in result["goals"]:
        s = "not measured" if g["speedup"] is None else f"{g['speedup']:.2f}x"
        met = {None: "", True: " (met)", False: " (missed)"}[g["met"]]
        lines.append(
            f"- {g['row']} vs {g['against']} at T={g['t']}: {s}, target >= "
            f"{g['target_speedup']:g}x{met}"
        )
    skipped = sorted({(r["row"], r["skipped"]) for r in records if "skipped" in r})
    errors = sorted({(r["row"], r["error"]) for r in records if "error" in r})
    if skipped or errors:
        lines += ["", "Not measured:", ""]
        lines += [f"- {row}: {why}" for row, why in skipped]
        lines += [f"- {row}: {why}" for row, why in errors]
    return "\n".join(lines) + "\n"


def run(plan: GpuPlan, out: pathlib.Path, log=print) -> dict:
    rows = plan.rows or tuple(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    prov = provenance()
    result = {
        "provenance": prov,
        "plan": dataclasses.asdict(plan),
        "datasheet": DATASHEET.get(prov["device_kind"]),
        "ceilings": measure_ceilings(),
        "records": [],
        "goals": [],
        "tuning": [],
        "stopped_early": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    todo = [
        (row, t, mode, chunk)
        for t in plan.lengths
        for row in rows
        for mode in plan.modes
        for chunk in (plan.chunk_sizes if plan.chunk_sizes and ROWS[row][2] else (None,))
    ]
    log(f"effseq bench --plan gpu on {prov['device_kind']}: {len(todo)} measurements -> {out}")
    for i, (row, t, mode, chunk) in enumerate(todo):
        minutes = (time.perf_counter() - start) / 60
        if minutes > plan.max_minutes:
            result["stopped_early"] = (
                f"--max-minutes {plan.max_minutes:g} reached after {i} of {len(todo)}"
            )
            log(result["stopped_early"])
            break
        rec = measure(plan, row, t, mode, chunk)
        rec.update(rates(rec, result["ceilings"]))
        result["records"].append(rec)
        what = rec.get("skipped") or rec.get("error")
        if what is None and "lower_s" in rec:
            what = (
                f"lowered for cuda in {rec['lower_s']:.1f} s: {rec['triton_calls']} Triton, "
                f"{rec['cudnn_calls']} cuDNN calls"
            )
        elif what is None:
            what = f"{rec['median_s'] * 1e3:.3f} ms (compile {rec['compile_s']:.1f} s)"
        tag = f"{row} t={t} {mode}" + (f" c={chunk}" if chunk else "")
        log(f"[{i + 1}/{len(todo)}] {tag}: {what}")
        result["goals"] = goals(result["records"])
        result["tuning"] = tuning(result["records"]) if plan.chunk_sizes else []
        write(result, out)
    result["wall_s"] = time.perf_counter() - start
    write(result, out)
    return result


def write(result: dict, out: pathlib.Path) -> list[pathlib.Path]:
    paths = [out / "gpu.json", out / "gpu.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    return paths


def _rows(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(","))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="effseq bench --plan gpu", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--plan", choices=["gpu"], default="gpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (any backend; a check)")
    p.add_argument("--rows", type=_rows, help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--lengths", type=positive_ints, help="sequence lengths, e.g. 8192,16384")
    p.add_argument("--tokens", type=int, help="B x T per call (default 16384)")
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, help="timed calls per measurement (>= 2)")
    p.add_argument("--modes", choices=["fwd", "fwd_bwd", "both"], default="both")
    p.add_argument("--chunk-sizes", type=positive_ints, help="sweep chunk_size (chunked rows)")
    p.add_argument("--max-minutes", type=float, help="start no measurement after this")
    p.add_argument(
        "--lower-only",
        action="store_true",
        help="lower every row for cuda instead of running it (any host; checks the plan)",
    )
    p.add_argument("--out", type=pathlib.Path, help="results folder")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 2:
        p.error(f"--repeats must be at least 2, got {args.repeats}")
    for name in ("tokens", "heads", "head_dim"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def plan_from_args(args) -> GpuPlan:
    base = PLANS["tiny" if args.tiny else "gpu"]
    changes = {
        "lengths": args.lengths,
        "tokens": args.tokens,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "rows": args.rows,
        "chunk_sizes": args.chunk_sizes,
        "max_minutes": args.max_minutes,
    }
    if args.lower_only:
        changes["lower_only"] = True
    if args.modes != "both":
        changes["modes"] = (args.modes,)
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v})


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = plan_from_args(args)
    if args.out:
        out = args.out
    elif jax.default_backend() == "gpu" and not args.tiny:
        out = RESULTS / device_slug(jax.devices()[0].device_kind)
    else:
        out = QUICK_RESULTS
    result = run(plan, out)
    print()
    print(markdown(result))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
