"""Mamba-2's state space duality (SSD): a selective SSM with one scalar decay per head.

Dao & Gu (2024), "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (arXiv:2405.21060). Per head, with a state H_t of shape (p, n)
(row-vector convention, as the official ``mamba_ssm`` code lays it out):

    H_t = exp(dt_t * A) H_{t-1} + dt_t x_t^T B_t
    y_t = H_t C_t + D x_t

the selective SSM (their eq. 2) with A_t = exp(dt_t A) a scalar times the identity, the case
that makes the SSM dual to a masked attention, discretised as in ``mamba_ssm``.

Unrolled (the matrix form of Sec. 3), y = (L ∘ C B^T)(dt x) + D x: a causal "attention" whose
mask is the 1-semiseparable matrix L[t, s] = exp(dt_{s+1} A + ... + dt_t A) for s <= t, else 0.

Shapes use the legend of :mod:`effseq.typing`, plus two letters of the Mamba-2 paper: p is the
head dimension (the width of each head's input) and g the number of B/C groups, which must
divide h; head i reads group i // (h // g) (the grouped head pattern of Sec. 7.2, as in
``mamba_ssm``'s ``ngroups``).
x (b, t, h, p); dt (b, t, h) > 0 (softplus and bias already applied); A (h,) < 0; B, C
(b, t, g, n); D (h,); states (b, h, p, n).

Forms of the same maths:

* :func:`ssd_reference`: a plain ``lax.scan`` over time; the ground truth.
* :func:`ssd_step`: one token, for decoding.
* ``impl="recurrent"``: the step scanned token by token, rematerialised per segment.
* ``impl="chunked"`` (default): the SSD algorithm of Sec. 6 / Listing 1. Inside a chunk of c
  steps the quadratic form (L ∘ C B^T)(dt x), with L built from the segment sums of
  ``dt * A`` (each one a sum of exactly the steps it spans, never a difference of running sums,
  so every exponent is <= 0 and decays of exp(-20) per step neither overflow nor cancel); each
  chunk's contribution to the state; the states passed chunk to chunk by a linear scan; and each
  chunk's read of the state entering it. Differentiated by plain autodiff.
* ``impl="pallas"``: the same chunked maths as Pallas kernels, forward and backward
  (:mod:`effseq.ops.pallas.ssd`: Triton on NVIDIA GPUs, interpret mode on a CPU, where it is
  only for checking). Unpacked rows only (``segment_ids`` raise); chunk_size a power of two
  >= 16.

Packed sequences (``segment_ids``, the convention of :mod:`effseq.ops.segments`): at a document
start the state is zeroed before the step's own update. The reference and the recurrent form
reset inside their scans; the chunked form stays chunked, multiplying every decay from s to t
(L, the decays from the chunk start, to the chunk end and across the chunk) by "no start in
(s, t]" (:func:`effseq.ops.segments.chunk_masks`). Cost, fwd+bwd at b = 2, t = 4096, h = 4,
p = n = 64, g = 1, chunk 64, on a 2-core CPU shared with other jobs (medians of 5, two runs):
505 / 388 ms without ids, 464 / 380 ms with 8 random documents per row, the same within the
noise.

Everything runs in float32 whatever the input dtype (except that the Pallas kernel feeds
bfloat16 x, B and C to its matrix products as they are, accumulating in float32); y is cast
back to the dtype of x and states are returned in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effseq.ops import _checks, sequence
from effseq.ops._chunking import (
    float_chunk_masks,
    packed_starts,
    reset_at_start,
    segmented_scan,
)
from effseq.ops._impl import resolve_impl
from effseq.ops.scan import linear_scan_time_major
from effseq.typing import Array

__all__ = ["ssd", "ssd_reference", "ssd_step"]


def _check_sign(op: str, name: str, x, *, negative: bool) -> None:
    """Raises if a concrete ``x`` has the wrong sign; traced values cannot be inspected.

    Zero is allowed either way: dt = 0 is an identity step (used for padding) and A = 0 a head
    without decay.
    """
    try:
        values = np.asarray(x, np.float32)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if not values.size:
        return
    bad = np.nanmax(values) > 0 if negative else np.nanmin(values) < 0
    if bad:
        want, got = ("<= 0", np.nanmax(values)) if negative else (">= 0", np.nanmin(values))
        raise ValueError(f"{op}: `{name}` must be {want}, got {float(got):.4g} in {x.shape}")


def _check_groups(op: str, h: int, g: int, names: str) -> None:
    if h % g:
        raise ValueError(
            f"{op}: the number of groups g = {g} of {names} must divide the number of heads h = {h}"
        )


def _validate(op, x, dt, A, B, C, D, h0) -> None:
    named = [
        ("x", x, 4, "(b, t, h, p)"),
        ("dt", dt, 3, "(b, t, h)"),
        ("A", A, 1, "(h,)"),
        ("B", B, 4, "(b, t, g, n)"),
        ("C", C, 4, "(b, t, g, n)"),
    ]
    if D is not None:
        named.append(("D", D, 1, "(h,)"))
    if h0 is not None:
        named.append(("h0", h0, 4, "(b, h, p, n)"))
    for name, arr, rank, layout in named:
        _checks.check_rank(op, name, arr, rank, layout)
        _checks.check_real(op, name, arr)
    dims = [
        (name, arr, axis, letter)
        for name, arr in (("x", x), ("dt", dt))
        for axis, letter in enumerate("bth")
    ]
    dims += [
        (name, arr, axis, letter)
        for name, arr in (("B", B), ("C", C))
        for axis, letter in enumerate("btgn")
    ]
    dims.append(("A", A, 0, "h"))
    if D is not None:
        dims.append(("D", D, 0, "h"))
    dims.append(("x", x, 3, "p"))
    if h0 is not None:
        dims += [("h0", h0, axis, letter) for axis, letter in enumerate("bhpn")]
    _checks.check_dims(op, dims)
    _check_groups(op, x.shape[2], B.shape[2], "`B` and `C`")
    _check_sign(op, "dt", dt, negative=False)
    _check_sign(op, "A", A, negative=True)


def _step(H, x_t, dt_t, A, B_t, C_t, D):
    """Unchecked float32 step. H (b, h, p, n); x_t (b, h, p); dt_t (b, h); B_t, C_t (b, g, n)
    with g dividing h; D (h,) or None. Returns (H, y_t)."""
    r = x_t.shape[1] // B_t.shape[1]
    B_t, C_t = (jnp.repeat(z, r, axis=1) for z in (B_t, C_t))  # (b, h, n): head i, group i // r
    decay = jnp.exp(dt_t * A)[..., None, None]
    H = decay * H + (dt_t[..., None] * x_t)[..., :, None] * B_t[..., None, :]
    y_t = jnp.einsum("bhpn,bhn->bhp", H, C_t)
    if D is not None:
        y_t = y_t + D[:, None] * x_t
    return H, y_t


def ssd_step(
    h: Array, x_t: Array, dt_t: Array, A: Array, B_t: Array, C_t: Array, D: Array | None = None
) -> tuple[Array, Array]:
    """One token of SSD (Dao & Gu 2024): H = exp(dt A) H + dt x^T B, then y = H C + D x.

    Args:
      h: (b, h, p, n) state before the token.
      x_t: (b, h, p) per-head input.
      dt_t: (b, h) step sizes, >= 0.
      A: (h,) decay rates, <= 0.
      B_t, C_t: (b, g, n) input and output projections; g divides h, head i uses group
        i // (h // g).
      D: (h,) skip weights, or None.

    Returns:
      ``(h, y_t)``: the new state (b, h, p, n) in float32 and y_t (b, h, p) in the dtype of
      ``x_t``.
    """
    op = "ssd_step"
    named = [
        ("h", h, 4, "(b, h, p, n)"),
        ("x_t", x_t, 3, "(b, h, p)"),
        ("dt_t", dt_t, 2, "(b, h)"),
        ("A", A, 1, "(h,)"),
        ("B_t", B_t, 3, "(b, g, n)"),
        ("C_t", C_t, 3, "(b, g, n)"),
    ]
    if D is not None:
        named.append(("D", D, 1, "(h,)"))
    for name, arr, rank, layout in named:
        _checks.check_rank(op, name, arr, rank, layout)
        _checks.check_real(op, name, arr)
    dims = [("h", h, axis, letter) for axis, letter in enumerate("bhpn")]
    dims += [("x_t", x_t, axis, letter) for axis, letter in enumerate("bhp")]
    dims += [("dt_t", dt_t, 0, "b"), ("dt_t", dt_t, 1, "h"), ("A", A, 0, "h")]
    dims += [
        (name, arr, axis, letter)
        for name, arr in (("B_t", B_t), ("C_t", C_t))
        for axis, letter in enumerate("bgn")
    ]
    if D is not None:
        dims.append(("D", D, 0, "h"))
    _checks.check_dims(op, dims)
    _check_groups(op, x_t.shape[1], B_t.shape[1], "`B_t` and `C_t`")
    _check_sign(op, "dt_t", dt_t, negative=False)
    _check_sign(op, "A", A, negative=True)
    f32 = jnp.float32
    args = (h, x_t, dt_t, A, B_t, C_t)
    H, y_t = _step(*(z.astype(f32) for z in args), None if D is None else D.astype(f32))
    return H, y_t.astype(x_t.dtype)


def ssd(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    *,
    h0: Array | None = None,
    chunk_size: int = 64,
    impl: str | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Mamba-2's SSD over a sequence (Dao & Gu 2024, eq. 2 with scalar A; chunked form Sec. 6).

    H_t = exp(dt_t A) H_{t-1} + dt_t x_t^T B_t and y_t = H_t C_t + D x_t, per head, H_0 = h0.

    Args:
      x: (b, t, h, p) per-head inputs (p is the head dimension).
      dt: (b, t, h) step sizes, >= 0 (the caller applies softplus and the bias).
      A: (h,) decay rates, <= 0 (negative reals).
      B, C: (b, t, g, n) input and output projections; the g groups divide h, and head i uses
        group i // (h // g).
      D: (h,) skip weights, or None for no skip term.
      h0: (b, h, p, n) initial state, or None for zeros.
      chunk_size: chunk length c of the chunked form; t is padded to a multiple of c with
        dt = 0 steps (identities), and a sequence shorter than c runs as one chunk of length
        t. Ignored by ``"recurrent"``.
      impl: ``"chunked"``, ``"recurrent"`` or ``"pallas"`` (no ``segment_ids``; chunk_size a
        power of two >= 16); None picks the default (see ``ops._impl``).
      segment_ids: (b, t) integer document ids of packed rows (:mod:`effseq.ops.segments`): the
        state is zeroed where a new document starts; ``h0`` belongs to each row's first
        document and ``h_last`` is its last one's. None: one document per row.

    Sequence parallelism: under a mesh whose ``sequence`` axis splits t (it must divide), each
    shard runs its slice from a zero state, the shards all-gather their final states and
    per-head decays exp(A * sum of dt) (:func:`effseq.ops.sequence.carry`), and each runs its
    slice again from the state entering it: two local passes (the first's outputs are dropped)
    and one all-gather of (b, h) + (b, h, p, n) per shard.

    Returns:
      ``(y, h_last)``: y (b, t, h, p) in the dtype of ``x``; the final state (b, h, p, n) in
      float32.
    """
    op = "ssd"
    impl = resolve_impl(op, impl)
    _validate(op, x, dt, A, B, C, D, h0)
    chunk_size = _checks.check_positive_int(op, "chunk_size", chunk_size)
    f32 = jnp.float32
    b, t, h, p = x.shape
    n = B.shape[-1]
    starts = packed_starts(op, segment_ids, b, t)
    if impl == "pallas" and segment_ids is not None:
        raise ValueError(
            f"{op}: impl='pallas' does not support packed rows (segment_ids); use "
            "impl='chunked' or impl='recurrent', which do"
        )
    h0 = jnp.zeros((b, h, p, n), f32) if h0 is None else h0.astype(f32)
    if t == 0:
        return jnp.zeros((b, 0, h, p), x.dtype), h0
    shards = sequence.shards()
    if shards > 1:
        sequence.check_length(op, t, shards)
        return _sharded(x, dt, A, B, C, D, h0, chunk_size, impl, segment_ids)
    if impl == "pallas":
        from effseq.ops.pallas._common import per_device
        from effseq.ops.pallas.ssd import ssd_pallas

        def kernel(x, dt, A, B, C, D, h0):
            return ssd_pallas(x, dt, A, B, C, D, h0, chunk_size=chunk_size)

        # Rows over data x fsdp, heads (and B/C groups where they divide) over tensor.
        return per_device(
            kernel,
            (x, dt, A, B, C, D, h0),
            (0, 0, None, 0, 0, None, 0),
            (2, 2, 0, 2, 2, 0, 1),
            (0, 0),
            (2, 1),
        )
    args = tuple(z.astype(f32) for z in (x, dt, A, B, C))
    D = None if D is None else D.astype(f32)
    if impl == "recurrent":
        y, H = _recurrent(*args, D, h0, starts=starts)
    else:
        y, H = _chunked(*args, D, h0, chunk_size=chunk_size, starts=starts)
    return y.astype(x.dtype), H


def _sharded(x, dt, A, B, C, D, h0, chunk_size, impl, segment_ids):
    """:func:`ssd` with time split over the sequence axis (:mod:`effseq.ops.sequence`): each
    shard's slice from a zero state, summarised by its per-head decay exp(A * sum of dt),
    folded across shards, then run again from the state entering it."""

    def local(x, dt, A, B, C, D, h0, seg):
        def run(H):
            return ssd(x, dt, A, B, C, D, h0=H, chunk_size=chunk_size, impl=impl, segment_ids=seg)

        _, from_zero = run(jnp.zeros_like(h0))
        edge = sequence.boundary_cut(seg)
        # A document starting in the slice (or on its first step) drops whatever came in.
        log_decay = jnp.sum(dt.astype(jnp.float32) * A.astype(jnp.float32), axis=1)
        decay = sequence.cut(sequence.cut(jnp.exp(log_decay), edge), sequence.any_start(seg))
        incoming, last = sequence.carry(decay, from_zero, h0, apply=_decay_heads)
        y, _ = run(sequence.cut(incoming, edge))
        return y, last

    time, whole = sequence.TIME, sequence.WHOLE
    specs = (time, time, whole, time, time, whole, whole, time)
    return sequence.run(local, specs, (time, whole))(x, dt, A, B, C, D, h0, segment_ids)


def _decay_heads(decay: Array, H: Array) -> Array:
    """decay (b, h) times each head's state H (b, h, p, n)."""
    return decay[..., None, None] * H


def _recurrent(x, dt, A, B, C, D, h0, *, starts=None):
    """The step form scanned token by token (segmented and rematerialised,
    :func:`effseq.ops._chunking.segmented_scan`; padding is dt = 0); float32 inputs.
    ``starts`` (b, t) bool: zero the state before the step where a document starts."""
    if starts is None:
        step = lambda H, z: _step(H, z[0], z[1], A, z[2], z[3], D)  # noqa: E731
        return segmented_scan(step, h0, (x, dt, B, C))
    step = lambda H, z: _step(reset_at_start(H, z[4]), z[0], z[1], A, z[2], z[3], D)  # noqa: E731
    return segmented_scan(step, h0, (x, dt, B, C, starts))


def _segsum(a: Array) -> Array:
    """Segment sums of log decays a (..., c): out[..., i, j] = a_{j+1} + ... + a_i for j <= i
    (0 on the diagonal) and -inf for j > i.

    Each entry is a cumulative sum of exactly the terms it spans (the masked cumsum of the
    paper's Listing 1), not cumsum_i - cumsum_j: with dt A = -20 per step those running sums
    reach -1280 in a chunk of 64, where a float32 ulp is 1e-4, and their difference would put
    an error of that size into decays near 1 that follow strong ones.
    """
    c = a.shape[-1]
    strict = np.tril(np.ones((c, c), bool), -1)  # [i, j] = j < i
    terms = jnp.where(strict, a[..., :, None], 0.0)  # [i, j] = a_i if j < i
    sums = jnp.cumsum(terms, axis=-2)
    return jnp.where(np.tril(np.ones((c, c), bool)), sums, -jnp.inf)


def _chunked(x, dt, A, B, C, D, h0, *, chunk_size: int, starts=None):
    """SSD's chunked matmul form (Dao & Gu 2024, Sec. 6 and Listing 1); float32 inputs.

    Heads are split as (g, r) with r = h // g, so that head g * r + j reads group g and the
    C B^T scores are computed once per group. ``starts`` (b, t) bool: document starts of packed
    rows, or None.
    """
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    c = min(chunk_size, t)
    nc = -(-t // c)
    pad = nc * c - t

    def chunks(z):  # (b, t, ...) -> (b, nc, c, ...); zero padding is dt = 0, an identity step
        z = jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2))
        return z.reshape(b, nc, c, *z.shape[2:])

    a = chunks(dt * A).reshape(b, nc, c, g, r)  # log decay per step, <= 0
    u = chunks(x * dt[..., None]).reshape(b, nc, c, g, r, p)  # dt_t x_t
    Bc, Cc = chunks(B), chunks(C)  # (b, nc, c, g, n)

    a = jnp.moveaxis(a, 2, -1)  # (b, nc, g, r, c)
    seg = _segsum(a)  # (b, nc, g, r, c, c): log decay s -> t inside the chunk
    from_start = jnp.exp(jnp.cumsum(a, axis=-1))  # chunk start -> t, inclusive of t's step
    to_end = jnp.exp(seg[..., -1, :])  # s -> chunk end, exclusive of s's own step
    chunk_decay = jnp.exp(jnp.sum(a, axis=-1))  # (b, nc, g, r)
    if starts is not None:
        # Exact resets inside chunks: each decay s -> t times "no start in (s, t]" (constants).
        intra, carry_in, to_end_mask, carry_through = (
            jnp.moveaxis(m, 0, 1)[:, :, :, None] for m in float_chunk_masks(starts, nc, c)
        )  # (b, nc, 1, 1, ...)
        from_start = from_start * carry_in
        to_end = to_end * to_end_mask
        chunk_decay = chunk_decay * carry_through

    # Intra-chunk: the quadratic (attention-like) form, y_t = sum_{s <= t} L[t, s] C_t.B_s u_s.
    scores = jnp.einsum("bkign,bkjgn->bkgij", Cc, Bc)  # (b, nc, g, c, c)
    if starts is None:
        weights = scores[:, :, :, None] * jnp.exp(seg)
    else:
        weights = scores[:, :, :, None] * (jnp.exp(seg) * intra)
    y = jnp.einsum("bkgrij,bkjgrp->bkigrp", weights, u)

    # Each chunk's own contribution to the state at its end, then the states passed chunk to
    # chunk: H_in[k + 1] = chunk_decay[k] H_in[k] + dH[k], from H_in[0] = h0.
    dH = jnp.einsum("bkjgn,bkgrj,bkjgrp->kbgrpn", Bc, to_end, u)
    decay = jnp.moveaxis(chunk_decay, 1, 0)[..., None, None]  # (nc, b, g, r, 1, 1)
    H0 = h0.reshape(b, g, r, p, n)
    H_out = linear_scan_time_major(decay, dH, H0, resolve_impl("linear_scan", None))
    H_in = jnp.concatenate([H0[None], H_out[:-1]], axis=0)  # (nc, b, g, r, p, n)

    # Inter-chunk: each step reads the state entering its chunk, decayed from the chunk start.
    y = y + jnp.einsum("bkign,kbgrpn,bkgri->bkigrp", Cc, H_in, from_start)
    y = y.reshape(b, nc * c, h, p)[:, :t]
    if D is not None:
        y = y + D[:, None] * x
    return y, H_out[-1].reshape(b, h, p, n)


def ssd_reference(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    *,
    h0: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Slow reference for :func:`ssd`: the recurrence step by step in float32 (``lax.scan``),
    the state zeroed before the step where a document of ``segment_ids`` starts.

    Each head's B_t and C_t are its group's, copied out explicitly. Shapes as in :func:`ssd`.
    Returns ``(y, h_last)``: y (b, t, h, p) in the dtype of ``x``, h_last (b, h, p, n) float32.
    """
    op = "ssd_reference"
    _validate(op, x, dt, A, B, C, D, h0)
    f32 = jnp.float32
    b, t, h, p = x.shape
    n = B.shape[-1]
    starts = packed_starts(op, segment_ids, b, t)
    group = np.arange(h) // (h // B.shape[2])  # head i -> its group
    Bh, Ch = B.astype(f32)[:, :, group], C.astype(f32)[:, :, group]  # (b, t, h, n)
    A32 = A.astype(f32)
    D32 = jnp.zeros((h,), f32) if D is None else D.astype(f32)
    H = jnp.zeros((b, h, p, n), f32) if h0 is None else h0.astype(f32)

    def body(H, z):
        x_t, dt_t, B_t, C_t, *start_t = z  # (b, h, p), (b, h), (b, h, n), (b, h, n), [(b,)]
        if start_t:
            H = jnp.where(start_t[0][:, None, None, None], 0.0, H)
        H = jnp.exp(dt_t * A32)[..., None, None] * H + jnp.einsum(
            "bh,bhp,bhn->bhpn", dt_t, x_t, B_t
        )
        y_t = jnp.einsum("bhpn,bhn->bhp", H, C_t) + D32[:, None] * x_t
        return H, y_t

    zs = tuple(jnp.moveaxis(z, 1, 0) for z in (x.astype(f32), dt.astype(f32), Bh, Ch))
    if starts is not None:
        zs = (*zs, jnp.moveaxis(starts, 1, 0))
    H, y = jax.lax.scan(body, H, zs)
    return jnp.moveaxis(y, 0, 1).astype(x.dtype), H
