"""Mamba's selective scan: both fast paths against the per-step float32 reference.

Magnitudes follow Mamba's initialisation so the decays exp(delta·A) span (0.2, 1): A = -exp(.) in
[-16, -0.5] and delta log-uniform in [1e-3, 0.1] (softplus of Mamba's dt init).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq import ops
from effseq.ops import _impl
from effseq.ops.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)
from tests.ops.test_packed_ops import Docs, T, check_vjp, packed_ids
from tests.tolerances import assert_close

IMPLS = ["chunked", "associative"]
DTYPES = ["float32", "bfloat16"]
NAMES = ["u", "delta", "A", "B", "C", "D", "h0"]
# Chunks of 16 split t = 37 and t = 100 into several chunks with a padded last one.
CHUNK = 16


def make_inputs(t, dtype="float32", b=2, d=6, n=4, seed=0):
    """(u, delta, A, B, C, D, h0) in ``dtype`` with Mamba-like magnitudes."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    log_uniform = lambda k, shape, lo, hi: jnp.exp(
        jax.random.uniform(k, shape, minval=np.log(lo), maxval=np.log(hi))
    )
    args = (
        jax.random.normal(ks[0], (b, t, d)),
        log_uniform(ks[1], (b, t, d), 1e-3, 0.1),
        -log_uniform(ks[2], (d, n), 0.5, 16.0),
        jax.random.normal(ks[3], (b, t, n)),
        jax.random.normal(ks[4], (b, t, n)),
        jax.random.normal(ks[5], (d,)),
        jax.random.normal(ks[6], (b, d, n)),
    )
    return tuple(x.astype(dtype) for x in args)


def positional(fn, **kwargs):
    """Wraps an op so that h0 is positional, for jax.vjp over every input."""
    return lambda u, delta, A, B, C, D, h0: fn(u, delta, A, B, C, D, h0=h0, **kwargs)


def upcast(xs):
    return tuple(x.astype(jnp.float32) for x in xs)


def outputs_and_grads(fn, args, cotangents):
    """((y, h_last), gradients w.r.t. every argument) of ``fn`` for the given cotangents."""
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangents)


@functools.cache
def reference_outputs_and_grads(t, dtype, seed):
    """The float32 reference on the (upcast) inputs of ``make_inputs``; shared by many tests."""
    args = upcast(make_inputs(t, dtype, seed=seed))
    cotangents = upcast(random_cotangents(t, dtype))
    run = jax.jit(functools.partial(outputs_and_grads, positional(selective_scan_reference)))
    return run(args, cotangents)


def random_cotangents(t, dtype, b=2, d=6, n=4):
    """Cotangents for (y, h_last): y's in ``dtype``, the state's in float32."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(99))
    return (
        jax.random.normal(k1, (b, t, d)).astype(dtype),
        jax.random.normal(k2, (b, d, n), jnp.float32),
    )


def assert_matches_reference(fast, t, dtype="float32", seed=0, jit=True):
    """Values, final state and the gradient w.r.t. every input against the f32 reference."""
    args = make_inputs(t, dtype, seed=seed)
    run = functools.partial(outputs_and_grads, fast)
    (y, h_last), grads = (jax.jit(run) if jit else run)(args, random_cotangents(t, dtype))
    (y_ref, h_ref), grads_ref = reference_outputs_and_grads(t, dtype, seed)
    assert y.dtype == jnp.dtype(dtype) and y.shape == args[0].shape
    assert h_last.dtype == jnp.float32 and h_last.shape == args[6].shape
    assert_close(y, y_ref, dtype, "value", err_msg="y")
    assert_close(h_last, h_ref, dtype, "value", err_msg="h_last")
    for name, g, g_ref, x in zip(NAMES, grads, grads_ref, args, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close(g, g_ref, dtype, "grad", err_msg=f"d{name}")


@pytest.mark.parametrize("t", [1, 37, 100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_jit(impl, dtype, t):
    assert_matches_reference(positional(selective_scan, impl=impl, chunk_size=CHUNK), t, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_eager(impl):
    fast = positional(selective_scan, impl=impl, chunk_size=CHUNK)
    assert_matches_reference(fast, 37, jit=False)


def test_chunked_with_associative_inner_scan(monkeypatch):
    # On GPU/TPU the chunked path runs its in-chunk recurrences (forward and adjoint) with the
    # associative scan; force that choice on CPU so the combination is covered here too.
    monkeypatch.setitem(_impl._DEFAULTS, jax.default_backend(), _impl._DEFAULTS["gpu"])
    assert _impl.resolve_impl("linear_scan", None) == "associative"
    assert_matches_reference(positional(selective_scan, impl="chunked", chunk_size=CHUNK), 37)


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 64])
def test_chunk_sizes(chunk_size):
    # 1: every step its own chunk; 7: a ragged last chunk; 37: exactly one chunk; 64: longer than t.
    fast = positional(selective_scan, impl="chunked", chunk_size=chunk_size)
    assert_matches_reference(fast, 37)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_skip_and_initial_state(impl):
    u, delta, A, B, C, _, _ = make_inputs(37, seed=4)
    args = (u, delta, A, B, C)
    fast = lambda *a: selective_scan(*a, impl=impl, chunk_size=CHUNK)
    (y, h_last), fast_vjp = jax.vjp(fast, *args)
    (y_ref, h_ref), ref_vjp = jax.vjp(selective_scan_reference, *args)
    assert_close(y, y_ref, err_msg="y")
    assert_close(h_last, h_ref, err_msg="h_last")
    cts = random_cotangents(37, "float32")
    for name, g, g_ref in zip(NAMES[:5], fast_vjp(cts), ref_vjp(cts), strict=True):
        assert_close(g, g_ref, kind="grad", err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_matches_parallel(dtype):
    u, delta, A, B, C, D, h0 = make_inputs(37, dtype, seed=5)
    y, h_last = selective_scan(u, delta, A, B, C, D, h0=h0, chunk_size=CHUNK)
    step = jax.jit(selective_scan_step)
    h = h0.astype(jnp.float32)
    ys = []
    for i in range(u.shape[1]):
        h, y_t = step(h, u[:, i], delta[:, i], A, B[:, i], C[:, i], D)
        assert h.dtype == jnp.float32 and y_t.dtype == jnp.dtype(dtype)
        ys.append(y_t)
    assert_close(jnp.stack(ys, axis=1), y, dtype, err_msg="y")
    assert_close(h, h_last, dtype, err_msg="h_last")


def test_step_without_skip():
    u, delta, A, B, C, _, h0 = make_inputs(1, seed=6)
    h, y_t = selective_scan_step(h0, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0])
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, h0=h0)
    assert_close(y_t, y_ref[:, 0])
    assert_close(h, h_ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_split_sequence_with_carried_state(impl):
    # 20 is not a multiple of the chunk, so the second call starts mid-way through a chunk.
    u, delta, A, B, C, D, h0 = make_inputs(37, seed=7)
    f = jax.jit(functools.partial(selective_scan, D=D, impl=impl, chunk_size=CHUNK))
    y, h_last = f(u, delta, A, B, C, h0=h0)
    y1, h1 = f(u[:, :20], delta[:, :20], A, B[:, :20], C[:, :20], h0=h0)
    y2, h2 = f(u[:, 20:], delta[:, 20:], A, B[:, 20:], C[:, 20:], h0=h1)
    assert_close(jnp.concatenate([y1, y2], axis=1), y, err_msg="y")
    assert_close(h2, h_last, err_msg="h_last")


@pytest.mark.parametrize("impl", IMPLS)
def test_causal(impl):
    # Position 20 sits inside the second chunk of 16: later steps of the same chunk and the
    # whole third chunk must not reach it.
    u, delta, A, B, C, D, h0 = make_inputs(37, seed=8)
    t0 = 20

    def y_at_t0(u, delta, B, C):
        y, _ = selective_scan(u, delta, A, B, C, D, h0=h0, impl=impl, chunk_size=CHUNK)
        return jnp.sum(y[:, t0])

    grads = jax.grad(y_at_t0, argnums=(0, 1, 2, 3))(u, delta, B, C)
    for name, g in zip(["u", "delta", "B", "C"], grads, strict=True):
        assert np.all(np.asarray(g[:, t0 + 1 :]) == 0), name
        assert np.any(np.asarray(g[:, : t0 + 1]) != 0), name


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequence(impl):
    u, delta, A, B, C, D, h0 = make_inputs(0, "bfloat16")
    y, h_last = selective_scan(u, delta, A, B, C, D, h0=h0, impl=impl)
    assert y.shape == (2, 0, 6) and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(h_last, h0.astype(jnp.float32))


def _bad_inputs():
    """(description, positional args, keyword args, error pattern) for selective_scan."""
    u, delta, A, B, C, D, h0 = make_inputs(5)
    cases = [
        ("u rank", (u[0], delta, A, B, C), {}, r"`u` must have rank 3 \(b, t, d\)"),
        ("A rank", (u, delta, A[0], B, C), {}, r"`A` must have rank 2 \(d, n\)"),
        ("D rank", (u, delta, A, B, C, D[:, None]), {}, r"`D` must have rank 1"),
        ("h0 rank", (u, delta, A, B, C), {"h0": h0[0]}, r"`h0` must have rank 3"),
        ("t of B", (u, delta, A, B[:, :4], C), {}, r"dimension 't'.*`B` \(2, 4, 4\)"),
        ("b of delta", (u, delta[:1], A, B, C), {}, r"dimension 'b'.*`delta` \(1, 5, 6\)"),
        ("d of A", (u, delta, A[:5], B, C), {}, r"dimension 'd'.*`A` \(5, 4\)"),
        ("d of D", (u, delta, A, B, C, D[:5]), {}, r"dimension 'd'.*`D` \(5,\)"),
        ("n of C", (u, delta, A, B, C[..., :3]), {}, r"dimension 'n'.*`C` \(2, 5, 3\)"),
        ("n of h0", (u, delta, A, B, C), {"h0": h0[..., :3]}, r"dimension 'n'.*`h0`"),
        ("complex A", (u, delta, A.astype(jnp.complex64), B, C), {}, r"`A` must be real"),
        ("integer u", (u.astype(jnp.int32), delta, A, B, C), {}, r"`u` must be a floating"),
        ("chunk 0", (u, delta, A, B, C), {"chunk_size": 0}, r"`chunk_size` must be a positive"),
        ("chunk 2.5", (u, delta, A, B, C), {"chunk_size": 2.5}, r"`chunk_size` must be"),
        ("chunk True", (u, delta, A, B, C), {"chunk_size": True}, r"`chunk_size` must be"),
        ("impl", (u, delta, A, B, C), {"impl": "fft"}, r"unknown impl='fft'"),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("args, kwargs, match", _bad_inputs())
def test_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(*args, **kwargs)


def test_reference_and_step_validate():
    u, delta, A, B, C, D, h0 = make_inputs(5)
    with pytest.raises(ValueError, match=r"selective_scan_reference: dimension 'n'"):
        selective_scan_reference(u, delta, A, B, C[..., :3])
    with pytest.raises(ValueError, match=r"selective_scan_step: `u_t` must have rank 2"):
        selective_scan_step(h0, u, delta[:, 0], A, B[:, 0], C[:, 0])
    with pytest.raises(ValueError, match=r"selective_scan_step: dimension 'd'.*`D` \(5,\)"):
        selective_scan_step(h0, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D[:5])
    with pytest.raises(ValueError, match=r"selective_scan_step: `C_t` must be real"):
        selective_scan_step(h0, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0].astype(jnp.complex64))


@pytest.mark.parametrize(
    "bdn,want",
    [
        ((32, 80, 16), 16),  # 2**19 / 40960 = 12.8: nearest power of two 16
        ((8, 512, 16), 8),
        ((2, 512, 16), 32),
        ((1, 256, 16), 64),  # 128, clipped to 64
        ((64, 1024, 16), 8),  # 0.5, clipped to 8
    ],
)
def test_default_chunk_size_on_cpu(bdn, want):
    from effseq.ops.selective_scan import default_chunk_size

    assert jax.default_backend() == "cpu"
    assert default_chunk_size(*bdn) == want


def test_default_chunk_matches_reference():
    # chunk_size=None at a (b, d, n) whose default chunk (8) splits t = 37 into five chunks, the
    # last one padded; values, final state and every gradient against the reference.
    from effseq.ops.selective_scan import default_chunk_size

    shape = dict(b=16, d=512, n=8)
    assert default_chunk_size(16, 512, 8) == 8
    args = make_inputs(37, **shape, seed=3)
    cotangents = random_cotangents(37, "float32", **shape)
    fast = jax.jit(functools.partial(outputs_and_grads, positional(selective_scan)))
    ref = jax.jit(functools.partial(outputs_and_grads, positional(selective_scan_reference)))
    (y, h), grads = fast(args, cotangents)
    (y_ref, h_ref), grads_ref = ref(args, cotangents)
    assert_close(y, y_ref, err_msg="y")
    assert_close(h, h_ref, err_msg="h_last")
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(g, g_ref, kind="grad", err_msg=f"d{name}")


# ---------------------------------------------------------------- packed rows: selective_scan


def _ss_inputs(t=T, b=2, d=5, n=4):
    k = jax.random.split(jax.random.key(1), 8)
    u = jax.random.normal(k[0], (b, t, d))
    delta = jax.nn.softplus(jax.random.normal(k[1], (b, t, d)))
    A = -jnp.exp(jax.random.normal(k[2], (d, n)) * 0.5)
    B = jax.random.normal(k[3], (b, t, n))
    C = jax.random.normal(k[4], (b, t, n))
    D = jax.random.normal(k[5], (d,))
    h0 = jax.random.normal(k[6], (b, d, n))
    return u, delta, A, B, C, D, h0


SS_NAMES = ["u", "delta", "A", "B", "C", "D", "h0"]


@pytest.mark.parametrize("impl,chunk", [("chunked", 8), ("chunked", 16), ("associative", None)])
def test_selective_scan_packed_equals_documents_alone(impl, chunk):
    seg = packed_ids()

    def packed(u, delta, A, B, C, D, h0):
        return ops.selective_scan(
            u, delta, A, B, C, D, h0=h0, impl=impl, chunk_size=chunk, segment_ids=seg
        )

    docs = Docs()

    def alone(u, delta, A, B, C, D, h0):
        # Padding delta = 0 (decay 1, no input) carries each document's last state to the end.
        y, last = ops.selective_scan(
            *(docs.rows(x) for x in (u, delta)),
            A,
            *(docs.rows(x) for x in (B, C)),
            D,
            h0=docs.h0(h0),
            impl=impl,
            chunk_size=chunk,
        )
        return docs.packed(y), docs.state(last)

    check_vjp(packed, alone, _ss_inputs(), SS_NAMES)


def test_selective_scan_packed_matches_reference():
    seg = packed_ids()
    args = _ss_inputs()

    def fast(u, delta, A, B, C, D, h0):
        return ops.selective_scan(u, delta, A, B, C, D, h0=h0, chunk_size=8, segment_ids=seg)

    def ref(u, delta, A, B, C, D, h0):
        return ops.selective_scan_reference(u, delta, A, B, C, D, h0=h0, segment_ids=seg)

    check_vjp(fast, ref, args, SS_NAMES)


def test_selective_scan_rejects_bad_segment_ids():
    u, delta, A, B, C, D, h0 = _ss_inputs()
    for fn in (ops.selective_scan, ops.selective_scan_reference):
        with pytest.raises(ValueError, match="segment_ids"):
            fn(u, delta, A, B, C, D, segment_ids=packed_ids()[:1])
