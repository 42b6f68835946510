"""Long convolutions along time, computed with real FFTs (the S4/SGConv convolution mode).

Shapes (see :mod:`effseq.typing`): inputs u (b, t, h); kernels k (h, l), one per channel.
A kernel longer than the sequence is cut to t; a shorter one acts as if zero-padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from effseq.ops import _checks
from effseq.ops._impl import resolve_impl
from effseq.typing import Array


@functools.cache
def next_fast_len(n: int) -> int:
    """Smallest m >= n whose only prime factors are 2, 3, 5 and 7 (fast sizes for FFT libraries)."""
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()  # the next power of two is always a candidate
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                m = p3
                while m < n:
                    m *= 2
                best = min(best, m)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def _validate(op: str, u: Array, kernels: dict[str, Array]) -> None:
    _checks.check_rank(op, "u", u, 3, "(b, t, h)")
    _checks.check_real(op, "u", u)
    dims = [("u", u, 2, "h")]
    for name, k in kernels.items():
        _checks.check_rank(op, name, k, 2, "(h, l)")
        _checks.check_real(op, name, k)
        dims.append((name, k, 0, "h"))
    _checks.check_dims(op, dims)


def _fit(k: Array, length: int) -> Array:
    """Cuts or zero-pads the kernel's last axis to ``length``."""
    l = k.shape[-1]
    if l >= length:
        return k[:, :length]
    return jnp.pad(k, ((0, 0), (0, length - l)))


def _conv_fft(u: Array, k_full: Array, n: int, t: int) -> Array:
    """Circular convolution of u (b, t, h) with k_full (h, n) at FFT size n; first t outputs.

    The FFTs run over the last axis of a (b, h, t) copy: transforms of contiguous rows were
    faster than transforms along the strided time axis on CPU, fwd+bwd at (2, t, 256), by 2x
    at t = 2048 and 12% at t = 8192, the transposes included.

    The copy is flattened to (b * h, t) rows so that every FFT, forward and backward, has a
    rank-2 operand. XLA's SPMD partitioner does not partition FFTs (openxla/xla#24): it
    all-gathers a sharded operand and runs the whole transform on every device. XLA:CPU lays an
    all-gather out with the gathered axis most major, so a (b, h, t) operand gathered along h
    reached the FFT in layout {2,0,1}, which the CPU FFT thunk rejects at run time
    (RET_CHECK IsMonotonicWithDim0Major). In rank 2 a batch or channel sharding can only be
    gathered along the leading axis, which is row-major. Unsharded, the reshape is a bitcast.
    """
    b, _, h = u.shape
    f = n // 2 + 1  # rfft bins
    rows = jnp.swapaxes(u, 1, 2).reshape(b * h, t)
    u_f = jnp.fft.rfft(rows, n=n, axis=-1).reshape(b, h, f)
    k_f = jnp.fft.rfft(k_full, n=n, axis=-1)
    y = jnp.fft.irfft((u_f * k_f[None]).reshape(b * h, f), n=n, axis=-1)[:, :t]
    return jnp.swapaxes(y.reshape(b, h, t), 1, 2)


# Kernels up to this many taps are summed as shifted copies of the input instead of an XLA
# convolution. XLA:CPU runs a depthwise (feature-grouped) convolution through a slow generic path
# once it sits inside a lax.scan, as every layer of a depth-scanned stack does: Mamba's width-4
# conv took 917 ms fwd+bwd over 4 scanned layers at (1, 1024, 256) against 51 ms for the shifted
# sum (2-core CPU, jax 0.10.2). The sum is plain float32 arithmetic on every backend.
_SHIFT_MAX_TAPS = 16


def _conv_direct(u: Array, k: Array) -> Array:
    """Depthwise causal convolution in O(t l): best for short kernels."""
    l = k.shape[-1]
    t = u.shape[1]
    if l <= _SHIFT_MAX_TAPS:
        # y[:, i] = sum_s k[:, s] * u[:, i - s]: tap s reads the input delayed by s steps.
        padded = jnp.pad(u, [(0, 0), (l - 1, 0), (0, 0)])
        y = padded[:, l - 1 : l - 1 + t] * k[:, 0]
        for s in range(1, l):
            y = y + padded[:, l - 1 - s : l - 1 - s + t] * k[:, s]
        return y
    h = u.shape[-1]
    # conv_general_dilated correlates, so flip the kernel; (l, 1, h) is WIO, one input per group.
    rhs = jnp.flip(k, -1).T[:, None, :]
    return jax.lax.conv_general_dilated(
        u,
        rhs,
        window_strides=(1,),
        padding=[(l - 1, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=h,
        precision=jax.lax.Precision.HIGHEST,
    )


def causal_conv(u: Array, k: Array, *, impl: str | None = None) -> Array:
    """Causal depthwise convolution y[b, t, h] = sum_{s <= t} k[h, s] * u[b, t - s, h].

    The convolution form of a linear time-invariant SSM (Gu et al. 2022, "Efficiently Modeling
    Long Sequences with Structured State Spaces", eq. 4-5).

    Args:
      u: (b, t, h) real input.
      k: (h, l) real kernel; cut to t or zero-padded.
      impl: ``"fft"`` (O(t log t); the default) or ``"direct"`` (O(t l): a sum of shifted
        inputs up to 16 taps, an XLA convolution beyond; better for short kernels such as
        Mamba's width-4 convolution).

    Returns:
      y (b, t, h) in u's dtype, accumulated in float32.

    Causality: ``"direct"`` is exactly causal (the gradient of y_t w.r.t. later inputs is 0).
    ``"fft"`` is causal up to float32 roundoff: an FFT spreads rounding errors over every
    position, so that gradient is a few ulps of the kernel's scale, not exactly 0.
    """
    op = "causal_conv"
    _validate(op, u, {"k": k})
    impl = resolve_impl(op, impl)
    t = u.shape[1]
    uf = u.astype(jnp.float32)
    kf = k.astype(jnp.float32)
    if impl == "direct":
        y = _conv_direct(uf, kf[:, :t])
    else:
        l = min(k.shape[-1], t)
        # Linear (not circular) convolution needs n >= t + l - 1.
        n = next_fast_len(t + l - 1)
        y = _conv_fft(uf, _fit(kf, l), n, t)
    return y.astype(u.dtype)


def causal_conv_step(window: Array, u_t: Array, k: Array) -> tuple[Array, Array]:
    """One token of :func:`causal_conv`: the recurrent form of a short causal convolution.

    Args:
      window: (b, l - 1, h) the previous l - 1 inputs, oldest first (zeros before the start).
      u_t: (b, h) the new input.
      k: (h, l) the kernel; tap s multiplies the input s steps back.

    Returns:
      (y_t (b, h) in u_t's dtype, accumulated in float32 like ``causal_conv``; the next window
      (b, l - 1, h), float32).
    """
    op = "causal_conv_step"
    _checks.check_rank(op, "window", window, 3, "(b, l - 1, h)")
    _checks.check_rank(op, "u_t", u_t, 2, "(b, h)")
    _checks.check_rank(op, "k", k, 2, "(h, l)")
    _checks.check_dims(op, [("window", window, 0, "b"), ("u_t", u_t, 0, "b")])
    _checks.check_dims(op, [("window", window, 2, "h"), ("u_t", u_t, 1, "h"), ("k", k, 0, "h")])
    if window.shape[1] != k.shape[1] - 1:
        raise ValueError(
            f"{op}: `window` holds {window.shape[1]} inputs; a kernel of {k.shape[1]} taps "
            f"needs {k.shape[1] - 1}"
        )
    full = jnp.concatenate([window.astype(jnp.float32), u_t[:, None].astype(jnp.float32)], 1)
    # full[:, j] is the input l - 1 - j steps back, so it pairs with the flipped kernel.
    y = jnp.einsum(
        "blh,hl->bh",
        full,
        jnp.flip(k.astype(jnp.float32), -1),
        precision=jax.lax.Precision.HIGHEST,
    )
    return y.astype(u_t.dtype), full[:, 1:]


def bidirectional_conv(u: Array, k_fwd: Array, k_bwd: Array, *, impl: str | None = None) -> Array:
    """Non-causal convolution: a causal kernel plus an anti-causal one.

    y[b, t, h] = sum_{s >= 0} k_fwd[h, s] * u[b, t - s, h]
               + sum_{s >= 0} k_bwd[h, s] * u[b, t + 1 + s, h]

    The backward kernel starts at lag 1 so the current token is counted once (the convention of
    bidirectional S4). One FFT of size >= 2t - 1 evaluates both halves.

    Args:
      u: (b, t, h) real input.
      k_fwd: (h, l) kernel over the past and present.
      k_bwd: (h, l) kernel over the future.
      impl: ``"fft"`` or ``"direct"``, as for :func:`causal_conv`.

    Returns:
      y (b, t, h) in u's dtype.
    """
    op = "bidirectional_conv"
    _validate(op, u, {"k_fwd": k_fwd, "k_bwd": k_bwd})
    impl = resolve_impl(op, impl)
    t = u.shape[1]
    uf = u.astype(jnp.float32)
    kf = _fit(k_fwd.astype(jnp.float32), t)
    kb = _fit(k_bwd.astype(jnp.float32), t - 1) if t > 1 else None
    if impl == "direct":
        y = _conv_direct(uf, kf)
        if kb is not None:
            # Reversing time turns the future into the past; the lag-1 start is a leading zero.
            kb_shifted = jnp.pad(kb, ((0, 0), (1, 0)))
            y = y + jnp.flip(_conv_direct(jnp.flip(uf, 1), kb_shifted), 1)
    else:
        n = next_fast_len(2 * t - 1)
        k_full = jnp.zeros((k_fwd.shape[0], n), jnp.float32).at[:, :t].set(kf)
        if kb is not None:
            # Lag -(s + 1) lives at circular index n - 1 - s.
            k_full = k_full.at[:, n - (t - 1) :].set(jnp.flip(kb, -1))
        y = _conv_fft(uf, k_full, n, t)
    return y.astype(u.dtype)


def _toeplitz(k: Array, t: int, lag_offset: int) -> Array:
    """(h, t, t) matrix T[h, i, j] = k[h, i - j - lag_offset] where in range, else 0."""
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :] - lag_offset
    valid = (lag >= 0) & (lag < k.shape[-1])
    return jnp.where(valid, k.astype(jnp.float32)[:, jnp.clip(lag, 0, k.shape[-1] - 1)], 0.0)


def causal_conv_reference(u: Array, k: Array) -> Array:
    """Slow reference for :func:`causal_conv`: the dense (t, t) Toeplitz matrix product, float32."""
    t = u.shape[1]
    return jnp.einsum("hts,bsh->bth", _toeplitz(k, t, 0), u.astype(jnp.float32))


def bidirectional_conv_reference(u: Array, k_fwd: Array, k_bwd: Array) -> Array:
    """Slow reference for :func:`bidirectional_conv`: dense Toeplitz products, float32.

    The anti-causal part is the causal one of the time-reversed input, with the kernel
    starting at lag 1.
    """
    t = u.shape[1]
    uf = u.astype(jnp.float32)
    backward = jnp.einsum("hts,bsh->bth", _toeplitz(k_bwd, t, 1), jnp.flip(uf, 1))
    return causal_conv_reference(u, k_fwd) + jnp.flip(backward, 1)
