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


def per_document(run, xs, t=T, starts=STARTS, h0=None, time_axis=1):
    """Runs ``run(*doc_xs, h0=...) -> (y, state or None)`` on every document alone (h0 for each
    row's first document only) and stitches y along time; the state is the last document's."""
    ys, states = [], []
    for r, docs in enumerate(bounds(starts, t)):
        row_y, state = [], None
        for k, (s, e) in enumerate(docs):
            doc_xs = [jax.lax.slice_in_dim(x[r : r + 1], s, e, axis=time_axis) for x in xs]
            h = None if (h0 is None or k > 0) else h0[r : r + 1]
            y, state = run(*doc_xs, h0=h)
            row_y.append(y)
        ys.append(jnp.concatenate(row_y, axis=time_axis))
        states.append(state)
    y = jnp.concatenate(ys, 0)
    return y if states[0] is None else (y, jnp.concatenate(states, 0))


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

    def run(a, b, h0):
        return ops.linear_scan(a, b, h0, impl=impl)

    def alone(a, b, h0):
        if not reverse:
            return per_document(run, (a, b), h0=h0)
        # Backwards in time h0 feeds each row's last document and the final state is the first
        # document's: run the flipped rows forwards.
        fl = lambda x: jnp.flip(x, 1)  # noqa: E731
        starts = [sorted(T - e for s, e in row) for row in bounds(STARTS, T)]
        h, last = per_document(run, (fl(a), fl(b)), starts=starts, h0=h0)
        return fl(h), last

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
