"""Assertions shared by the conformance tests: one form against another, output and every
gradient, at the tolerance table's float32 entries."""

from __future__ import annotations

import numpy as np

from tests.conformance.harness import Form
from tests.tolerances import assert_close


def assert_form(
    actual: Form, expected: Form, what: str, t: int | None = None, params: bool = True
) -> None:
    """actual's output and gradients (its first t positions when t is given: a padded form)
    equal expected's; a padded form's junk positions get no gradient at all. ``params``:
    compare the parameter gradients too."""
    sl = slice(None) if t is None else slice(0, t)
    assert actual.y[:, sl].shape == expected.y.shape, f"{what}: output shape"
    assert_close(actual.y[:, sl], expected.y, "float32", "value", f"{what}: output")
    assert_close(actual.x[:, sl], expected.x, "float32", "grad", f"{what}: d/dx")
    if t is not None:
        junk = actual.x[:, t:]
        assert_close(junk, np.zeros_like(junk), "float32", "grad", f"{what}: d/dx of padding")
    if params:
        assert_params(actual.params, expected.params, what)


def assert_params(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: parameter trees differ"
    for path, g in expected.items():
        assert_close(actual[path], g, "float32", "grad", f"{what}: d/d params{path}")


def assert_masked_params(suite) -> None:
    """The masked batch's parameter gradients equal the sum of the forms its row groups stand
    for (each length's reference, the packed rows, the packed prefill then steps)."""
    groups = ", ".join(suite.plan.groups)
    assert_params(
        suite.forms["masked"].params,
        suite.expected_masked_params(),
        f"masked batch ({groups}) vs the sum of the forms they stand for",
    )
