"""The conformance forms with the time axis sharded: every registered mixer, run under a mesh
whose ``sequence`` axis splits each row's time steps (effseq.ops.sequence), equals the same
layer unsharded: outputs and the gradients of the input and of every parameter, on the float32
tolerances of tests/tolerances.py.

Forms (one compiled program each way): parallel; right-padded by a mask whose padding spans a
shard edge; packed (segment_ids, id 0 = padding) with documents starting exactly on shard
edges, inside shards, one token long on an edge, and one document crossing every shard; and,
for causal mixers, a packed prompt prefilled sharded, then stepped. The unsharded forms are the
ones tests/conformance/test_conformance.py holds to the float64 reference, to step-by-step
decoding and to each document alone, so these checks carry those properties over to sharded
runs. Fast: the parallel and packed forms at mesh.sequence = 4, t = 16 (four steps per shard: a
width-4 convolution's halo still comes from one neighbour); slow: every form at 4, 2, 8
(t = 32), and 4 combined with data = 2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq import sharding
from tests.conformance import harness
from tests.conformance.checks import assert_form
from tests.sequence.harness import mesh

# Built for 8 (fake CPU) devices; skipped where fewer are visible (one GPU).
pytestmark = pytest.mark.devices(8)

CASES = harness.cases()
D_KEEP = 2  # padded positions at the end of row 0 of the masked form


def _ids(t: int) -> np.ndarray:
    """Row 0: documents [0, q) [q, q+1) [q+1, 2q) [2q, 2q+1) [2q+1, t-3) then padding (q = t/4:
    starts on the edges q and 2q of a 4-way split, one-token documents there, starts inside
    shards); row 1: one document over every shard, then one padding position."""
    q = t // 4
    row0 = np.zeros(t, np.int32)
    for i, (s, e) in enumerate([(0, q), (q, q + 1), (q + 1, 2 * q), (2 * q, 2 * q + 1)]):
        row0[s:e] = 1 + i % 2
    row0[2 * q + 1 : t - 3] = 3
    row1 = np.full(t, 5, np.int32)
    row1[-1] = 0
    return np.stack([row0, row1])


def _arrays(d: int, t: int, causal: bool) -> dict:
    rng = np.random.default_rng(t)
    a = {
        "x": rng.standard_normal((2, t, d)).astype(np.float32),
        "ct": rng.standard_normal((2, t, d)).astype(np.float32),
        "mask": np.ones((2, t), bool),
        "ids": _ids(t),
    }
    a["mask"][0, t - D_KEEP - 3 :] = False  # padding from inside one shard over the last edge
    if causal:
        a["xc"] = rng.standard_normal((2, harness.CONTINUE, d)).astype(np.float32)
        a["ctc"] = rng.standard_normal((2, harness.CONTINUE, d)).astype(np.float32)
    return a


FAST_FORMS = ("parallel", "packed")
ALL_FORMS = ("parallel", "masked", "packed", "packed_prefill")


def _program(module, forms):
    causal = module.causal

    def program(variables, a):
        params = variables["params"]

        def apply(p, *args, **kwargs):
            return module.apply({**variables, "params": p}, *args, **kwargs)

        def vjp(f, x, ct):
            y, pull = jax.vjp(f, params, x)
            gp, gx = pull(ct)
            return y, gp, gx

        ids = a["ids"]
        out = {}
        if "parallel" in forms:
            out["parallel"] = vjp(lambda p, x: apply(p, x), a["x"], a["ct"])
        if "masked" in forms:
            out["masked"] = vjp(lambda p, x: apply(p, x, a["mask"]), a["x"], a["ct"])
        if "packed" in forms:
            out["packed"] = vjp(lambda p, x: apply(p, x, segment_ids=ids), a["x"], a["ct"])
        if causal and "packed_prefill" in forms:

            def prefill_then_step(p, xs):
                x, xc = xs
                y, state = apply(p, x, MAX_LEN, method="prefill", segment_ids=ids)
                rest = harness._steps_from(module, {**variables, "params": p}, state, xc)
                return jnp.concatenate([y, rest], 1)

            y, pull = jax.vjp(prefill_then_step, params, (a["x"], a["xc"]))
            gp, (gx, gxc) = pull(jnp.concatenate([a["ct"], a["ctc"]], 1))
            out["packed_prefill"] = (y, gp, jnp.concatenate([gx, gxc], 1))
        return out

    return program


# Caches as long as the longest sharded prompt (t = 32) and its continuation.
MAX_LEN = 64


def _make(name, causal):
    return harness.registry.MIXERS[name](
        causal=causal,
        max_len=MAX_LEN,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        **harness.config(name, causal),
    )


@functools.cache
def _unsharded(name, causal, t, forms):
    module = _make(name, causal)
    v = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, t, module.d_model)))
    a = _arrays(module.d_model, t, causal)
    return module, v, a, harness._to_np(jax.jit(_program(module, forms))(v, a))


def _sharded(name, causal, t, forms, sequence, data=1):
    module, v, a, _ = _unsharded(name, causal, t, forms)
    program = _program(module, forms)
    m = mesh(sequence, data=data)
    with jax.set_mesh(m):
        placed = jax.device_put(a, sharding.batch_sharding(m)) if data > 1 else a
        text = str(jax.make_jaxpr(program)(v, placed))
        assert "shard_map" in text, f"{name}: no sequence shard_map in the sharded program"
        return harness._to_np(jax.jit(program)(v, placed))


def _params():
    out = []
    for case in CASES:
        cid = harness.case_id(case)
        out.append(pytest.param(case, 16, FAST_FORMS, 4, 1, id=f"{cid}-sequence4"))
        for t, n, data in ((16, 4, 1), (16, 2, 1), (32, 8, 1), (16, 4, 2)):
            out.append(
                pytest.param(
                    case,
                    t,
                    ALL_FORMS,
                    n,
                    data,
                    id=f"{cid}-all-forms-sequence{n}-data{data}",
                    marks=pytest.mark.slow,
                )
            )
    return out


@pytest.mark.parametrize("case, t, forms, sequence, data", _params())
def test_sharded_forms_equal_the_unsharded_ones(case, t, forms, sequence, data):
    name, causal = case
    if not harness.takes_segment_ids(name):
        pytest.fail(f"{name}: __call__/prefill take no segment_ids (packing contract)")
    expected = _unsharded(name, causal, t, forms)[3]
    got = _sharded(name, causal, t, forms, sequence, data)
    assert got.keys() == expected.keys()
    for form in expected:
        what = f"{harness.case_id(case)} {form}, mesh.sequence={sequence}, data={data}, t={t}"
        assert_form(got[form], expected[form], what)
