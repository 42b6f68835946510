"""Packed sequences (``segment_ids``) in the ops: a packed row equals each of its documents run
alone (values, final states, gradients of every input incl. h0), the fast paths equal their
references with ``segment_ids``, and bad ids raise. Documents start inside chunks/blocks, on
their boundaries, are one token long, and t is not a multiple of the chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq import ops
from effseq.ops import segments
from tests.ops.compare import random_cotangent
from tests.tolerances import assert_close

T = 37
# Per row: the first position of every document. Row 0: starts inside chunks of 8, on a
# chunk boundary (16), length-1 documents (5, 16); row 1: an id reused by a later document.
STARTS = ([0, 5, 6, 16, 17, 30], [0, 8, 9, 24])


def packed_ids(t=T, starts=STARTS):
    rows = []
    for row in starts:
        ids = np.zeros(t, np.int32)
        for k, s in enumerate(row):
            ids[s:] = 1 + (k % 2)  # ids alternate 1, 2, 1, ...: only neighbours matter
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def bounds(starts, t):
    return [list(zip(row, [*row[1:], t], strict=True)) for row in starts]


class Docs:
    """Every document of packed rows moved to the front of a row of its own (zero-padded to
    t), so "each document alone" is one batched call of the unpacked op (one compile).
    ``starts`` as :data:`STARTS`."""

    def __init__(self, t=T, starts=STARTS):
        self.t = t
        docs = [(r, s, e) for r, row in enumerate(bounds(starts, t)) for s, e in row]
        j = np.arange(t)
        self.row = np.array([r for r, _, _ in docs])[:, None].repeat(t, 1)  # (ndocs, t)
        src = np.array([s for _, s, _ in docs])[:, None] + j
        self.valid = j[None, :] < np.array([e - s for _, s, e in docs])[:, None]
        self.src = np.where(self.valid, src, 0)
        self.first = np.array([s == 0 for _, s, _ in docs])
        self.last = [max(k for k, d in enumerate(docs) if d[0] == r) for r in range(len(starts))]
        # Back: packed (r, p) <- (doc k, offset p - s).
        self.back_doc = np.zeros((len(starts), t), int)
        self.back_off = np.zeros((len(starts), t), int)
        for k, (r, s, e) in enumerate(docs):
            self.back_doc[r, s:e] = k
            self.back_off[r, s:e] = np.arange(e - s)

    def rows(self, x, pad=0.0):
        """(b, t, ...) -> (ndocs, t, ...), each document at the front, ``pad`` after it."""
        y = x[self.row, self.src]
        mask = self.valid.reshape(self.valid.shape + (1,) * (x.ndim - 2))
        return jnp.where(mask, y, jnp.asarray(pad, x.dtype))

    def h0(self, h0):
        """Row r's h0 for its first document, zeros for the others."""
        y = h0[self.row[:, 0]]
        mask = self.first.reshape((-1,) + (1,) * (h0.ndim - 1))
        return jnp.where(mask, y, jnp.zeros((), h0.dtype))

    def packed(self, y):
        """(ndocs, t, ...) -> (b, t, ...): every document's outputs back in its place."""
        return y[self.back_doc, self.back_off]

    def state(self, states):
        """(ndocs, ...) final states -> (b, ...): each row's last document's."""
        return states[np.array(self.last)]


def check_vjp(packed, alone, args, names):
    """Values and the gradients of every argument agree (float32 tolerances)."""
    out_p, vjp_p = jax.vjp(jax.jit(packed), *args)
    out_a, vjp_a = jax.vjp(jax.jit(alone), *args)
    jax.tree.map(lambda a, b: assert_close(a, b, err_msg="output"), out_p, out_a)
    ct = random_cotangent(jax.random.key(3), out_a)
    for name, gp, ga in zip(names, vjp_p(ct), vjp_a(ct), strict=True):
        assert np.all(np.isfinite(np.asarray(gp))), f"non-finite gradient w.r.t. {name}"
        assert_close(gp, ga, kind="grad", err_msg=f"gradient w.r.t. {name}")


# ---------------------------------------------------------------- linear_scan


def _scan_inputs(t=T, complex_=False):
    k = jax.random.split(jax.random.key(0), 4)
    a = jax.random.uniform(k[0], (2, t, 3), minval=0.5, maxval=1.0)
    b = jax.random.normal(k[1], (2, t, 3))
    h0 = jax.random.normal(k[2], (2, 3))
    if complex_:
        a = a * jnp.exp(1j * jax.random.uniform(k[3], a.shape, maxval=3.0))
        b = b + 1j * b[::-1]
        h0 = h0 + 0.5j
    return a, b, h0


@pytest.mark.parametrize("impl", ["sequential", "associative"])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_packed_equals_documents_alone(impl, reverse):
    a, b, h0 = _scan_inputs()
    seg = packed_ids()
    packed = jax.jit(
        lambda a, b, h0: ops.linear_scan(a, b, h0, reverse=reverse, impl=impl, segment_ids=seg)
    )

    # Backwards in time h0 feeds each row's last document and the final state is the first
    # document's: the flipped rows run forwards.
    flip = (lambda x: jnp.flip(x, 1)) if reverse else (lambda x: x)
    starts = [sorted(T - e for _, e in row) for row in bounds(STARTS, T)] if reverse else STARTS
    docs = Docs(starts=starts)

    def alone(a, b, h0):
        # Padding a = 1, b = 0 carries each document's last state to the end of its row.
        h, last = ops.linear_scan(
            docs.rows(flip(a), 1.0), docs.rows(flip(b)), docs.h0(h0), impl=impl
        )
        return flip(docs.packed(h)), docs.state(last)

    check_vjp(packed, alone, (a, b, h0), ["a", "b", "h0"])


@pytest.mark.parametrize("impl", ["sequential", "associative"])
def test_linear_scan_packed_matches_reference_complex(impl):
    a, b, h0 = _scan_inputs(complex_=True)
    seg = packed_ids()
    h, last = jax.jit(lambda a, b, h0: ops.linear_scan(a, b, h0, impl=impl, segment_ids=seg))(
        a, b, h0
    )
    h_ref, last_ref = ops.linear_scan_reference(a, b, h0, segment_ids=seg)
    assert_close(h, h_ref)
    assert_close(last, last_ref)


def test_linear_scan_gradient_of_a_start_decay_is_zero():
    a, b, h0 = _scan_inputs()
    seg = packed_ids()
    g = jax.grad(lambda a: ops.linear_scan(a, b, h0, segment_ids=seg)[0].sum())(a)
    assert np.all(np.asarray(g)[np.asarray(segments.document_starts(seg))] == 0)


@pytest.mark.parametrize(
    "fn",
    [
        lambda a, b, s: ops.linear_scan(a, b, segment_ids=s),
        lambda a, b, s: ops.linear_scan_reference(a, b, segment_ids=s),
    ],
)
def test_linear_scan_rejects_bad_segment_ids(fn):
    a, b, _ = _scan_inputs()
    with pytest.raises(ValueError, match="segment_ids"):
        fn(a, b, packed_ids()[:, :5])
    with pytest.raises(ValueError, match="segment_ids"):
        fn(a, b, packed_ids().astype(jnp.float32))


# ---------------------------------------------------------------- selective_scan


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


# ---------------------------------------------------------------- causal / bidirectional conv


def _conv_inputs(l_fwd, l_bwd=None, t=T, h=3):
    k = jax.random.split(jax.random.key(2), 3)
    u = jax.random.normal(k[0], (2, t, h))
    kf = jax.random.normal(k[1], (h, l_fwd)) / np.sqrt(l_fwd)
    kb = None if l_bwd is None else jax.random.normal(k[2], (h, l_bwd)) / np.sqrt(l_bwd)
    return u, kf, kb


def _set_conv_block(monkeypatch, block):
    """The masked Toeplitz form in one block (64 > t = 37) or in blocks of 8 (documents start
    inside blocks and on a block boundary, and reach back over several blocks)."""
    from effseq.ops import fftconv

    monkeypatch.setattr(fftconv, "_CONV_BLOCK", block)


# (impl, kernel length, block): the short-conv tap path, and the masked Toeplitz form for long
# kernels whatever impl says (kernels shorter than, equal to and longer than t).
CONV_CASES = [("direct", 4, 64), ("fft", 4, 8), ("fft", T, 8), ("direct", 20, 64), ("fft", 50, 8)]


@pytest.mark.parametrize("impl,l,block", CONV_CASES)
def test_causal_conv_packed_equals_documents_alone(monkeypatch, impl, l, block):
    _set_conv_block(monkeypatch, block)
    u, kf, _ = _conv_inputs(l)
    seg = packed_ids()
    docs = Docs()

    def packed(u, k):
        return ops.causal_conv(u, k, impl=impl, segment_ids=seg)

    def alone(u, k):
        # Zeros after each document add nothing to a causal convolution.
        return docs.packed(ops.causal_conv(docs.rows(u), k, impl="direct"))

    check_vjp(packed, alone, (u, kf), ["u", "k"])


@pytest.mark.parametrize("impl,l,block", CONV_CASES)
def test_bidirectional_conv_packed_equals_documents_alone(monkeypatch, impl, l, block):
    _set_conv_block(monkeypatch, block)
    u, kf, kb = _conv_inputs(l, max(l - 1, 3))
    seg = packed_ids()
    docs = Docs()

    def packed(u, kf, kb):
        return ops.bidirectional_conv(u, kf, kb, impl=impl, segment_ids=seg)

    def alone(u, kf, kb):
        # Zeros after each document add nothing to either half.
        return docs.packed(ops.bidirectional_conv(docs.rows(u), kf, kb, impl="direct"))

    check_vjp(packed, alone, (u, kf, kb), ["u", "k_fwd", "k_bwd"])


@pytest.mark.parametrize("impl,l", [("direct", 4), ("fft", T)])
def test_convs_packed_match_reference(monkeypatch, impl, l):
    _set_conv_block(monkeypatch, 8)
    u, kf, kb = _conv_inputs(l, l)
    seg = packed_ids()
    check_vjp(
        lambda u, k: ops.causal_conv(u, k, impl=impl, segment_ids=seg),
        lambda u, k: ops.causal_conv_reference(u, k, segment_ids=seg),
        (u, kf),
        ["u", "k"],
    )
    check_vjp(
        lambda u, kf, kb: ops.bidirectional_conv(u, kf, kb, impl=impl, segment_ids=seg),
        lambda u, kf, kb: ops.bidirectional_conv_reference(u, kf, kb, segment_ids=seg),
        (u, kf, kb),
        ["u", "k_fwd", "k_bwd"],
    )


def test_packed_conv_with_one_document_is_the_plain_conv():
    u, kf, kb = _conv_inputs(T, T)
    seg = jnp.ones((2, T), jnp.int32)
    packed = jax.jit(lambda u, kf, kb: ops.bidirectional_conv(u, kf, kb, segment_ids=seg))
    assert_close(packed(u, kf, kb), ops.bidirectional_conv(u, kf, kb))


def test_convs_reject_bad_segment_ids():
    u, kf, kb = _conv_inputs(4, 4)
    bad = packed_ids()[:, :-1]
    for call in (
        lambda: ops.causal_conv(u, kf, segment_ids=bad),
        lambda: ops.causal_conv_reference(u, kf, segment_ids=bad),
        lambda: ops.bidirectional_conv(u, kf, kb, segment_ids=bad),
        lambda: ops.bidirectional_conv_reference(u, kf, kb, segment_ids=bad),
    ):
        with pytest.raises(ValueError, match="segment_ids"):
            call()


# ---------------------------------------------------------------- attention


def _qkv(t=T, b=2, h=2, dk=8, dv=4):
    k = jax.random.split(jax.random.key(4), 3)
    return (
        jax.random.normal(k[0], (b, t, h, dk)),
        jax.random.normal(k[1], (b, t, h, dk)),
        jax.random.normal(k[2], (b, t, h, dv)),
    )


def _kv_mask(t=T):
    """Keys hidden: all of row 0's third document (6..15), so with causal=False its queries see
    nothing at all, and single keys elsewhere."""
    m = np.ones((2, t), bool)
    m[0, 6:16] = False
    m[1, [3, 20]] = False
    return jnp.asarray(m)


def _set_blocks(monkeypatch, q_block, k_block):
    import importlib

    attention_module = importlib.import_module("effseq.ops.attention")
    monkeypatch.setattr(attention_module, "_QUERY_BLOCK", q_block)
    monkeypatch.setattr(attention_module, "_KEY_BLOCK", k_block)


ATTN_CASES = [
    # impl, causal, window, masked keys, (query block, key block)
    ("xla", True, None, False, (8, 8)),
    ("xla", False, 5, True, (8, 8)),
    ("blockwise", True, None, False, (8, 8)),
    ("blockwise", True, 4, True, (16, 8)),
    ("blockwise", False, None, True, (8, 16)),
    ("blockwise", False, None, False, (512, 512)),
]


@pytest.mark.parametrize("impl,causal,window,masked,blocks", ATTN_CASES)
def test_attention_packed_equals_documents_alone(monkeypatch, impl, causal, window, masked, blocks):
    _set_blocks(monkeypatch, *blocks)
    seg = packed_ids()
    docs = Docs()
    kv = _kv_mask() if masked else jnp.ones((2, T), bool)

    def packed(q, k, v):
        return ops.attention(
            q, k, v, causal=causal, window=window, kv_mask=kv, impl=impl, segment_ids=seg
        )

    def alone(q, k, v):
        # The padding after each document is hidden by kv_mask.
        kv_docs = docs.rows(kv, False)
        o = ops.attention(
            *(docs.rows(x) for x in (q, k, v)), causal=causal, window=window, kv_mask=kv_docs
        )
        return docs.packed(o)

    check_vjp(packed, alone, _qkv(), ["q", "k", "v"])


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_packed_matches_reference(monkeypatch, impl, causal):
    _set_blocks(monkeypatch, 8, 8)
    seg = packed_ids()
    kv = _kv_mask()
    check_vjp(
        lambda q, k, v: ops.attention(
            q, k, v, causal=causal, kv_mask=kv, impl=impl, segment_ids=seg
        ),
        lambda q, k, v: ops.attention_reference(
            q, k, v, causal=causal, kv_mask=kv, segment_ids=seg
        ),
        _qkv(),
        ["q", "k", "v"],
    )


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_attention_rows_seeing_no_key_are_zero_and_finite(monkeypatch, impl):
    _set_blocks(monkeypatch, 8, 8)
    seg = packed_ids()
    q, k, v = _qkv()

    def f(q, k, v):
        return ops.attention(q, k, v, causal=False, kv_mask=_kv_mask(), impl=impl, segment_ids=seg)

    o = jax.jit(f)(q, k, v)
    assert np.all(np.asarray(o)[0, 6:16] == 0)
    grads = jax.jit(jax.grad(lambda *a: f(*a).sum() ** 2, (0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0])[0, 6:16] == 0)


def test_attention_rejects_bad_segment_ids():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="segment_ids"):
        ops.attention(q, k, v, segment_ids=packed_ids()[:, :5])
    with pytest.raises(ValueError, match="segment_ids"):
        ops.attention(q[:, :5], k, v, segment_ids=packed_ids()[:, :5])
    with pytest.raises(ValueError, match="segment_ids"):
        ops.attention_reference(q, k, v, segment_ids=packed_ids().astype(jnp.float32))


# ---------------------------------------------------------------- s4d_scan


def _s4d_params(h=3, n=4, t=T):
    k = jax.random.split(jax.random.key(5), 6)
    log_dt = jnp.log(jnp.linspace(0.05, 0.3, h))
    A = jax.lax.complex(-0.5 * jnp.ones((h, n)), jnp.pi * jnp.arange(n)[None].repeat(h, 0))
    B = jax.lax.complex(jax.random.normal(k[0], (h, n)), jax.random.normal(k[1], (h, n)))
    C = jax.lax.complex(jax.random.normal(k[2], (h, n)), jax.random.normal(k[3], (h, n)))
    u = jax.random.normal(k[4], (2, t, h))
    h0 = jax.lax.complex(*jax.random.normal(k[5], (2, 2, h, n)))
    return log_dt, A, B, C, u, h0


S4D_NAMES = ["log_dt", "A", "B", "C", "u", "h0"]


def _h0_term(dA, C, h0, powers):
    """2 Re(sum_n C dA**p h0) for powers p (l,): (1, l, h), h0 (1, h, n)."""
    x = h0[:, None] * dA[None, None] ** powers[None, :, None, None]
    return 2 * jnp.einsum("hn,blhn->blh", C, x).real


@pytest.mark.parametrize(
    "reverse,t,starts",
    [
        (False, T, STARTS),
        (True, T, STARTS),
        # Longer than one rematerialised segment (64) and not a multiple of it; documents
        # across the segment boundary, one starting on it, one of length 1 at the end.
        (False, 100, ([0, 3, 64, 65, 99], [0, 50])),
        (True, 100, ([0, 3, 64, 65, 99], [0, 50])),
    ],
)
def test_s4d_scan_packed_equals_kernel_path_per_document(reverse, t, starts):
    """The reference is the S4D layer's FFT path (s4d_kernel + causal_conv, or the future half
    of bidirectional_conv) on each document alone, plus h0's decay in the document it feeds."""
    T = t  # noqa: N806
    seg = packed_ids(t, starts)
    docs = Docs(t, starts)
    rows = bounds(starts, t)

    def packed(log_dt, A, B, C, u, h0):
        dA, dB = ops.s4d_discretize(log_dt, A, B)
        return ops.s4d_scan(u, dA, dB, C, segment_ids=seg, h0=h0, reverse=reverse)

    def alone(log_dt, A, B, C, u, h0):
        dA, dB = ops.s4d_discretize(log_dt, A, B)
        K = ops.s4d_kernel(log_dt, A, B, C, T)
        u_docs = docs.rows(u)
        if reverse:
            y = ops.bidirectional_conv(u_docs, jnp.zeros_like(K), K, impl="fft")
        else:
            y = ops.causal_conv(u_docs, K, impl="fft")
        y = docs.packed(y)
        fixes, states = [], []
        for r, row in enumerate(rows):
            # h0 feeds the first document scanned; the final state is the last one's.
            (s, e), (s_last, e_last) = (row[-1], row[0]) if reverse else (row[0], row[-1])
            p = jnp.arange(e - s, dtype=jnp.float32)
            p = jnp.flip(p) if reverse else p + 1
            fixes.append(jnp.pad(_h0_term(dA, C, h0[r : r + 1], p), [(0, 0), (s, T - e), (0, 0)]))
            u_last = u[r : r + 1, s_last:e_last]
            state = ops.s4d_final_state(jnp.flip(u_last, 1) if reverse else u_last, log_dt, A, B)
            if len(row) == 1:
                state = state + dA ** (e - s) * h0[r : r + 1]
            states.append(state)
        return y + jnp.concatenate(fixes, 0), jnp.concatenate(states, 0)

    check_vjp(packed, alone, _s4d_params(t=t), S4D_NAMES)


def test_s4d_scan_unpacked_matches_the_convolution():
    log_dt, A, B, C, u, _ = _s4d_params()
    dA, dB = ops.s4d_discretize(log_dt, A, B)
    y, x = jax.jit(ops.s4d_scan)(u, dA, dB, C)
    assert_close(y, ops.causal_conv(u, ops.s4d_kernel(log_dt, A, B, C, T)))
    assert_close(x, ops.s4d_final_state(u, log_dt, A, B))


def test_s4d_scan_rejects_bad_segment_ids():
    log_dt, A, B, C, u, _ = _s4d_params()
    dA, dB = ops.s4d_discretize(log_dt, A, B)
    with pytest.raises(ValueError, match="segment_ids"):
        ops.s4d_scan(u, dA, dB, C, segment_ids=packed_ids()[:1])
