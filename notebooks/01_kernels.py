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
# # 01 · Kernels: what each mixer remembers
#
# The long-range mixers in effseq differ in how the past reaches the present:
#
# * **S4D** (Gu et al. 2022) convolves with a kernel K[l] = 2 Re(sum_n C dB dA^l), fixed after
#   training; its shape is set by the initialization of A (LegS, Inv, Lin).
# * **SGConv** (Li et al. 2022) builds its kernel from short sub-kernels, each scale stretched
#   twice as far and damped.
# * **Mamba's selective scan** (Gu & Dao 2023) decays its state by exp(delta_t A), where
#   delta_t depends on the input: the model chooses when to forget.
# * **GLA** (Yang et al. 2023) decays each key channel by a data-dependent gate g_t in (0, 1].
# * **Mamba-2's SSD** (Dao & Gu 2024) has one decay per head: its whole sequence map is a
#   causal "attention" masked by a 1-semiseparable matrix.
# * **The gated delta rule** (Gated DeltaNet, Yang et al. 2025) overwrites what its state holds
#   for a key instead of adding to it.
# * **The RG-LRU** (Griffin, De et al. 2024) and **Based** (Arora et al. 2024) appear through
#   the identities their layers rely on: decays kept in [0.9, 0.999]^(8 r) by construction, and
#   a Taylor feature map whose inner product approximates exp(q . k).
#
# This notebook builds each kernel or decay with `effseq.ops` and the layers' own
# initializers, plots it, and checks the identities the layers rely on (the convolution equals
# the recurrence; the fast paths equal the slow references). Runs in well under a minute on a
# 2-core CPU.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from effseq import ops
from effseq.layers.based import taylor_features
from effseq.layers.gla import GLA
from effseq.layers.mamba import s4d_real_a_log_init
from effseq.layers.s4d import INITS, S4DKernel, init_imag

LENGTH = 512  # kernel length / sequence length t
CHANNELS = 4  # h
MODES = 32  # S4D complex modes n (the layer's default)
key = jax.random.key(0)

# %% [markdown]
# ## S4D kernels, one per initialization
#
# All three initializations set Re A = -1/2 and B = 1 and draw C ~ CN(0, 1); they differ in
# Im A, the oscillation frequencies of the modes. LegS and Inv concentrate them at low
# frequencies with a long tail; Lin spaces them evenly, like a Fourier basis.

# %%
kernels, layers = {}, {}
for init in INITS:
    layer = S4DKernel(channels=CHANNELS, state_size=MODES, init_method=init)
    variables = layer.init(key, LENGTH, method=S4DKernel.kernel)
    kernels[init] = np.asarray(layer.apply(variables, LENGTH, method=S4DKernel.kernel))
    layers[init] = (layer, variables)

fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
for init in INITS:
    axes[0].plot(init_imag(init, MODES), ".", label=init)
axes[0].set(title="Im A per mode", xlabel="mode", yscale="symlog")
axes[0].legend()
for ax, init in zip(axes[1:], INITS, strict=True):
    for h in range(2):
        ax.plot(kernels[init][h], lw=0.8, label=f"channel {h}")
    ax.set(title=f"S4D-{init} kernel", xlabel="lag l")
    ax.legend(fontsize="small")
fig.tight_layout()

# %% [markdown]
# ### The convolution equals the recurrence
#
# Training runs the parallel form y = K * u (an FFT convolution); decoding runs the
# recurrence x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(C x_t) one token at a time. They are the
# same map (S4D paper, eq. 3-5); below both run on a random input, and the state that the
# recurrence ends in is compared with `s4d_final_state`, the parallel prefill.

# %%
layer, variables = layers["legs"]
u = jax.random.normal(jax.random.key(1), (2, LENGTH, CHANNELS))
y_conv = ops.causal_conv(u, jnp.asarray(kernels["legs"]))
dA, dB, C = layer.apply(variables, method=S4DKernel.discrete)


def recurrence(x, u_t):
    return ops.s4d_step(x, u_t, dA, dB, C)


x0 = jnp.zeros((2, CHANNELS, MODES), jnp.complex64)
x_last, y_rec = jax.lax.scan(recurrence, x0, jnp.swapaxes(u, 0, 1))
y_rec = jnp.swapaxes(y_rec, 0, 1)
x_prefill = layer.apply(variables, u, method=S4DKernel.final_state)

print("max |conv - recurrence|:", float(jnp.max(jnp.abs(y_conv - y_rec))))
print("max |prefill state - stepped state|:", float(jnp.max(jnp.abs(x_prefill - x_last))))
np.testing.assert_allclose(y_conv, y_rec, rtol=1e-4, atol=1e-4)
np.testing.assert_allclose(x_prefill, x_last, rtol=1e-4, atol=1e-4)

fig, ax = plt.subplots(figsize=(10, 2.5))
ax.plot(y_conv[0, :, 0], label="convolution (parallel)")
ax.plot(y_rec[0, :, 0], "--", label="recurrence (step by step)")
ax.set(title="S4D-LegS, channel 0", xlabel="t")
ax.legend()

# %% [markdown]
# ## SGConv kernel
#
# s sub-kernels of `kernel_dim` taps; sub-kernel i is stretched by 2^max(0, i-1) with linear
# interpolation and damped by 2^-i, so s * kernel_dim parameters cover
# kernel_dim * 2^(s-1) lags. Each scale is drawn in its own colour below, with its stretch.

# %%
KERNEL_DIM = 16
scales = 1
while ops.sgconv_length(scales, KERNEL_DIM) < LENGTH:
    scales += 1
sub_kernels = jax.random.normal(jax.random.key(2), (scales, CHANNELS, KERNEL_DIM))
k_sg = ops.sgconv_kernel(sub_kernels, LENGTH)
np.testing.assert_allclose(
    k_sg, ops.sgconv_kernel_reference(sub_kernels, LENGTH), rtol=1e-6, atol=1e-6
)
print(f"{scales} scales x {KERNEL_DIM} taps = {scales * KERNEL_DIM} parameters for {LENGTH} lags")

fig, ax = plt.subplots(figsize=(10, 3))
for i in range(scales):
    # Scale i covers lags [sgconv_length(i), sgconv_length(i + 1)): the scales do not overlap.
    lags = np.arange(ops.sgconv_length(i, KERNEL_DIM), ops.sgconv_length(i + 1, KERNEL_DIM))
    lags = lags[lags < LENGTH]
    ax.plot(lags, k_sg[0, lags], lw=1, label=f"scale {i}: x{2 ** max(0, i - 1)}")
ax.set(title="SGConv kernel, channel 0", xlabel="lag l")
ax.legend(fontsize="small", ncol=scales)

# %% [markdown]
# ## Selective scan: input-dependent decay
#
# With Mamba's S4D-Real initialization A_n = -(n + 1), state n is multiplied by
# exp(delta_t A_n) at step t. The response at time t to an impulse read at time s is
# delta_s exp(A_n sum_{s<r<=t} delta_r): a small delta keeps the past, a large delta wipes it.
# Below, delta is small except for a burst at t = 120, which "selects" that token and flushes
# the memory of the impulse read at t = 20. The scan's output is checked against that closed
# form.

# %%
T, STATES = 256, 8
A = -jnp.exp(s4d_real_a_log_init(None, (1, STATES)))  # (d=1, n): -1, -2, ..., -8
delta = jnp.full((1, T, 1), 0.01).at[0, 120:124, 0].set(1.0)
u_imp = jnp.zeros((1, T, 1)).at[0, 20, 0].set(1.0)
responses = []
for n in range(STATES):
    C_n = jnp.zeros((1, T, STATES)).at[..., n].set(1.0)  # read out state n alone
    y, _ = ops.selective_scan(u_imp, delta, A, jnp.ones((1, T, STATES)), C_n)
    responses.append(np.asarray(y[0, :, 0]))
responses = np.stack(responses)

steps = np.asarray(delta[0, :, 0])
cum = np.concatenate([[0.0], np.cumsum(steps)])  # cum[t + 1] = sum_{r <= t} delta_r
t_idx = np.arange(T)
expected = np.where(
    t_idx >= 20, steps[20] * np.exp(np.asarray(A[0])[:, None] * (cum[t_idx + 1] - cum[21])), 0.0
)
np.testing.assert_allclose(responses, expected, rtol=1e-4, atol=1e-7)

fig, ax = plt.subplots(figsize=(10, 3))
for n in (0, 3, 7):
    ax.plot(responses[n] / steps[20], label=f"state {n} (A = {float(A[0, n]):.0f})")
ax.axvspan(120, 124, color="gray", alpha=0.3, label="large delta")
ax.set(title="Selective scan: memory of an impulse at t = 20", xlabel="t", ylabel="decay")
ax.legend(fontsize="small")

# %% [markdown]
# ## GLA: data-dependent gates
#
# GLA's gate alpha_t = sigmoid(x W)^(1/tau) decays every key channel of the (k, v) state.
# The gate logit normalizer tau = 16 keeps alpha close to 1 at initialization, so a freshly
# initialized layer remembers hundreds of steps; tau = 1 forgets within a few. The gates come
# from the layer's own `log_gate` on random inputs. The chunked form of the op is checked
# against its step-by-step reference with these gates.

# %%
D_MODEL, T_GLA = 64, 256
x = jax.random.normal(jax.random.key(3), (1, T_GLA, D_MODEL))
fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
for tau in (1.0, 16.0):
    gla = GLA(d_model=D_MODEL, gate_logit_normalizer=tau)
    gla_vars = gla.init(key, x)
    log_g = gla.apply(gla_vars, x, method=GLA.log_gate)  # (b, t, h, k), <= 0
    axes[0].hist(np.exp(np.asarray(log_g)).ravel(), bins=60, alpha=0.6, label=f"tau = {tau:g}")
    decay = np.exp(np.cumsum(np.asarray(log_g[0, :, 0, :4]), axis=0))  # head 0, 4 key channels
    axes[1].plot(decay, color="C0" if tau == 1.0 else "C1", lw=0.8)
axes[0].set(title="per-step gates alpha_t", xlabel="alpha")
axes[0].legend()
axes[1].set(
    title="cumulative decay prod alpha (C0: tau = 1, C1: tau = 16)",
    xlabel="t",
    yscale="log",
    ylim=(1e-8, 2),
)
fig.tight_layout()

heads, dk = log_g.shape[2], log_g.shape[3]
q, k, v = jax.random.normal(jax.random.key(4), (3, 1, T_GLA, heads, dk))
o_fast, s_fast = ops.gated_linear_attention(q, k, v, log_g)
o_ref, s_ref = ops.gated_linear_attention_reference(q, k, v, log_g)
np.testing.assert_allclose(o_fast, o_ref, rtol=1e-4, atol=1e-4)
np.testing.assert_allclose(s_fast, s_ref, rtol=1e-4, atol=1e-4)
print("GLA chunked == reference; max |o| difference:", float(jnp.max(jnp.abs(o_fast - o_ref))))

# %% [markdown]
# ## Mamba-2's SSD: a masked attention
#
# With one scalar decay per head, SSD's output is y = (L o C B^T)(dt x) + D x, where
# L[t, s] = exp(A (dt_{s+1} + ... + dt_t)) for s <= t: the 1-semiseparable mask of the
# state space duality. Below, the mask for A = -1 with step sizes around 0.1, a burst of large
# steps at t = 40 (which cuts every earlier position off), and the check that the chunked op
# equals both that quadratic form and its step-by-step reference.

# %%
T_SSD, P, N = 96, 4, 8
kx, kb, kc = jax.random.split(jax.random.key(5), 3)
x_ssd = jax.random.normal(kx, (1, T_SSD, 1, P))
B_ssd, C_ssd = (jax.random.normal(k_, (1, T_SSD, 1, N)) for k_ in (kb, kc))
dt = jnp.full((1, T_SSD, 1), 0.1).at[0, 40:43].set(5.0)
A_ssd = jnp.array([-1.0])
y_chunked, _ = ops.ssd(x_ssd, dt, A_ssd, B_ssd, C_ssd, chunk_size=16)
y_ref, _ = ops.ssd_reference(x_ssd, dt, A_ssd, B_ssd, C_ssd)

cum = np.cumsum(np.asarray(dt[0, :, 0]))
L = np.tril(np.exp(float(A_ssd[0]) * (cum[:, None] - cum[None, :])))
scores = np.asarray(C_ssd[0, :, 0]) @ np.asarray(B_ssd[0, :, 0]).T
y_quadratic = (L * scores) @ (np.asarray(dt[0, :, 0])[:, None] * np.asarray(x_ssd[0, :, 0]))
np.testing.assert_allclose(y_chunked[0, :, 0], y_quadratic, rtol=1e-4, atol=1e-4)
np.testing.assert_allclose(y_chunked, y_ref, rtol=1e-4, atol=1e-4)
print("SSD chunked == quadratic (masked attention) form == reference")

fig, ax = plt.subplots(figsize=(4.5, 4))
ax.imshow(L, cmap="viridis")
ax.set(title="SSD mask L[t, s] (A = -1)", xlabel="s (source)", ylabel="t (target)")

# %% [markdown]
# ## The gated delta rule overwrites
#
# Linear attention adds k^T v to its state, so writing the same key twice recalls the sum of
# the two values. The delta rule first reads what the state holds for k and writes
# beta (v - k S): with beta = 1 and a unit key, reading k afterwards returns the latest value
# exactly. Below, one key written with ten different values in turn: GLA's recall (gates 1)
# drifts with every write, the delta rule's equals the last value. The chunked op is checked
# against its reference on the same input.

# %%
T_DR, KD, VD = 10, 16, 4
key_vec = jax.random.normal(jax.random.key(6), (KD,))
key_vec = key_vec / jnp.linalg.norm(key_vec)
k_dr = jnp.broadcast_to(key_vec, (1, T_DR, 1, KD))
v_dr = jax.random.normal(jax.random.key(7), (1, T_DR, 1, VD))
q_dr = k_dr * jnp.sqrt(KD)  # undo the default query scale k^-1/2: read exactly S^T k
zeros = jnp.zeros((1, T_DR, 1))
o_delta, _ = ops.gated_delta_rule(q_dr, k_dr, v_dr, zeros, jnp.ones((1, T_DR, 1)), chunk_size=4)
o_delta_ref, _ = ops.gated_delta_rule_reference(q_dr, k_dr, v_dr, zeros, jnp.ones((1, T_DR, 1)))
o_linear, _ = ops.gated_linear_attention(q_dr, k_dr, v_dr, jnp.zeros_like(k_dr))
np.testing.assert_allclose(o_delta, o_delta_ref, rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(o_delta[0, :, 0], v_dr[0, :, 0], rtol=1e-5, atol=1e-5)
err_delta = np.linalg.norm(np.asarray(o_delta - v_dr)[0, :, 0], axis=-1)
err_linear = np.linalg.norm(np.asarray(o_linear - v_dr)[0, :, 0], axis=-1)
print("recall error |read - latest value| per write:")
print("  delta rule:       ", np.round(err_delta, 6))
print("  linear attention: ", np.round(err_linear, 2))

# %% [markdown]
# ## RG-LRU decays and Based's feature map
#
# The RG-LRU computes log a_t = -8 r_t softplus(Lambda) with a recurrence gate r_t in (0, 1),
# so each step's decay a_t lies between 1 (r_t = 0: the state is kept as it is) and a^8, where
# a = exp(-softplus(Lambda)) starts in [0.9, 0.999]: at r_t = 1 the slowest channels still
# keep 0.999^8 = 0.992 per step, a memory of about 125 steps (1 / -log 0.992).
# Based replaces exp(q . k / sqrt(f)) by its second-order Taylor polynomial through a feature
# map phi with phi(q) . phi(k) = 1 + s + s^2 / 2; it is positive everywhere (so the normaliser
# never vanishes) and close to exp(s) for |s| < 1.

# %%
a0 = np.array([0.9, 0.99, 0.999])
r = np.linspace(0, 1, 5)
print("per-step decay a^(8 r) for a in", a0)
for r_i in r:
    print(f"  r = {r_i:.2f}: {np.round(a0 ** (8 * r_i), 4)}")

f = 16
qk = jax.random.normal(jax.random.key(8), (2, 200, f)) * jnp.linspace(0, 1.5, 200)[None, :, None]
s_dot = jnp.sum(qk[0] * qk[1], -1) / jnp.sqrt(f)
taylor = jnp.sum(taylor_features(qk[0]) * taylor_features(qk[1]), -1)
np.testing.assert_allclose(taylor, 1 + s_dot + s_dot**2 / 2, rtol=1e-5, atol=1e-5)
order = np.argsort(np.asarray(s_dot))
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(np.asarray(s_dot)[order], np.exp(np.asarray(s_dot))[order], label="exp(s)")
ax.plot(np.asarray(s_dot)[order], np.asarray(taylor)[order], "--", label="phi(q) . phi(k)")
ax.set(title="Based: Taylor map vs exp", xlabel="s = q . k / sqrt(f)")
ax.legend()
