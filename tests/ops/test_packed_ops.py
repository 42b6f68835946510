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


@pytest.mark.parametrize("impl", ["sequential", "associative"])
def test_linear_scan_packed_matches_reference_with_gradients(impl):
    seg = packed_ids()
    check_vjp(
        lambda a, b, h0: ops.linear_scan(a, b, h0, impl=impl, segment_ids=seg),
        lambda a, b, h0: ops.linear_scan_reference(a, b, h0, segment_ids=seg),
        _scan_inputs(),
        ["a", "b", "h0"],
    )


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
