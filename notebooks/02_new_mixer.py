# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · A new mixer, from ops to training
#
# Prototyping loop: write a mixer from `effseq.ops`, check that its parallel form equals its
# recurrent step, register it by name, and train it against the package's own version of the
# same idea on multi-query associative recall (MQAR; Arora et al. 2023) through the ordinary
# trainer.
#
# A mixer is three pieces, and this notebook writes each: its maths as pure JAX functions (in
# the package, one file in `effseq/ops/`; here the existing `ops.linear_scan` does the work),
# one layer class that subclasses `effseq.layers.Mixer`, and one `register_mixer` line.
#
# The mixer is a small **RG-LRU**, the real-gated linear recurrent unit of Griffin (De et al.
# 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language
# Models", Sec. 2.4). Per channel, with learned Lambda and input-dependent gates:
#
#     r_t = sigmoid(x_t W_a),  i_t = sigmoid(x_t W_x)            recurrence and input gates
#     a_t = sigmoid(Lambda)^(c r_t), c = 8                       log a_t = -c r_t softplus(-Lambda)
#     h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
#
# The recurrence is a diagonal linear scan, which `effseq.ops.linear_scan` runs in parallel.
# Around it, a simplified form of Griffin's recurrent block (no short convolution, no biases,
# dense gates, the first token scaled like the others): y = (h * GELU(x W_g)) W_o. effseq
# ships the full block as the built-in mixer `"rglru"` (`effseq.layers.rglru.RGLRU`,
# recurrentgemma's `RecurrentBlock`, loadable from its weights with
# `effseq.convert.mixer_params`); the prototype here is registered as `"mini_rglru"` and
# trained beside it.
#
# Default sizes train each model for 400 steps: under a minute in all on a 2-core CPU.

# %%
import json
import os
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from effseq import ops
from effseq import sharding as ax
from effseq.configs import load_config, override
from effseq.layers import Mixer, params
from effseq.layers.masking import zero_padding
from effseq.layers.rglru import RGLRU
from effseq.models import MIXERS, register_mixer
from effseq.train.loop import train_and_evaluate

# Training steps per model (the MQAR experiment's own run is 600 steps at width 64).
STEPS = int(os.environ.get("EFFSEQ_NB_STEPS", "400"))

# %% [markdown]
# ## The layer
#
# The mixer interface (`effseq.layers.Mixer`): a subclass inherits the fields every model
# sets, `d_model`, `causal`, `max_len`, `dtype`, `param_dtype`, and defines
# `__call__(x, mask=None)` for training, `init_state` / `step` / `prefill` for decoding.
# The RG-LRU is causal only, so `setup` calls `require_causal()`, the one check every
# causal-only mixer shares.
# Parameters go through `effseq.layers.params.param`, which attaches logical axis names so
# that the trainer can shard them; Lambda is put in the optimizer group `"ssm"` (its own
# learning rate, no weight decay), like the S4 recipes treat a recurrence's decay parameters.


# %%
def _lambda_init(key, shape, dtype):
    """Lambda with a^c = sigmoid(Lambda)^c uniform in [0.9, 0.999], as Griffin initializes it."""
    a_c = jax.random.uniform(key, shape, jnp.float32, 0.9, 0.999)
    a = a_c ** (1 / MiniRGLRU.c)
    return jnp.log(a / (1 - a)).astype(dtype)


class MiniRGLRU(Mixer):
    """Real-gated linear recurrent unit with a GELU output gate: x (b, t, d) -> (b, t, d)."""

    c = 8.0  # a class constant, not a field: the paper fixes it

    def setup(self):
        self.require_causal()
        d, pd = self.d_model, self.param_dtype
        lecun = nn.initializers.lecun_normal()
        mat = (ax.EMBED, ax.INNER)
        self.w_a = params.param(self, "w_a", lecun, (d, d), mat, pd)
        self.w_x = params.param(self, "w_x", lecun, (d, d), mat, pd)
        self.w_g = params.param(self, "w_g", lecun, (d, d), mat, pd)
        self.w_o = params.param(self, "w_o", lecun, (d, d), (ax.INNER, ax.EMBED), pd)
        self.lam = params.param(self, "lam", _lambda_init, (d,), (ax.INNER,), pd, group="ssm")

    def _gates(self, x):
        """x (..., d) -> decay a, input b of h_t = a h_{t-1} + b, both float32 (..., d)."""
        x = x.astype(self.dtype)
        r = jax.nn.sigmoid((x @ self.w_a.astype(self.dtype)).astype(jnp.float32))
        i = jax.nn.sigmoid((x @ self.w_x.astype(self.dtype)).astype(jnp.float32))
        log_a = -self.c * r * jax.nn.softplus(-self.lam.astype(jnp.float32))
        # sqrt(1 - a^2) from log a without cancellation: 1 - exp(2 log a) = -expm1(2 log a).
        b = jnp.sqrt(-jnp.expm1(2 * log_a)) * i * x.astype(jnp.float32)
        return log_a, b

    def _output(self, x, h):
        gate = jax.nn.gelu(x.astype(self.dtype) @ self.w_g.astype(self.dtype))
        return (h.astype(self.dtype) * gate) @ self.w_o.astype(self.dtype)

    def _scan(self, x, mask=None):
        x = zero_padding(x, mask)
        log_a, b = self._gates(x)
        # Padded steps leave the state alone: a = 1 (log a = 0) and nothing added.
        a = jnp.exp(zero_padding(log_a, mask))
        h, h_last = ops.linear_scan(a, zero_padding(b, mask))
        return self._output(x, h), h_last

    def __call__(self, x, mask=None):
        return self._scan(x, mask)[0]

    def prefill(self, x, max_len):
        return self._scan(x)

    def init_state(self, batch, max_len):
        return jnp.zeros((batch, self.d_model), jnp.float32)

    def step(self, x_t, state):
        log_a, b = self._gates(x_t)
        state = jnp.exp(log_a) * state + b
        return self._output(x_t, state), state


# %% [markdown]
# ## Parallel form == recurrent step
#
# On a random input of prime length: the step loop, token by token, must reproduce the
# parallel form, and `prefill` over a prompt followed by steps must continue it exactly.
# Padding (mask False) on the right must not change the real positions.

# %%
layer = MiniRGLRU(d_model=16)
x = jax.random.normal(jax.random.key(0), (2, 37, 16))
variables = layer.init(jax.random.key(1), x)
y_parallel = layer.apply(variables, x)


def step(state, x_t):
    y_t, state = layer.apply(variables, x_t, state, method=MiniRGLRU.step)
    return state, y_t


state0 = layer.apply(variables, 2, 37, method=MiniRGLRU.init_state)
_, y_steps = jax.lax.scan(step, state0, jnp.swapaxes(x, 0, 1))
y_steps = jnp.swapaxes(y_steps, 0, 1)
np.testing.assert_allclose(y_parallel, y_steps, rtol=1e-5, atol=1e-5)

y_prompt, state = layer.apply(variables, x[:, :20], 37, method=MiniRGLRU.prefill)
_, y_rest = jax.lax.scan(step, state, jnp.swapaxes(x[:, 20:], 0, 1))
np.testing.assert_allclose(y_parallel[:, 20:], jnp.swapaxes(y_rest, 0, 1), rtol=1e-5, atol=1e-5)

padded = jnp.concatenate([x, jax.random.normal(jax.random.key(2), (2, 11, 16))], axis=1)
mask = jnp.arange(48) < 37
y_padded = layer.apply(variables, padded, jnp.broadcast_to(mask, (2, 48)))
np.testing.assert_allclose(y_padded[:, :37], y_parallel, rtol=1e-5, atol=1e-5)
print("parallel == step == prefill + step; padding ignored. max |diff|:", end=" ")
print(float(jnp.max(jnp.abs(y_parallel - y_steps))))

# %% [markdown]
# ## Register it
#
# After `register_mixer`, the name works wherever a built-in does: `model.mixer` in a config,
# hybrid patterns like `"mini_rglru,attention"`, `effseq compare --mixers`. It is causal
# only, so it is registered without a bidirectional form. `replace=True` lets this cell run
# again after the class above is edited (built-in names such as `"rglru"` cannot be
# replaced).

# %%
register_mixer("mini_rglru", MiniRGLRU, replace=True)
print(sorted(MIXERS))
full = RGLRU(d_model=16, num_heads=4)
n_full = sum(v.size for v in jax.tree.leaves(full.init(jax.random.key(1), x)))
n_mini = sum(v.size for v in jax.tree.leaves(variables))
print(f"parameters at d_model=16: prototype {n_mini:,d}, built-in rglru block {n_full:,d}")

# %% [markdown]
# ## Train on MQAR beside the built-in RG-LRU
#
# The built-in MQAR experiment (`--config mqar`, `effseq/experiments/mqar.py`), shrunk to
# notebook size: width 32, 4 key-value pairs in sequences of 32 tokens, 400 steps
# (`EFFSEQ_NB_STEPS` changes that).
# Everything else (2 layers, optimizer, schedule) is the experiment's. The trainer writes each
# run's metrics to a temporary workdir; the summary holds the test accuracy on the
# best-validation checkpoint.

# %%
workdir = pathlib.Path(tempfile.mkdtemp(prefix="effseq-nb02-"))
summaries, curves = {}, {}
for mixer in ("mini_rglru", "rglru"):
    config = load_config(f"mqar:{mixer}:32")
    config = override(
        config,
        [
            "task.options.seq_len=32",
            "task.options.num_kv_pairs=4",
            "task.options.vocab_size=32",
            f"task.options.num_examples={32 * STEPS}",
            "task.options.num_eval_examples=256",
            "train.batch_size=32",
            f"train.steps={STEPS}",
            f"train.log_every={max(STEPS // 20, 1)}",
            f"train.eval_every={max(STEPS // 4, 1)}",
            f"train.checkpoint_every={STEPS}",
            "train.progress=False",
        ],
    )
    summaries[mixer] = train_and_evaluate(config, workdir / mixer)
    lines = (workdir / mixer / "metrics.jsonl").read_text().splitlines()
    curves[mixer] = [json.loads(line) for line in lines]

for mixer, s in summaries.items():
    print(
        f"{mixer:10s} params {s['params']:7,d}  val {s['val_accuracy']:.3f}  "
        f"test {s['test_accuracy']:.3f}  {s['wall_s']:.0f} s"
    )

# %%
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 3.5))
for mixer, records in curves.items():
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/accuracy" in r]
    ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], label=mixer)
    ax_acc.plot([r["step"] for r in val], [r["val/accuracy"] for r in val], "o-", label=mixer)
ax_loss.set(title="MQAR training loss", xlabel="step")
ax_acc.set(title="MQAR validation accuracy", xlabel="step", ylim=(0, 1))
for a in (ax_loss, ax_acc):
    a.legend()
fig.tight_layout()

# %% [markdown]
# Both recurrent models hold the context in a fixed state of one float per channel and
# layer (the built-in block also keeps its conv's last 3 inputs), which bounds how many
# key-value pairs they can recall; attention, whose KV cache
# grows with the context, is the usual upper reference (add `"attention"` to the loop above).
# The printed accuracies are one seed at notebook size: they say whether each model learns,
# not which one is better. To sweep widths in this kernel, where the prototype is
# registered, call `effseq.compare.run_compare("mqar", mixers=("mini_rglru", "rglru"),
# out=...)`; `03_compare` reads its results.
