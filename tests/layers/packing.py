"""Packed rows in the layer tests: a packed row's documents against each document run alone,
and a packed prefill's state against the last document run alone (:mod:`effseq.ops.segments`).

"Alone" runs every document in one batch, right-padded with a mask (the layers' padding
invariance is tested on its own), so each check compiles two functions whatever the number of
documents.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tests.tolerances import assert_close


def layout(rows, t):
    """segment_ids (b, t) int32 for rows of document lengths; ids alternate 1, 2, 1, ... (they
    compare with their neighbour only), 0 pads each row to t. Returns (ids, docs), docs the
    list of (row, start, end)."""
    seg = np.zeros((len(rows), t), np.int32)
    docs = []
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            seg[r, start : start + n] = 1 + i % 2
            docs.append((r, start, start + n))
            start += n
        assert start <= t
    return jnp.asarray(seg), docs


def _alone(x, docs, extra=None):
    """The documents of x (b, t, ...) as one right-padded batch (n, L, ...) and its mask; with
    ``extra`` (b, m, ...), each document is followed by its row's extra positions."""
    parts = [
        x[r, s:e] if extra is None else jnp.concatenate([x[r, s:e], extra[r]]) for r, s, e in docs
    ]
    n = max(p.shape[0] for p in parts)
    batch = jnp.stack(
        [jnp.pad(p, ((0, n - p.shape[0]),) + ((0, 0),) * (p.ndim - 1)) for p in parts]
    )
    mask = jnp.arange(n)[None] < jnp.asarray([p.shape[0] for p in parts])[:, None]
    return batch, mask


def assert_packed_equals_alone(module, variables, x, seg, docs):
    """Every document's outputs in the packed rows x (b, t, d) and the gradients of a weighted
    sum of them (w.r.t. every input and every variable) equal those of the documents run alone."""
    real = (seg != 0)[..., None]
    w = jax.random.normal(jax.random.key(7), x.shape)
    w_alone, _ = _alone(w, docs)

    def packed(v, x):
        y = module.apply(v, x, segment_ids=seg)
        return jnp.sum(jnp.where(real, y * w, 0.0)), y

    def alone(v, xa, mask):
        y = module.apply(v, xa, mask)
        return jnp.sum(jnp.where(mask[..., None], y * w_alone, 0.0)), y

    grad = jax.value_and_grad
    (_, y), (gv, gx) = jax.jit(grad(packed, (0, 1), has_aux=True))(variables, x)
    xa, mask = _alone(x, docs)
    (_, ya), (gva, gxa) = jax.jit(grad(alone, (0, 1), has_aux=True))(variables, xa, mask)
    for i, (r, s, e) in enumerate(docs):
        assert_close(y[r, s:e], ya[i, : e - s], "float32", "value", f"document {i}")
        assert_close(gx[r, s:e], gxa[i, : e - s], "float32", "grad", f"document {i} dx")
    assert np.all(np.asarray(gx)[~np.asarray(real[..., 0])] == 0), "padding gets a gradient"
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(gv), jax.tree.leaves(gva), strict=True
    ):
        assert_close(a, b, "float32", "grad", jax.tree_util.keystr(path))


def assert_prefill_continues_last_document(module, variables, x, seg, docs, cont, max_len):
    """A packed prefill of x (b, t, d), then ``step`` over cont (b, m, d), equals each row's
    last document followed by its continuation run alone (parallel form); the prefill's
    outputs equal ``__call__``'s. Returns the prefill's state."""

    def prefill_then_steps(v, x, cont):
        y, state = module.apply(v, x, max_len, segment_ids=seg, method="prefill")

        def body(state, x_t):
            y_t, state = module.apply(v, x_t, state, method="step")
            return state, y_t

        _, ys = jax.lax.scan(body, state, jnp.moveaxis(cont, 1, 0))
        return y, jnp.moveaxis(ys, 0, 1), state

    y, ys, state = jax.jit(prefill_then_steps)(variables, x, cont)
    assert_close(y, jax.jit(lambda v, x: module.apply(v, x, segment_ids=seg))(variables, x))
    last = [max((d for d in docs if d[0] == r), key=lambda d: d[1]) for r in range(x.shape[0])]
    xa, mask = _alone(x, last, cont)
    ya = jax.jit(module.apply)(variables, xa, mask)
    m = cont.shape[1]
    for r, (_, s, e) in enumerate(last):
        assert_close(ys[r], ya[r, e - s : e - s + m], "float32", "value", f"row {r}")
    return state


# Packed rows (segment_ids), t = 15: documents starting inside a chunk of 4 and at a chunk
# boundary, one of length 1, a last document shorter than a width-4 conv's window, and trailing
# padding; t is not a multiple of the chunk.
PACKED_ROWS = [[3, 1, 6, 2], [5, 2, 7]]


def check_packed(module, variables, x):
    seg, docs = layout(PACKED_ROWS, x.shape[1])
    assert_packed_equals_alone(module, variables, x, seg, docs)


def check_packed_prefill(module, variables, x):
    """Returns the packed prefill's state."""
    seg, docs = layout(PACKED_ROWS, x.shape[1])
    cont = jax.random.normal(jax.random.key(5), (x.shape[0], 3, x.shape[2]))
    return assert_prefill_continues_last_document(module, variables, x, seg, docs, cont, 32)
