import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from effseq import sharding
from effseq.layers import params


class _Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = params.param(
            self, "w", nn.initializers.ones, (3, 4), (sharding.EMBED, sharding.MLP), jnp.float32
        )
        a = params.param(
            self, "a", nn.initializers.zeros, (4,), (sharding.STATE,), jnp.float32, group="ssm"
        )
        return x @ w + a


def test_tags_and_axes_survive_grad():
    variables = _Toy().init(jax.random.key(0), jnp.ones((2, 3)))
    assert params.ssm_mask(variables) == {"params": {"a": True, "w": False}}
    assert params.groups(variables) == {"params": {"a": "ssm", "w": None}}
    assert params.logical_axes(variables) == {"params": {"a": ("state",), "w": ("embed", "mlp")}}
    grads = jax.grad(lambda v: _Toy().apply(v, jnp.ones((2, 3))).sum())(variables)
    assert params.ssm_mask(grads) == params.ssm_mask(variables)
    assert params.groups(grads) == params.groups(variables)
    assert float(grads["params"]["a"].value.sum()) == 8.0  # d/da of the sum over 2 x 4 outputs


def test_unknown_group_is_refused():
    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            return params.param(
                self, "w", nn.initializers.ones, (3,), ("embed",), jnp.float32, group="fast"
            )

    with pytest.raises(ValueError, match="unknown parameter group 'fast'"):
        Bad().init(jax.random.key(0), jnp.ones(3))


def test_axis_count_must_match_rank():
    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            return params.param(self, "w", nn.initializers.ones, (3, 4), ("embed",), jnp.float32)

    with pytest.raises(ValueError, match=r"shape \(3, 4\) given 1 axis names \('embed',\)"):
        Bad().init(jax.random.key(0), jnp.ones(3))
