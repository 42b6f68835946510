"""ops.dense: one 2-D matmul equals tensordot, on values and both gradients."""

import jax
import pytest

from effseq.ops import dense, dense_reference
from tests.ops.compare import compare_with_reference


@pytest.mark.parametrize(
    "x_shape, w_shape, n_in",
    [
        ((2, 7, 5), (5, 3), 1),  # (b, t, d) @ (d, e)
        ((2, 7, 5), (5, 2, 3), 1),  # (b, t, d) @ (d, h, k): query/key/value heads
        ((2, 7, 2, 3), (2, 3, 5), 2),  # (b, t, h, k) @ (h, k, d): attention output
        ((3, 5), (5, 4), 1),  # (b, d): a decode step
        ((1, 1, 5), (5, 1), 1),  # t = 1, one output
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_matches_tensordot(x_shape, w_shape, n_in, dtype):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape).astype(dtype)
    w = jax.random.normal(kw, w_shape).astype(dtype)
    out, _ = compare_with_reference(
        lambda x, w: dense(x, w, n_in),
        lambda x, w: dense_reference(x, w, n_in),
        (x, w),
        dtype,
        jit=True,
        names=["x", "w"],
    )
    assert out.shape == x_shape[: len(x_shape) - n_in] + w_shape[n_in:]


@pytest.mark.parametrize(
    "x_shape, w_shape, n_in, match",
    [
        ((2, 7, 5), (4, 3), 1, r"last 1 axes of `x` \(2, 7, 5\) must match"),
        ((2, 7, 5), (5, 3), 0, "`n_in` must be an int in"),
        ((2, 7, 5), (5, 3), 3, "`n_in` must be an int in"),
    ],
)
def test_dense_errors_name_the_argument(x_shape, w_shape, n_in, match):
    with pytest.raises(ValueError, match=match):
        dense(jax.numpy.zeros(x_shape), jax.numpy.zeros(w_shape), n_in)
