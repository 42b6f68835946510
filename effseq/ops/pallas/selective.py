"""Pallas kernels for Mamba's selective scan (S6), behind ``selective_scan(..., impl="pallas")``.

Gu & Dao 2023, Algorithm 2 / eq. (2a)-(2b), per channel d and state n:

    x_t = exp(delta_t A) ⊙ x_{t-1} + (delta_t u_t) B_t,      y_t = sum_n x_t ⊙ C_t + D ⊙ u_t.

Why this form. A is diagonal per (channel, state), so every (d, n) pair decays at its own rate
and there is no matrix product to give the tensor cores: the chunked form of SSD or GLA (a
decay-masked (c, c) matrix per chunk shared by a head) would need one such matrix per (d, n)
pair. The kernels follow Mamba's own CUDA kernel instead: each program owns one batch row and a
tile of ``block_d`` channels, keeps that tile's (block_d, n) float32 state in registers, and
walks time sequentially, reading u, delta, B, C once (in their own dtype, float32 or bfloat16,
upcast in the kernel) and writing y once; no state goes to memory except the checkpoints below.
The grid is parallel over (batch, channel tiles), b·d/block_d programs; time is a
``lax.fori_loop`` over chunks of ``chunk_size`` steps, each chunk statically unrolled so the
per-step row loads do not wait on the state carried through the loop (only h = decay ⊙ h + input
is). Nothing of it has been measured on a GPU yet (issue 19).

Forward (Pallas, one kernel): y (in u's dtype, with the skip term D ⊙ u added in the kernel),
the final state, and, when differentiated, the state at the start of every chunk (the
checkpoints the backward pass needs: b·(t/c)·d·n float32, n/c times the elements of u; a call
that is not differentiated does not write them).

Backward (Pallas, one kernel, reverse time): per (batch, channel tile), the chunks in reverse;
each chunk's states are recomputed from its checkpoint into registers (c + 1 states), then the
adjoint recurrence runs backwards through the chunk:

    g_t = C_t g_{y_t} + exp(delta_{t+1} A) g_{t+1}          (g_T = cotangent of the final state)
    dL/du_t = delta_t sum_n g_t B_t + D g_{y_t}
    dL/ddelta_t = u_t sum_n g_t B_t + sum_n A ⊙ g_t ⊙ exp(delta_t A) ⊙ x_{t-1}
    dL/dA = sum_t delta_t g_t ⊙ exp(delta_t A) ⊙ x_{t-1},  dL/dD = sum_t g_{y_t} u_t
    dL/dB_t = sum_d g_t (delta_t u_t),  dL/dC_t = sum_d x_t g_{y_t},  dL/dh0 = exp(delta_0 A) g_0

dL/dB and dL/dC sum over channels, which span programs: each channel tile writes its partial
sum ((b, d/block_d, t, n) float32) and the wrapper adds them (XLA); likewise dL/dA and dL/dD are
summed over the batch in the wrapper. Everything else of the backward is in the kernel: no part
goes through the XLA chunked path. (The partials are 2·n/block_d float32 per element of u: at
block_d 32 and n 16, 4 bytes per element of u, against the 10 of reading u, delta, g_y and
writing their gradients in bfloat16; at block_d 8 they dominate. Atomic adds into one (b, t, n)
buffer would remove them, at the price of a run-to-run varying summation order.)

Like the XLA chunked path this is a ``jax.custom_vjp``: reverse-mode autodiff (grad, vjp), not
forward mode (jvp, jacfwd).

Packed rows (``keep``, 0 at a document start): the start's decay is taken as 0, as the XLA paths
do; the adjoint uses the same zeroed decays, so no gradient crosses a start, and the start's
decay gradient (g ⊙ decay ⊙ x_{t-1} above) is 0.

Padding, all exact: channels are padded to a multiple of ``block_d`` and the state size n to a
power of two (Triton's block shapes) with zeros. A padded channel has delta = u = A = D = 0 and
a zero initial state, so its decay is exp(0) = 1, its input 0 and its state stays 0; a padded
state column has A = B = C = 0 and a zero initial state, so it stays 0 and adds nothing to y or
to any gradient (its B, C, A are 0 in every sum above). Time is padded to a multiple of the chunk
with delta = u = B = C = 0: decay 1 and input 0, so the state passes through unchanged, as in the
XLA chunked path; the padded steps' outputs are dropped (their cotangent is 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from effseq.ops.pallas import _common
from effseq.typing import Array

__all__ = [
    "DEFAULT_BLOCK_D",
    "DEFAULT_CHUNK",
    "MAX_CHUNK",
    "MIN_BLOCK_D",
    "MIN_PROGRAMS",
    "selective_scan_pallas",
]

# Steps per chunk (unrolled in the kernels; the backward keeps c + 1 states of the tile live)
# and channels per program. Not yet tuned on a GPU (issue 19): with chunks of 16, a (32, 16)
# float32 tile at 4 warps is 4 registers per thread per state, 17 states = 68 registers in the
# backward pass.
DEFAULT_CHUNK = 16
DEFAULT_BLOCK_D = 32
# The default tile is halved (down to MIN_BLOCK_D channels) while the grid has fewer programs
# than this: two per streaming multiprocessor of an H100/H200 (132). The only parallelism is
# b·d/block_d programs, so a long single row (b = 1, d = 2048: 64 programs of 32 channels)
# would leave half the GPU idle.
MIN_PROGRAMS = 264
MIN_BLOCK_D = 8
# Longer chunks are taken as this long: every step of a chunk is unrolled and the backward
# keeps the chunk's c + 1 states in registers, so c = 64 or 128 (sizes that suit the XLA
# chunked path) would spill them (33 states of a (32, 16) tile are already 132 registers).
MAX_CHUNK = 32

_OP = "selective_scan"


def _next_power_of_two(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _f32(x):
    return x.astype(jnp.float32)


def _forward_kernel(*refs, chunk, n_chunks, has_keep, save_starts):
    """One (batch row, channel tile): y, the final state and (``save_starts``) every chunk's
    start state."""
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, h0_ref, *refs = refs
    keep_ref = refs.pop(0) if has_keep else None
    y_ref, h_last_ref, *h_starts_ref = refs
    A = _f32(a_ref[...])
    D = _f32(d_ref[...])

    def chunk_body(i, h):
        if save_starts:
            h_starts_ref[0][i] = h
        for j in range(chunk):
            k = i * chunk + j
            u, dt = _f32(u_ref[k]), _f32(dt_ref[k])
            decay = jnp.exp(dt[:, None] * A)
            if has_keep:
                decay = decay * keep_ref[k]
            h = decay * h + (dt * u)[:, None] * _f32(b_ref[k])[None, :]
            y = jnp.sum(h * _f32(c_ref[k])[None, :], axis=1) + D * u
            y_ref[k] = y.astype(y_ref.dtype)
        return h

    h_last_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk_body, h0_ref[...])


def _backward_kernel(*refs, chunk, n_chunks, has_keep):
    """One (batch row, channel tile): the adjoint recurrence in reverse, chunk by chunk."""
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, h_starts_ref, gy_ref, g_last_ref, *refs = refs
    keep_ref = refs.pop(0) if has_keep else None
    gu_ref, gdt_ref, ga_ref, gb_ref, gc_ref, gd_ref, gh0_ref = refs
    A = _f32(a_ref[...])
    D = _f32(d_ref[...])

    def chunk_body(r, carry):
        # g: dL/d(state at the end of this chunk) through everything after it, i.e. the
        # cotangent already multiplied by the next step's decay.
        g, g_A, g_D = carry
        i = n_chunks - 1 - r
        # Recompute the chunk's states from its checkpoint: xs[j] is the state before step j.
        xs = [h_starts_ref[i]]
        rows = []
        for j in range(chunk):
            k = i * chunk + j
            u, dt, b = _f32(u_ref[k]), _f32(dt_ref[k]), _f32(b_ref[k])
            decay = jnp.exp(dt[:, None] * A)
            if has_keep:
                decay = decay * keep_ref[k]
            xs.append(decay * xs[-1] + (dt * u)[:, None] * b[None, :])
            rows.append((u, dt, b))
        for j in reversed(range(chunk)):
            k = i * chunk + j
            u, dt, b = rows[j]
            # Recomputed rather than kept from the loop above: c more live (block_d, n) tiles
            # would double the registers the chunk's states already take.
            decay = jnp.exp(dt[:, None] * A)
            if has_keep:
                decay = decay * keep_ref[k]
            gy = _f32(gy_ref[k])
            g = g + gy[:, None] * _f32(c_ref[k])[None, :]  # g_k
            g_log_decay = g * decay * xs[j]  # dL/d(delta_k A), elementwise
            g_du = jnp.sum(g * b[None, :], axis=1)  # dL/d(delta_k u_k)
            gu_ref[k] = (g_du * dt + D * gy).astype(gu_ref.dtype)
            g_dt = g_du * u + jnp.sum(g_log_decay * A, axis=1)
            gdt_ref[k] = g_dt.astype(gdt_ref.dtype)
            gb_ref[k] = jnp.sum(g * (dt * u)[:, None], axis=0)
            gc_ref[k] = jnp.sum(xs[j + 1] * gy[:, None], axis=0)
            g_A = g_A + g_log_decay * dt[:, None]
            g_D = g_D + gy * u
            g = decay * g
        return g, g_A, g_D

    init = (g_last_ref[...], jnp.zeros_like(A), jnp.zeros_like(D))
    g, g_A, g_D = jax.lax.fori_loop(0, n_chunks, chunk_body, init)
    gh0_ref[...] = g
    ga_ref[...] = g_A
    gd_ref[...] = g_D


def _specs(t, n, block_d, has_keep):
    """BlockSpecs of the inputs both kernels share: u, delta, A, B, C, D (and keep)."""
    seq_d = pl.BlockSpec((None, t, block_d), lambda i, j: (i, 0, j))
    seq_n = pl.BlockSpec((None, t, n), lambda i, j: (i, 0, 0))
    specs = [
        seq_d,
        seq_d,
        pl.BlockSpec((block_d, n), lambda i, j: (j, 0)),
        seq_n,
        seq_n,
        pl.BlockSpec((block_d,), lambda i, j: (j,)),
    ]
    keep = [pl.BlockSpec((None, t), lambda i, j: (i, 0))] if has_keep else []
    return specs, keep


def _state_spec(block_d, n):
    return pl.BlockSpec((None, block_d, n), lambda i, j: (i, j, 0))


def _forward(u, delta, A, B, C, D, h0, keep, chunk, block_d, save_starts):
    """The forward kernel: (y, h_last, h_starts or None). Checkpoints are only written when
    the backward pass will need them (``save_starts``)."""
    b, t, dp = u.shape
    n = A.shape[1]
    n_chunks = t // chunk
    has_keep = keep is not None
    specs, keep_spec = _specs(t, n, block_d, has_keep)
    kernel = functools.partial(
        _forward_kernel,
        chunk=chunk,
        n_chunks=n_chunks,
        has_keep=has_keep,
        save_starts=save_starts,
    )
    out_shape = [
        jax.ShapeDtypeStruct((b, t, dp), u.dtype),
        jax.ShapeDtypeStruct((b, dp, n), jnp.float32),
    ]
    out_specs = [pl.BlockSpec((None, t, block_d), lambda i, j: (i, 0, j)), _state_spec(block_d, n)]
    if save_starts:
        out_shape.append(jax.ShapeDtypeStruct((b, n_chunks, dp, n), jnp.float32))
        out_specs.append(pl.BlockSpec((None, n_chunks, block_d, n), lambda i, j: (i, 0, j, 0)))
    y, h_last, *h_starts = _common.call(
        kernel,
        out_shape=out_shape,
        grid=(b, dp // block_d),
        in_specs=[*specs, _state_spec(block_d, n), *keep_spec],
        out_specs=out_specs,
        name="selective_scan_fwd",
    )(u, delta, A, B, C, D, h0, *([keep] if has_keep else []))
    return y, h_last, (h_starts[0] if save_starts else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _scan(u, delta, A, B, C, D, h0, keep, chunk, block_d):
    """Padded inputs (t a multiple of ``chunk``, d of ``block_d``, n a power of two) ->
    (y in u's dtype, final state float32)."""
    y, h_last, _ = _forward(u, delta, A, B, C, D, h0, keep, chunk, block_d, False)
    return y, h_last


def _scan_fwd(u, delta, A, B, C, D, h0, keep, chunk, block_d):
    y, h_last, h_starts = _forward(u, delta, A, B, C, D, h0, keep, chunk, block_d, True)
    return (y, h_last), (u, delta, A, B, C, D, h0, keep, h_starts)


def _scan_bwd(chunk, block_d, res, cts):
    u, delta, A, B, C, D, h0, keep, h_starts = res
    g_y, g_last = cts
    b, t, dp = u.shape
    n = A.shape[1]
    n_tiles = dp // block_d
    has_keep = keep is not None
    specs, keep_spec = _specs(t, n, block_d, has_keep)
    kernel = functools.partial(
        _backward_kernel, chunk=chunk, n_chunks=t // chunk, has_keep=has_keep
    )
    per_tile = pl.BlockSpec((None, None, t, n), lambda i, j: (i, j, 0, 0))
    g_u, g_delta, g_A, g_B, g_C, g_D, g_h0 = _common.call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, u.dtype),
            jax.ShapeDtypeStruct(delta.shape, delta.dtype),
            jax.ShapeDtypeStruct((b, dp, n), jnp.float32),
            jax.ShapeDtypeStruct((b, n_tiles, t, n), jnp.float32),
            jax.ShapeDtypeStruct((b, n_tiles, t, n), jnp.float32),
            jax.ShapeDtypeStruct((b, dp), jnp.float32),
            jax.ShapeDtypeStruct((b, dp, n), jnp.float32),
        ],
        grid=(b, n_tiles),
        in_specs=[
            *specs,
            pl.BlockSpec((None, t // chunk, block_d, n), lambda i, j: (i, 0, j, 0)),
            pl.BlockSpec((None, t, block_d), lambda i, j: (i, 0, j)),
            _state_spec(block_d, n),
            *keep_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, t, block_d), lambda i, j: (i, 0, j)),
            pl.BlockSpec((None, t, block_d), lambda i, j: (i, 0, j)),
            _state_spec(block_d, n),
            per_tile,
            per_tile,
            pl.BlockSpec((None, block_d), lambda i, j: (i, j)),
            _state_spec(block_d, n),
        ],
        name="selective_scan_bwd",
    )(u, delta, A, B, C, D, h_starts, g_y, g_last, *([keep] if has_keep else []))
    return (
        g_u,
        g_delta,
        jnp.sum(g_A, axis=0).astype(A.dtype),
        jnp.sum(g_B, axis=1).astype(B.dtype),
        jnp.sum(g_C, axis=1).astype(C.dtype),
        jnp.sum(g_D, axis=0).astype(D.dtype),
        g_h0.astype(h0.dtype),
        None if keep is None else jnp.zeros_like(keep),
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_pallas(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None,
    h0: Array,
    *,
    chunk_size: int | None = None,
    block_d: int | None = None,
    keep: Array | None = None,
) -> tuple[Array, Array]:
    """The selective scan of validated, single-shard inputs through the Pallas kernels.

    Args:
      u, delta: (b, t, d), t >= 1, each passed to the kernels in its own dtype (float32 or
        bfloat16; upcast to float32 in the kernel).
      A: (d, n); B, C: (b, t, n) (own dtype); D: (d,) or None; h0: (b, d, n).
      chunk_size: steps between the forward pass's state checkpoints, unrolled in both kernels;
        a power of two (default :data:`DEFAULT_CHUNK`; above :data:`MAX_CHUNK` taken as
        :data:`MAX_CHUNK`; cut to the power of two >= t when t is shorter).
      block_d: channels per program, a power of two (default: :data:`DEFAULT_BLOCK_D`, halved
        down to :data:`MIN_BLOCK_D` while b·d/block_d < :data:`MIN_PROGRAMS`); cut to the power
        of two >= d when d is smaller.
      keep: (b, t) float32, 0 where a document starts (its decay becomes 0), or None.

    Returns:
      ``(y, h_last)``: y (b, t, d) in u's dtype (skip term included), h_last (b, d, n) float32.
    """
    b, t, d = u.shape
    n = A.shape[1]
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK
    _common.check_tile(_OP, "chunk_size", chunk_size, dot_dim=False)
    if block_d is None:
        block_d = DEFAULT_BLOCK_D
        while block_d > MIN_BLOCK_D and b * -(-d // block_d) < MIN_PROGRAMS:
            block_d //= 2
    _common.check_tile(_OP, "block_d", block_d, dot_dim=False)
    chunk = min(chunk_size, MAX_CHUNK, _next_power_of_two(t))
    block_d = min(block_d, _next_power_of_two(d))
    n_pad = _next_power_of_two(n) - n

    def pad(x, time=False, chan=None, state=None):
        if time:
            x = _common.pad_axis(x, 1, chunk)
        if chan is not None:
            x = _common.pad_axis(x, chan, block_d)
        if state is not None and n_pad:
            x = _common.pad_axis(x, state, n + n_pad)
        return x

    D = jnp.zeros((d,), jnp.float32) if D is None else _f32(D)
    y, h_last = _scan(
        pad(u, time=True, chan=2),
        pad(delta, time=True, chan=2),
        pad(_f32(A), chan=0, state=1),
        pad(B, time=True, state=2),
        pad(C, time=True, state=2),
        pad(D, chan=0),
        pad(_f32(h0), chan=1, state=2),
        None if keep is None else _common.pad_axis(_f32(keep), 1, chunk, value=1.0),
        chunk,
        block_d,
    )
    return y[:, :t, :d], h_last[:, :d, :n]
