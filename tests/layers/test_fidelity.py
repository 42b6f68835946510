"""Paper fidelity of the mixers: initial values and forward maths checked against the papers.

Every expected value here is computed from the paper's formulas (or the authors' released code
where the paper leaves a detail open), independently of effseq's own helpers:

* S4D: Gu, Gupta, Goel & Re 2022, "On the Parameterization and Initialization of Diagonal State
  Space Models", sec. 3 (discretization, eq. 3-5) and sec. 4 (S4D-LegS / Inv / Lin); the
  minimal S4D of the state-spaces/s4 repository for C, D and the output layer.
* SGConv: Li, Cai, Zhang, Chen & Dey 2022, "What Makes Convolutional Models Great on Long
  Sequence Modeling?", sec. 3.1; the released gconv_standalone.py for the number of scales.
* Mamba: Gu & Dao 2023, sec. 3.4-3.6 and mamba_simple.py's defaults.
* GLA: Yang, Wang, Shen, Panda & Kim 2023, sec. 4.4.
* Attention: RoFormer (Su et al. 2021) rotary embeddings; Primer (So et al. 2021).

Forward references are float64 NumPy loops over time written from the equations, not from the
layers' vectorized code.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effseq.layers.attention import Attention, rotary
from effseq.layers.gla import GLA
from effseq.layers.mamba import Mamba
from effseq.layers.s4d import S4D
from effseq.layers.sgconv import SGConv
from effseq.models.blocks import MLP
from tests.tolerances import assert_close


def _touch(module):
    """Reads one attribute set up in ``setup``, so ``init`` creates every parameter of the
    layer (and of its S4D kernel submodules) without running a forward pass."""
    if isinstance(module, S4D):
        return [module.kernel.log_dt] + ([module.kernel_bwd.log_dt] if not module.causal else [])
    return getattr(module, {SGConv: "D", Mamba: "in_proj", GLA: "wq", Attention: "w"}[type(module)])


def _params(module, t=6, b=2, seed=0):
    """Initializes ``module``; returns (unboxed float64 params, x (b, t, d), variables)."""
    x = jax.random.normal(jax.random.key(seed + 1), (b, t, module.d_model))
    variables = module.init(jax.random.key(seed), method=_touch)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])
    return p, x, variables


def _ks_uniform(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of samples u from U[0, 1]."""
    u = np.sort(u.ravel())
    n = u.size
    return float(max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n)))


def _gelu_exact(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _silu(x):
    return x * _sigmoid(x)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _causal_conv(x, k):
    """y[b, t, h] = sum_{s <= t} k[h, s] x[b, t - s, h]; x (b, t, h), k (h, l), zero past l."""
    b, t, h = x.shape
    y = np.zeros((b, t, h))
    for i in range(t):
        for s in range(min(i + 1, k.shape[1])):
            y[:, i] += k[:, s] * x[:, i - s]
    return y


def _conv_output(y, x, p, glu, gelu):
    """Output layer of the S4D / SGConv code: Linear(GELU(y + D x)), then GLU(a, g) = a sig(g)."""
    z = gelu(y + x * p["D"]) @ p["out_kernel"] + p["out_bias"]
    if glu:
        a, g = np.split(z, 2, axis=-1)
        z = a * _sigmoid(g)
    return z


# ---------------------------------------------------------------------------------------------
# S4D


def _hippo_legs(N: int) -> np.ndarray:
    """HiPPO-LegS transition A (N x N), as defined in HiPPO (Gu et al. 2020, eq. for LegS):
    A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 for n < k."""
    A = np.zeros((N, N))
    for n in range(N):
        for k in range(N):
            if n > k:
                A[n, k] = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
            elif n == k:
                A[n, k] = -(n + 1)
    return A


def _s4d_kernel_params(p):
    k = p["kernel"]
    A = -np.exp(k["log_A_real"]) + 1j * k["A_imag"]
    B = k["B"][..., 0] + 1j * k["B"][..., 1]
    C = k["C"][..., 0] + 1j * k["C"][..., 1]
    return np.exp(k["log_dt"]), A, B, C


def test_s4d_lin_and_inv_imaginary_parts_and_real_part():
    """S4D-Lin: A_n = -1/2 + i pi n. S4D-Inv: A_n = -1/2 + i (N/pi)(N/(2n+1) - 1) with N = 2n
    real states (n stored modes of conjugate pairs), n = 0 .. N/2 - 1 (paper sec. 4)."""
    d_model, n = 3, 16
    N = 2 * n
    idx = np.arange(n)
    expected = {
        "lin": np.pi * idx,
        "inv": (N / np.pi) * (N / (2 * idx + 1) - 1),
    }
    for init, imag in expected.items():
        p, _, _ = _params(S4D(d_model=d_model, state_size=n, init_method=init))
        _, A, _, _ = _s4d_kernel_params(p)
        assert A.shape == (d_model, n)
        np.testing.assert_allclose(A.imag, np.broadcast_to(imag, A.shape), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(A.real, -0.5, rtol=1e-6)


def test_s4d_legs_is_the_spectrum_of_hippo_legs_normal_part():
    """S4D-LegS: the eigenvalues of the normal part of HiPPO-LegS, A + P P^T with
    P_n = sqrt(n + 1/2) (S4 sec. 3.3), keeping one of each conjugate pair (S4D sec. 4)."""
    n = 16
    N = 2 * n
    P = np.sqrt(np.arange(N) + 0.5)
    eig = np.linalg.eigvals(_hippo_legs(N) + np.outer(P, P))
    np.testing.assert_allclose(eig.real, -0.5, atol=1e-8)
    positive = np.sort(eig.imag[eig.imag > 0])
    assert positive.size == n

    p, _, _ = _params(S4D(d_model=3, state_size=n, init_method="legs"))
    _, A, _, _ = _s4d_kernel_params(p)
    np.testing.assert_allclose(A.real, -0.5, rtol=1e-6)
    for row in A.imag:
        np.testing.assert_allclose(np.sort(row), positive, rtol=1e-5)


def test_s4d_dt_B_C_D_initialization():
    """dt log-uniform in [dt_min, dt_max] (S4 and S4D); B = 1 (S4D sec. 4); C ~ CN(0, 1), i.e.
    real and imaginary parts N(0, 1/2), as torch.randn with cfloat in the S4D code; D ~ N(0, 1).
    A non-default dt range shows the bounds are the layer's fields."""
    h, n, dt_min, dt_max = 2048, 8, 1e-4, 1e-2
    p, _, _ = _params(S4D(d_model=h, state_size=n, dt_min=dt_min, dt_max=dt_max, glu=False))
    dt, _, B, C = _s4d_kernel_params(p)
    assert dt.shape == (h,)
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    u = (np.log(dt) - math.log(dt_min)) / (math.log(dt_max) - math.log(dt_min))
    # KS critical value at n = 2048, alpha = 1e-3: 1.95 / sqrt(n) = 0.043.
    assert _ks_uniform(u) < 0.043
    # Uniform in dt itself would crowd the top decade; log-uniform puts half below the midpoint.
    assert abs(np.mean(dt < math.sqrt(dt_min * dt_max)) - 0.5) < 0.05
    np.testing.assert_array_equal(B, np.ones((h, n)))
    # 16384 complex samples: the variance estimates have standard error 0.0055.
    assert abs(C.real.mean()) < 0.03 and abs(C.imag.mean()) < 0.03
    assert abs(C.real.var() - 0.5) < 0.03 and abs(C.imag.var() - 0.5) < 0.03
    assert abs(np.mean(C.real * C.imag)) < 0.03
    D = p["D"]
    assert D.shape == (h,)
    assert abs(D.mean()) < 0.1 and abs(D.var() - 1.0) < 0.15


@pytest.mark.parametrize("discretization, glu", [("zoh", True), ("bilinear", False)])
def test_s4d_forward_matches_paper(discretization, glu):
    """y = Out(GELU(K * x + D x)) with K_l = 2 Re(sum_n C_n dB_n dA_n^l) (paper eq. 5) and
    ZOH: dA = exp(dt A), dB = (exp(dt A) - 1) / A * B; bilinear: dA = (1 + dt A/2)/(1 - dt A/2),
    dB = dt B / (1 - dt A/2) (sec. 3.1)."""
    module = S4D(d_model=5, state_size=4, discretization=discretization, glu=glu, init_method="lin")
    p, x, variables = _params(module, t=9)
    dt, A, B, C = _s4d_kernel_params(p)
    dtA = dt[:, None] * A
    if discretization == "zoh":
        dA, dB = np.exp(dtA), (np.exp(dtA) - 1) / A * B
    else:
        dA, dB = (1 + dtA / 2) / (1 - dtA / 2), dt[:, None] * B / (1 - dtA / 2)
    t = x.shape[1]
    K = np.stack([2 * np.real(np.sum(C * dB * dA**l, -1)) for l in range(t)], -1)
    xs = np.asarray(x, np.float64)
    expected = _conv_output(_causal_conv(xs, K), xs, p, glu, _gelu_exact)
    assert_close(jax.jit(module.apply)(variables, x), expected)


def test_s4d_output_gelu_is_exact():
    module = S4D(d_model=5, state_size=4, init_method="lin")
    p, x, variables = _params(module, t=9)
    dt, A, B, C = _s4d_kernel_params(p)
    dA, dB = np.exp(dt[:, None] * A), np.expm1(dt[:, None] * A) / A * B
    K = np.stack([2 * np.real(np.sum(C * dB * dA**l, -1)) for l in range(9)], -1)
    xs = np.asarray(x, np.float64) * 4  # larger pre-activations, where the approximation errs
    expected = _conv_output(_causal_conv(xs, K), xs, p, True, _gelu_exact)
    assert_close(module.apply(variables, jnp.asarray(xs, jnp.float32)), expected)


def test_s4d_default_state_size_is_the_papers():
    p, _, _ = _params(S4D(d_model=2))
    assert p["kernel"]["A_imag"].shape == (2, 32)


# ---------------------------------------------------------------------------------------------
# SGConv


@pytest.mark.parametrize(
    "max_len, kernel_dim",
    [(65, 64), (1000, 64), (1024, 64), (1025, 64), (2048, 32), (4096, 64), (16384, 32)],
)
def test_sgconv_number_of_scales_from_max_len(max_len, kernel_dim):
    """s = 1 + ceil(log2(L / kernel_dim)) (the released code), the fewest scales whose
    concatenated kernel, of length kernel_dim * 2**(s-1), covers L."""
    expected = 1 + math.ceil(math.log2(max_len / kernel_dim))
    module = SGConv(d_model=2, max_len=max_len, kernel_dim=kernel_dim)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 3, 2)))
    assert nn.unbox(shapes)["params"]["sub_kernels"].shape == (expected, 2, kernel_dim)
    assert kernel_dim * 2 ** (expected - 1) >= max_len > kernel_dim * 2 ** (expected - 2)


def _sgconv_reference_kernel(w, decay):
    """Paper sec. 3.1: K = cat_i(alpha^i Upsample_{2^max(i-1,0)}(w_i)) / Z, alpha = 1/decay,
    linear upsampling with half-pixel centres (torch interpolate, align_corners=False),
    Z the per-channel L2 norm of the full-length kernel."""
    s, h, d = w.shape
    pieces = []
    for i in range(s):
        f = 2 ** max(i - 1, 0)
        src = (np.arange(d * f) + 0.5) / f - 0.5
        up = np.stack([np.interp(src, np.arange(d), w[i, c]) for c in range(h)])
        pieces.append(up / decay**i)
    K = np.concatenate(pieces, -1)
    return K / np.linalg.norm(K, axis=-1, keepdims=True)


def test_sgconv_forward_matches_paper():
    """Kernel assembly, decay, normalization at init, then the S4-style output layer; t = 40
    runs past the natural kernel length (32): the kernel is zero beyond it."""
    t = 40
    module = SGConv(d_model=3, max_len=30, kernel_dim=4)  # s = 1 + ceil(log2(7.5)) = 4
    p, x, variables = _params(module, t=t)
    assert p["sub_kernels"].shape[0] == 4
    K = _sgconv_reference_kernel(p["sub_kernels"], decay=2.0)
    assert K.shape[-1] == 32
    np.testing.assert_allclose(np.linalg.norm(K, axis=-1), 1.0)
    K = np.pad(K, ((0, 0), (0, max(0, t - 32))))
    xs = np.asarray(x, np.float64)
    expected = _conv_output(_causal_conv(xs, K), xs, p, True, _gelu_exact)
    assert_close(jax.jit(module.apply)(variables, x), expected)


def test_sgconv_init_distributions():
    """Sub-kernels and D standard normal (released code, torch.randn)."""
    p, _, _ = _params(SGConv(d_model=256, max_len=1024, kernel_dim=64, glu=False))
    w = p["sub_kernels"]
    assert w.shape == (5, 256, 64)
    assert abs(w.mean()) < 0.02 and abs(w.var() - 1.0) < 0.03
    assert abs(p["D"].var() - 1.0) < 0.3


# ---------------------------------------------------------------------------------------------
# Mamba


def test_mamba_initialization_matches_mamba_simple():
    """expand 2, d_conv 4, dt_rank ceil(d/16); A = -(1, 2, ..., n) in every row (S4D-Real);
    D = 1; softplus(dt_bias) = dt log-uniform in [dt_min, dt_max]; dt_proj uniform in +-r^-1/2
    (dt_init="random"); the depthwise conv's weight and bias uniform in +-1/sqrt(fan_in),
    fan_in = 4 (torch Conv1d default)."""
    d, n, dt_min, dt_max = 1000, 4, 1e-2, 1.0  # a non-default dt range
    p, _, _ = _params(Mamba(d_model=d, state_size=n, dt_min=dt_min, dt_max=dt_max))
    e, r = 2 * d, 63  # ceil(1000 / 16) = ceil(62.5)
    assert p["in_proj"].shape == (d, 2 * e)
    assert p["conv_kernel"].shape == (e, 4)
    assert p["x_proj_dt"].shape == (e, r)
    assert p["dt_proj"].shape == (r, e)
    assert p["out_proj"].shape == (e, d)
    A = -np.exp(p["A_log"])
    np.testing.assert_allclose(A, np.broadcast_to(-(np.arange(n) + 1.0), (e, n)), rtol=1e-6)
    np.testing.assert_array_equal(p["D"], 1.0)

    dt = _softplus(p["dt_bias"])
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    u = (np.log(dt) - math.log(dt_min)) / (math.log(dt_max) - math.log(dt_min))
    assert _ks_uniform(u) < 0.044  # KS critical value, n = 2000, alpha = 1e-3

    def uniform_in(w, bound):
        assert np.abs(w).max() <= bound
        assert abs(w.var() - bound**2 / 3) < 0.05 * bound**2 / 3

    uniform_in(p["dt_proj"], r**-0.5)
    uniform_in(p["conv_kernel"], 0.5)
    uniform_in(p["conv_bias"], 0.5)


def test_mamba_forward_matches_paper():
    """Sec. 3.4 block and Algorithm 2: [x, z] = W_in x; u = SiLU(causal depthwise conv(x) + b);
    dt, B, C = projections of u; delta = softplus(W_dt dt + bias); h_t = exp(delta A) h + delta
    B u; y = C h + D u; out = W_out (y * SiLU(z))."""
    module = Mamba(d_model=6, state_size=3, chunk_size=4)
    p, x, variables = _params(module, t=9)
    xs = np.asarray(x, np.float64)
    b, t, _ = xs.shape
    xi, z = np.split(xs @ p["in_proj"], 2, axis=-1)
    u = _silu(_causal_conv(xi, p["conv_kernel"]) + p["conv_bias"])
    delta = _softplus(u @ p["x_proj_dt"] @ p["dt_proj"] + p["dt_bias"])
    Bt, Ct = u @ p["x_proj_B"], u @ p["x_proj_C"]
    A = -np.exp(p["A_log"])  # (e, n)
    h = np.zeros((b,) + A.shape)
    ys = []
    for i in range(t):
        dA = np.exp(delta[:, i, :, None] * A)
        h = dA * h + (delta[:, i] * u[:, i])[..., None] * Bt[:, i, None, :]
        ys.append(np.einsum("ben,bn->be", h, Ct[:, i]) + p["D"] * u[:, i])
    y = np.stack(ys, 1)
    expected = (y * _silu(z)) @ p["out_proj"]
    assert_close(jax.jit(module.apply)(variables, x), expected)


# ---------------------------------------------------------------------------------------------
# GLA


@pytest.mark.parametrize("d_model, heads", [(64, 4), (96, 4), (32, 2)])
def test_gla_head_dims_follow_the_paper(d_model, heads):
    """d_k = d/2 and d_v = d in total (expand_k 0.5, expand_v 1), split over heads; gate
    projection of rank 16 to the key width (sec. 4.4)."""
    module = GLA(d_model=d_model, num_heads=heads)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2, d_model)))
    p = nn.unbox(shapes)["params"]
    dk, dv = d_model // 2 // heads, d_model // heads
    assert p["wq"].shape == p["wk"].shape == (d_model, heads, dk)
    assert p["wv"].shape == p["wr"].shape == (d_model, heads, dv)
    assert p["wo"].shape == (heads, dv, d_model)
    assert p["gate_down"].shape == (d_model, 16)
    assert p["gate_up"].shape == (16, heads, dk)


def test_gla_forward_matches_paper():
    """Sec. 4.4: alpha_t = sigmoid(x W_a1 W_a2 + b_a)^(1/16); S_t = diag(alpha_t) S_{t-1} +
    k_t^T v_t; o_t = q_t S_t / sqrt(d_k); y = (Swish(x W_r + b_r) * LN_head(o)) W_O."""
    module = GLA(d_model=16, num_heads=2, chunk_size=4)
    p, x, variables = _params(module, t=11)
    # Non-zero biases and norm parameters so the test sees where each is added.
    rng = np.random.default_rng(0)
    for name in ("gate_bias", "br", "norm_scale", "norm_bias"):
        p[name] = p[name] + rng.normal(size=p[name].shape)
    boxed = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    variables = {"params": boxed}
    xs = np.asarray(x, np.float64)
    b, t, _ = xs.shape
    q = np.einsum("btd,dhk->bthk", xs, p["wq"])
    k = np.einsum("btd,dhk->bthk", xs, p["wk"])
    v = np.einsum("btd,dhv->bthv", xs, p["wv"])
    logits = np.einsum("btr,rhk->bthk", xs @ p["gate_down"], p["gate_up"]) + p["gate_bias"]
    alpha = _sigmoid(logits) ** (1 / 16)
    dk = q.shape[-1]
    S = np.zeros((b, 2, dk, v.shape[-1]))
    outs = []
    for i in range(t):
        S = alpha[:, i, :, :, None] * S + np.einsum("bhk,bhv->bhkv", k[:, i], v[:, i])
        outs.append(np.einsum("bhk,bhkv->bhv", q[:, i] / math.sqrt(dk), S))
    o = np.stack(outs, 1)
    mu = o.mean(-1, keepdims=True)
    o = (o - mu) / np.sqrt(((o - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    o = o * p["norm_scale"] + p["norm_bias"]
    r = _silu(np.einsum("btd,dhv->bthv", xs, p["wr"]) + p["br"])
    expected = np.einsum("bthv,hvd->btd", r * o, p["wo"])
    assert_close(jax.jit(module.apply)(variables, x), expected)


# ---------------------------------------------------------------------------------------------
# Attention (RoFormer rotary, Primer)


def test_rotary_scores_depend_only_on_relative_position():
    """RoFormer eq. 16: <R_m q, R_n k> is a function of m - n only; R_0 is the identity; R_m
    is a rotation (norm preserving); frequencies base^(-2i/k)."""
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, 1, 1, 8))
    k = jax.random.normal(kk, (1, 1, 1, 8))

    def score(m, n):
        rq = rotary(q, jnp.array([[m]]), 10000.0)
        rk = rotary(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(rq * rk))

    assert_close(score(5, 2), score(13, 10))
    assert_close(score(0, 7), score(100, 107))
    assert abs(score(5, 2) - score(5, 3)) > 1e-3
    assert_close(rotary(q, jnp.array([[0]]), 10000.0), q)
    rotated = rotary(q, jnp.array([[37]]), 10000.0)
    assert_close(jnp.linalg.norm(rotated), jnp.linalg.norm(q))
    # A unit vector in the first coordinate of pair i turns by angle theta_i per position.
    half = 4
    for i in range(half):
        e = jnp.zeros((1, 1, 1, 8)).at[..., i].set(1.0)
        out = np.asarray(rotary(e, jnp.array([[1]]), 10000.0))[0, 0, 0]
        theta = 10000.0 ** (-2 * i / 8)
        norm_pair = math.hypot(out[i], out[i + half])
        assert_close(norm_pair, 1.0)
        assert_close(math.atan2(out[i + half], out[i]), theta)


def test_attention_forward_matches_vaswani_with_primer_dconv():
    """softmax(q k^T / sqrt(k) + causal mask) v per head, then W_O (Vaswani et al. sec. 3.2);
    with Primer's width-3 causal depthwise convolution on each of q, k, v per head channel
    (So et al. sec. 3)."""
    module = Attention(d_model=8, num_heads=2, dconv=True)
    p, x, variables = _params(module, t=7)
    rng = np.random.default_rng(1)
    for name in ("dconv_query", "dconv_key", "dconv_value"):
        p[name] = rng.normal(size=p[name].shape)
    variables = {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)}
    xs = np.asarray(x, np.float64)
    b, t, _ = xs.shape
    proj = {}
    for name in ("query", "key", "value"):
        y = np.einsum("btd,dhk->bthk", xs, p[name])
        kern = p[f"dconv_{name}"]  # (h, k, 3): tap s multiplies position t - s
        conv = np.zeros_like(y)
        for i in range(t):
            for s in range(min(3, i + 1)):
                conv[:, i] += kern[..., s] * y[:, i - s]
        proj[name] = conv
    q, k, v = proj["query"], proj["key"], proj["value"]
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", w, v)
    expected = np.einsum("bqhk,hkd->bqd", o, p["out"])
    assert_close(jax.jit(module.apply)(variables, x), expected)


def test_primer_squared_relu_mlp():
    """Primer's MLP activation: ReLU(x)^2 between the two projections (So et al. sec. 3)."""
    module = MLP(d_model=6, kind="sqrelu", ratio=4)
    x = jax.random.normal(jax.random.key(0), (2, 3, 6))
    variables = module.init(jax.random.key(1), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])
    assert set(p) == {"w_in", "w_out"}
    xs = np.asarray(x, np.float64)
    expected = np.maximum(xs @ p["w_in"], 0) ** 2 @ p["w_out"]
    assert_close(jax.jit(module.apply)(variables, x), expected)
