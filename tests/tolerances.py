"""The one tolerance table for the whole suite. Never loosen an entry inline in a test.

Keys are the dtype of the inputs given to the fast path; the reference always runs in float32
on the same (upcast) values. ``grad`` entries apply to gradients, which pass through one more
reduction than values.

float32: fast paths reorder float32 sums (chunking, FFT), so agreement is to a few ulps of the
  largest magnitude involved: rtol/atol near 1e-5 on O(1) values.
bfloat16: the output is rounded to bfloat16 (8 mantissa bits, relative spacing 2**-8 = 3.9e-3)
  after float32 accumulation, so a couple of bf16 ulps.
"""

import numpy as np

TOL = {
    "float32": {"value": dict(rtol=2e-5, atol=2e-5), "grad": dict(rtol=5e-5, atol=5e-5)},
    "bfloat16": {"value": dict(rtol=1e-2, atol=1e-2), "grad": dict(rtol=2e-2, atol=2e-2)},
}


def assert_close(actual, expected, dtype="float32", kind="value", err_msg=""):
    """Compares in float32 with the table's tolerance for ``dtype`` and ``kind``."""
    tol = TOL[str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype][kind]
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float32) if not np.iscomplexobj(actual) else np.asarray(actual),
        np.asarray(expected, dtype=np.float32)
        if not np.iscomplexobj(expected)
        else np.asarray(expected),
        err_msg=err_msg,
        **tol,
    )
