"""The conformance suite: every registered mixer, in every form, on outputs and on the
gradients of the input and of every parameter (float32 tolerances of tests/tolerances.py).

Unpacked: parallel == float64 reference == step by step == prefill then step == right-padded
(mask), at t = 1 and t = 11 (prime, 2 chunks of 4 + 3); more lengths are slow.

Packed (segment_ids; id 0 = trailing padding): each document equals itself run alone, in any
row and position, with any neighbours (the loss summed over documents for the parameter
gradients); padding gets no gradient; a causal packed prompt prefilled, then stepped, continues
each row's last document exactly as that document alone with the continuation appended. The
fast layout (harness.FAST_LAYOUT, t = 13, chunk 4) has documents of length 1, documents
starting at chunk boundaries and inside chunks, a row without padding, a row with one padded
document, and ids reused non-adjacently; random layouts are slow. "Alone" is one masked batch
of every occurrence (right padding with a mask, itself checked against the unpadded float64
reference below).

Parameterised from the registry at collection: a mixer registered before collection gets every
check (sized by harness.CONFIGS, or its own defaults at d_model 16). Both fast lengths and the
packed rows of a mixer run in one compiled program, plus one for the float64 references; this
file holds all the tests sharing them (so that pytest-xdist's loadfile gives them one worker).
"""

import jax
import numpy as np
import pytest

from tests.conformance import harness
from tests.conformance.checks import assert_form, assert_masked_params
from tests.tolerances import assert_close

CASES = harness.cases()
CAUSAL = [c for c in CASES if c[1]]


def _params(cases):
    out = []
    for case in cases:
        for t in harness.FAST_LENGTHS:
            out.append(pytest.param(case, t, id=f"{harness.case_id(case)}-t{t}"))
        for t in harness.SLOW_LENGTHS:
            out.append(
                pytest.param(case, t, id=f"{harness.case_id(case)}-t{t}", marks=pytest.mark.slow)
            )
    return out


def _suite(case, t):
    if t in harness.FAST_LENGTHS:
        return harness.suite(*case)  # both fast lengths and the packed rows: one program
    return harness.suite(*case, (t,), None)


@pytest.mark.parametrize("case, t", _params(CASES))
def test_parallel_equals_the_float64_reference(case, t):
    s = _suite(case, t)
    assert not jax.config.jax_enable_x64, "the float64 reference leaked jax_enable_x64"
    if s.references is None:
        pytest.skip(f"{case[0]} has no float64 form: {s.reference_error}")
    assert_form(
        s.forms[f"parallel@{t}"], s.references[t], f"{harness.case_id(case)} parallel, t={t}"
    )


@pytest.mark.parametrize("case, t", _params(CAUSAL))
def test_step_by_step_equals_the_reference(case, t):
    s = _suite(case, t)
    assert_form(s.forms[f"steps@{t}"], s.expected(t), f"{case[0]} steps, t={t}")


@pytest.mark.parametrize("case, t", _params(CAUSAL))
def test_prefill_then_step_equals_the_reference(case, t):
    s = _suite(case, t)
    assert_form(s.forms[f"prefill@{t}"], s.expected(t), f"{case[0]} prefill then step, t={t}")


@pytest.mark.parametrize("case, t", _params(CASES))
def test_right_padding_by_mask_equals_the_reference(case, t):
    s = _suite(case, t)
    what = f"{harness.case_id(case)} padded by mask, t={t}"
    assert_form(s.masked(f"mask@{t}"), s.expected(t), what, t=t, params=False)
    # One backward ran the whole masked batch: its parameter gradients are checked against the
    # sum of the forms its groups stand for, here when it holds padded rows only, else by the
    # packed tests (which then cover these rows' parameter gradients too).
    if "alone" not in s.plan.groups:
        assert_masked_params(s)


SLOW_SEEDS = (1, 2, 3)


def _layout_params(cases):
    out = [pytest.param(c, -1, id=harness.case_id(c)) for c in cases]
    out += [
        pytest.param(c, s, id=f"{harness.case_id(c)}-layout{s}", marks=pytest.mark.slow)
        for c in cases
        for s in SLOW_SEEDS
    ]
    return out


def _packed_suite(case, layout_seed):
    if layout_seed == -1:
        s = harness.suite(*case)  # shared with test_forms' fast lengths: one program
    else:
        s = harness.suite(*case, (), layout_seed)
    if s.packing_error:
        pytest.fail(s.packing_error)
    return s


@pytest.mark.parametrize("case, layout_seed", _layout_params(CASES))
def test_each_packed_document_equals_itself_alone(case, layout_seed):
    s = _packed_suite(case, layout_seed)
    packed = s.forms["packed"]
    alone = s.masked("alone")
    lengths = s.plan.layout.lengths
    name = harness.case_id(case)
    covered = np.zeros(packed.y.shape[:2], bool)
    for k, (r, start, doc) in enumerate(s.plan.occurrences):
        n = lengths[doc]
        what = f"{name}: document {doc} (length {n}) at row {r}, position {start}"
        sl = slice(start, start + n)
        assert_close(packed.y[r, sl], alone.y[k, :n], "float32", "value", f"{what}: output")
        assert_close(packed.x[r, sl], alone.x[k, :n], "float32", "grad", f"{what}: d/dx")
        covered[r, sl] = True
    # Padding (id 0) changes nothing, so it gets no gradient.
    junk = packed.x[~covered]
    assert_close(junk, np.zeros_like(junk), "float32", "grad", f"{name}: d/dx of padding")
    # The parameter gradients (loss summed over documents), through the masked batch's sum.
    assert_masked_params(s)


@pytest.mark.parametrize("case, layout_seed", _layout_params(CASES))
def test_a_document_is_the_same_in_every_row_and_position(case, layout_seed):
    s = _packed_suite(case, layout_seed)
    packed = s.forms["packed"]
    lengths = s.plan.layout.lengths
    seen: dict[str, tuple] = {}
    repeated = 0
    for r, start, doc in s.plan.occurrences:
        n = lengths[doc]
        here = (packed.y[r, start : start + n], packed.x[r, start : start + n])
        if doc in seen:
            repeated += 1
            what = f"{harness.case_id(case)}: document {doc} at {seen[doc][0]} and {(r, start)}"
            assert_close(here[0], seen[doc][1][0], "float32", "value", f"{what}: output")
            assert_close(here[1], seen[doc][1][1], "float32", "grad", f"{what}: d/dx")
        else:
            seen[doc] = ((r, start), here)
    assert repeated, "the layout repeats no document"


@pytest.mark.parametrize("case, layout_seed", _layout_params(CAUSAL))
def test_packed_prefill_then_step_continues_the_last_document(case, layout_seed):
    s = _packed_suite(case, layout_seed)
    got = s.forms["packed_prefill"]
    ref = s.masked("continued")
    t = s.plan.layout.t
    name = harness.case_id(case)
    # The prefill's outputs are the parallel form's, on every document.
    real = s.plan.arrays["ids"] != 0
    packed_y = s.forms["packed"].y
    assert_close(got.y[:, :t][real], packed_y[real], "float32", "value", f"{name}: prefill")
    for r, (start, n) in enumerate(s.plan.last):
        what = f"{name}: row {r}, last document (length {n} at {start}) continued"
        y = np.concatenate([got.y[r, start : start + n], got.y[r, t:]])
        gx = np.concatenate([got.x[r, start : start + n], got.x[r, t:]])
        m = n + harness.CONTINUE
        assert_close(y, ref.y[r, :m], "float32", "value", f"{what}: output")
        assert_close(gx, ref.x[r, :m], "float32", "grad", f"{what}: d/dx")
        # No other prompt position (earlier documents, padding) reaches the continuation.
        other = np.concatenate([got.x[r, :start], got.x[r, start + n : t]])
        assert_close(other, np.zeros_like(other), "float32", "grad", f"{what}: d/dx elsewhere")
    assert_masked_params(s)
