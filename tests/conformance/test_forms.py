"""Every registered mixer, every unpacked form: parallel == float64 reference == step by step ==
prefill then step == right-padded (mask), on outputs and on the gradients of the input and of
every parameter, at t = 1 and t = 11 (prime, 2 chunks of 4 + 3); more lengths are slow.

Parameterised from the registry at collection: a mixer registered before collection gets every
check (sized by harness.CONFIGS, or its own defaults at d_model 16).
"""

import pytest

from tests.conformance import harness
from tests.conformance.checks import assert_form, assert_masked_params

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
