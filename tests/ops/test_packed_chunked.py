"""Packed sequences (``segment_ids``) in the chunked linear-recurrence ops (GLA, SSD, the gated
delta rule with per-head and per-key-channel gates).

A packed row must equal each of its documents run alone through the unpacked reference (values,
the last document's final state, the gradient of every input incl. h0 and the gates), for the
reference, the chunked and the recurrent forms alike; the chunked form must equal the reference
with ``segment_ids`` under extreme gates; a start's own gate gets exactly zero gradient; bad ids
raise. Layouts: starts inside chunks and sub-chunks, exactly on chunk boundaries, documents of
one token (also last in the row), several documents per chunk, an id reused, t not a multiple
of the chunk, and (GLA, which runs it as one shorter chunk) t shorter than one chunk.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.ops.delta_rule import gated_delta_rule, gated_delta_rule_reference
from effseq.ops.gla import gated_linear_attention, gated_linear_attention_reference
from effseq.ops.ssd import ssd, ssd_reference
from tests.tolerances import assert_close

CHUNK = 16  # GLA's sub-chunks are 8 steps
# Per layout: t and, per row, each document's first position. "long": row 0 starts inside a
# sub-chunk (5), on a chunk boundary (16) with a one-token document there, three documents in
# the second chunk (16, 17, 30), t = 37 not a multiple of 16; row 1 a one-token document inside
# a chunk (10), a start on the boundary 32, a one-token last document (36). "short": t shorter
# than one chunk.
LAYOUTS = {
    "long": (37, ([0, 5, 16, 17, 30], [0, 10, 11, 32, 36])),
    "short": (5, ([0, 2, 3], [0, 4])),
}


def _ids(t, starts):
    """Ids alternating 1, 2, 1, ... per document: only a change from the neighbour counts."""
    rows = []
    for row in starts:
        ids = np.zeros(t, np.int32)
        for i, s in enumerate(row):
            ids[s:] = 1 + i % 2
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def _docs(t, starts):
    """Per row, the (first, end) of each document."""
    return [list(zip(row, [*row[1:], t], strict=True)) for row in starts]


def _start_mask(t, starts):
    m = np.zeros((len(starts), t), bool)
    for r, row in enumerate(starts):
        m[r, row[1:]] = True
    return m


# ----------------------------------------------------------------------------- the three ops
B, H, DK, DV = 2, 2, 8, 6
SSD_H, SSD_P, SSD_N, SSD_G = 4, 8, 16, 2


class _Op:
    """One op: its inputs, its forms with segment_ids, and which inputs run along time."""

    def __init__(self, name, names, time_args, gate, inputs, call):
        self.name, self.names, self.time_args, self.gate = name, names, time_args, gate
        self.inputs, self._call = inputs, call

    def call(self, impl, args, seg):
        return self._call(impl, args, seg)


def _gla_inputs(t, gates, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    shape = (B, t, H, DK)
    if gates == "realistic":
        log_g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], shape)) / 16
    else:  # mixed: -20 and ~0 side by side
        tiny = -1e-4 * jax.random.uniform(ks[3], shape)
        log_g = jnp.where(jax.random.bernoulli(ks[4], 0.5, shape), -20.0, tiny)
    return (
        jax.random.normal(ks[0], shape),
        jax.random.normal(ks[1], shape),
        jax.random.normal(ks[2], (B, t, H, DV)),
        log_g,
        jax.random.normal(ks[4], (B, H, DK, DV)),
    )


def _gla_call(impl, args, seg):
    q, k, v, log_g, h0 = args
    if impl == "reference":
        return gated_linear_attention_reference(q, k, v, log_g, h0=h0, segment_ids=seg)
    return gated_linear_attention(
        q, k, v, log_g, h0=h0, chunk_size=CHUNK, impl=impl, segment_ids=seg
    )


def _ssd_inputs(t, gates, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    x = jax.random.normal(ks[0], (B, t, SSD_H, SSD_P))
    if gates == "realistic":
        dt = jax.nn.softplus(jax.random.normal(ks[5], (B, t, SSD_H)) - 2.0)
        A = -jax.random.uniform(ks[6], (SSD_H,), minval=1.0, maxval=16.0)
    else:  # mixed: dt A = -20 and ~0 side by side
        strong = jax.random.bernoulli(ks[5], 0.5, (B, t, SSD_H))
        dt = jnp.where(strong, 20.0, 1e-5 * jax.random.uniform(ks[6], (B, t, SSD_H)))
        A = -jnp.ones((SSD_H,))
        x = x / 20
    return (
        x,
        dt,
        A,
        jax.random.normal(ks[1], (B, t, SSD_G, SSD_N)),
        jax.random.normal(ks[2], (B, t, SSD_G, SSD_N)),
        jax.random.normal(ks[3], (SSD_H,)),
        jax.random.normal(ks[4], (B, SSD_H, SSD_P, SSD_N)),
    )


def _ssd_call(impl, args, seg):
    x, dt, A, Bm, Cm, D, h0 = args
    if impl == "reference":
        return ssd_reference(x, dt, A, Bm, Cm, D, h0=h0, segment_ids=seg)
    return ssd(x, dt, A, Bm, Cm, D, h0=h0, chunk_size=CHUNK, impl=impl, segment_ids=seg)


def _delta_inputs(per_channel):
    def inputs(t, gates, seed):
        ks = jax.random.split(jax.random.PRNGKey(seed), 7)
        k = jax.random.normal(ks[1], (B, t, H, DK))
        shape = (B, t, H, DK) if per_channel else (B, t, H)
        if gates == "realistic":
            log_g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], shape)) / 4
        else:
            tiny = -1e-4 * jax.random.uniform(ks[3], shape)
            log_g = jnp.where(jax.random.bernoulli(ks[6], 0.5, shape), -20.0, tiny)
        return (
            jax.random.normal(ks[0], (B, t, H, DK)),
            k / jnp.linalg.norm(k, axis=-1, keepdims=True),
            jax.random.normal(ks[2], (B, t, H, DV)),
            log_g,
            jax.random.uniform(ks[4], (B, t, H)),
            jax.random.normal(ks[5], (B, H, DK, DV)),
        )

    return inputs


def _delta_call(impl, args, seg):
    q, k, v, log_g, beta, h0 = args
    if impl == "reference":
        return gated_delta_rule_reference(q, k, v, log_g, beta, h0=h0, segment_ids=seg)
    return gated_delta_rule(
        q, k, v, log_g, beta, h0=h0, chunk_size=CHUNK, impl=impl, segment_ids=seg
    )


OPS = {
    "gla": _Op("gla", ("q", "k", "v", "log_g", "h0"), {0, 1, 2, 3}, 3, _gla_inputs, _gla_call),
    "ssd": _Op(
        "ssd", ("x", "dt", "A", "B", "C", "D", "h0"), {0, 1, 3, 4}, 1, _ssd_inputs, _ssd_call
    ),
    "gdn": _Op(
        "gdn",
        ("q", "k", "v", "log_g", "beta", "h0"),
        {0, 1, 2, 3, 4},
        3,
        _delta_inputs(False),
        _delta_call,
    ),
    "kda": _Op(
        "kda",
        ("q", "k", "v", "log_g", "beta", "h0"),
        {0, 1, 2, 3, 4},
        3,
        _delta_inputs(True),
        _delta_call,
    ),
}


def _cotangents(out_shapes, seed=1):
    (o_shape, S_shape) = out_shapes
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, o_shape), jax.random.normal(k2, S_shape)


def _vjp(op, impl, seg, args, cts):
    out, vjp = jax.vjp(lambda *a: op.call(impl, a, seg), *args)
    return out, vjp(cts)


@functools.cache
def _jitted_vjp(op_name, impl):
    """One jitted value-and-gradient function per op and form, shared by the tests."""
    return jax.jit(functools.partial(_vjp, OPS[op_name], impl))


def _cotangents_for(op, args):
    shapes = jax.eval_shape(lambda *a: op.call("reference", a, None), *args)
    return _cotangents(tuple(s.shape for s in shapes))


@functools.cache
def _packed(op_name, impl, layout, gates="realistic", seed=0):
    """Values and gradients of one packed run."""
    op = OPS[op_name]
    t, starts = LAYOUTS[layout]
    args = op.inputs(t, gates, seed)
    run = _jitted_vjp(op_name, impl)
    return jax.device_get(run(_ids(t, starts), args, _cotangents_for(op, args)))


@functools.cache
def _alone(op_name, layout):
    """Each document run alone through the unpacked reference, assembled like a packed run:
    outputs and time-indexed gradients in place, the last document's state, h0's gradient
    from each row's first document, the gradients of the other inputs summed over documents.

    Every document gets its own row of a batch (one compile), starting at position 0 (from the
    row's h0 if it is the row's first document, else from zeros) and followed by zero inputs,
    which are identity steps of all three ops (no decay, nothing written); their outputs and
    gradients are dropped and their cotangents are 0.
    """
    op = OPS[op_name]
    t, starts = LAYOUTS[layout]
    args = op.inputs(t, "realistic", 0)
    do, dS = _cotangents_for(op, args)
    docs = [(r, first, end) for r, row in enumerate(_docs(t, starts)) for first, end in row]

    def place(x, r, first, end):  # x (b, t, ...) -> one row, the document first, zeros after
        row = np.zeros((t, *x.shape[2:]), np.float32)
        row[: end - first] = x[r, first:end]
        return row

    args, do, dS = jax.device_get((args, do, dS))
    sub = []
    for i, a in enumerate(args):
        if i in op.time_args:
            sub.append(np.stack([place(a, *d) for d in docs]))
        elif i == len(args) - 1:
            sub.append(np.stack([a[r] * (first == 0) for r, first, _ in docs]))
        else:
            sub.append(a)  # shared by all rows (SSD's A and D)
    cts = (
        np.stack([place(do, *d) for d in docs]),
        np.stack([dS[r] * (end == t) for r, _, end in docs]),
    )
    (o_d, S_d), g_d = jax.device_get(
        jax.jit(functools.partial(_vjp, op, "reference", None))(tuple(sub), cts)
    )
    o = np.zeros(do.shape, np.float32)
    S = np.zeros(dS.shape, np.float32)
    grads = [np.zeros(a.shape, np.float32) for a in args]
    for n, (r, first, end) in enumerate(docs):
        o[r, first:end] = o_d[n, : end - first]
        if end == t:
            S[r] = S_d[n]
        for i, g in enumerate(g_d):
            if i in op.time_args:
                grads[i][r, first:end] = g[n, : end - first]
            elif i == len(args) - 1:
                if first == 0:
                    grads[i][r] = g[n]
    for i, g in enumerate(g_d):
        if i not in op.time_args and i != len(args) - 1:
            grads[i] = np.asarray(g)
    return (o, S), grads


@pytest.mark.parametrize("impl", ["reference", "chunked", "recurrent"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_packed_row_equals_documents_alone(op_name, impl):
    op = OPS[op_name]
    (o, S), grads = _packed(op_name, impl, "long")
    (o_ref, S_ref), grads_ref = _alone(op_name, "long")
    assert_close(o, o_ref, err_msg="o")
    assert_close(S, S_ref, err_msg="final state (last document)")
    for name, g, g_ref in zip(op.names, grads, grads_ref, strict=True):
        assert np.isfinite(g).all(), name
        assert_close(g, g_ref, kind="grad", err_msg=f"d/d{name}")


@pytest.mark.parametrize(
    "op_name,impl,layout,gates",
    [
        ("gla", "chunked", "long", "mixed"),
        ("gla", "chunked", "short", "realistic"),
        ("ssd", "chunked", "long", "mixed"),
        ("gdn", "chunked", "long", "mixed"),
        ("kda", "chunked", "long", "mixed"),
        ("kda", "recurrent", "long", "mixed"),
    ],
)
def test_fast_equals_reference_with_segment_ids(op_name, impl, layout, gates):
    # Gates of exp(-20) next to ~1 (mixed): the masked decays keep their accuracy.
    op = OPS[op_name]
    (o, S), grads = _packed(op_name, impl, layout, gates, seed=2)
    (o_ref, S_ref), grads_ref = _packed(op_name, "reference", layout, gates, seed=2)
    assert_close(o, o_ref, err_msg="o")
    assert_close(S, S_ref, err_msg="S_last")
    for name, g, g_ref in zip(op.names, grads, grads_ref, strict=True):
        assert np.isfinite(g).all(), name
        assert_close(g, g_ref, kind="grad", err_msg=f"d/d{name}")


@pytest.mark.parametrize("impl", ["reference", "chunked", "recurrent"])
@pytest.mark.parametrize("op_name", ["gla", "gdn", "kda"])
def test_start_gate_gradient_is_zero(op_name, impl):
    # A start's own decay multiplies the zeroed state: its gradient is exactly 0.
    op = OPS[op_name]
    t, starts = LAYOUTS["long"]
    _, grads = _packed(op_name, impl, "long")
    dg = np.asarray(grads[op.gate])[_start_mask(t, starts)]
    assert (dg == 0).all(), np.abs(dg).max()


@pytest.mark.parametrize("impl", ["reference", "chunked", "recurrent"])
def test_ssd_start_decay_gradient_is_zero(impl):
    # dt enters both the decay exp(dt A) and the input dt x; with x = 0 at the starts only the
    # decay is left, so the gradient of dt there is exactly 0.
    op = OPS["ssd"]
    t, starts = LAYOUTS["long"]
    mask = _start_mask(t, starts)
    args = list(op.inputs(t, "realistic", 0))
    args[0] = jnp.where(mask[:, :, None, None], 0.0, args[0])
    _, grads = _jitted_vjp("ssd", impl)(_ids(t, starts), tuple(args), _cotangents_for(op, args))
    ddt = np.asarray(grads[1])[mask]
    assert (ddt == 0).all(), np.abs(ddt).max()
    assert np.abs(np.asarray(grads[1])[~mask]).sum() > 0


@pytest.mark.parametrize("impl", ["reference", "chunked", "recurrent"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_bad_segment_ids_raise(op_name, impl):
    op = OPS[op_name]
    args = op.inputs(5, "realistic", 0)
    with pytest.raises(ValueError, match=r"`segment_ids` must have shape \(b, t\) = \(2, 5\)"):
        op.call(impl, args, jnp.ones((B, 6), jnp.int32))
    with pytest.raises(ValueError, match=r"`segment_ids` must have shape"):
        op.call(impl, args, jnp.ones((5,), jnp.int32))
    with pytest.raises(ValueError, match="`segment_ids` must be an integer array"):
        op.call(impl, args, jnp.ones((B, 5), jnp.float32))
