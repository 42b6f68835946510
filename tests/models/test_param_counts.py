"""Parameter counts against closed-form formulas written from each paper's description.

Counts come from ``jax.eval_shape(module.init, ...)`` (sizes of every leaf, nothing run), so
these tests are cheap. The formulas are written here from the layer descriptions, one term per
weight, never read off the implementation:

* S4D (Gu et al. 2022; the S4D code's layer): per channel dt, n complex A (real and imaginary
  part), n complex B, n complex C; skip D; output Linear d -> 2d (GLU) or d -> d with bias.
* SGConv (Li et al. 2022, sec. 3.1): s = 1 + ceil(log2(L / kernel_dim)) sub-kernels of
  kernel_dim per channel, skip D, the same output layer; the normalization constant Z (one per
  channel) is a constant, not a parameter.
* Mamba (Gu & Dao 2023, mamba_simple.py): in_proj d x 2e, depthwise conv e x 4 + bias e,
  x_proj e x (r + 2n), dt_proj r x e + bias e, A_log e x n, D e, out_proj e x d, no other biases.
* GLA (Yang et al. 2023, sec. 4.4): W_Q, W_K d x d/2, W_V, W_r d x d (+ b_r), W_O d x d, gate
  d x 16 then 16 x d/2 + bias, per-head norm scale and bias of the head's value width.
* Attention: W_Q, W_K, W_V, W_O d x d, no biases; Primer's depthwise conv adds 3 taps per
  channel for each of q, k, v.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from effseq.layers.attention import Attention
from effseq.layers.gla import GLA
from effseq.layers.mamba import Mamba
from effseq.layers.s4d import S4D
from effseq.layers.sgconv import SGConv
from effseq.models import Backbone, LanguageModel, SequenceClassifier, registry


def _counts(module, *inputs) -> dict:
    """{collection: number of scalars} from the abstract initialization."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return {name: sum(x.size for x in jax.tree.leaves(tree)) for name, tree in shapes.items()}


def _mixer_counts(module) -> dict:
    return _counts(module, jax.ShapeDtypeStruct((1, 3, module.d_model), jnp.float32))


# --- closed forms, one term per weight ---------------------------------------------------------


def s4d_params(d, n=32, glu=True, trainable_B=True, bidirectional=False):
    ssm = d + d * n + d * n + 2 * d * n + (2 * d * n if trainable_B else 0)  # dt, Re A, Im A, C, B
    out = 2 * d if glu else d
    return ssm * (2 if bidirectional else 1) + d + d * out + out


def sgconv_scales(max_len, kernel_dim=64):
    return 1 + max(0, math.ceil(math.log2(max_len / kernel_dim)))


def sgconv_params(d, max_len, kernel_dim=64, glu=True, bidirectional=False):
    kernels = sgconv_scales(max_len, kernel_dim) * d * kernel_dim
    out = 2 * d if glu else d
    return kernels * (2 if bidirectional else 1) + d + d * out + out


def mamba_params(d, n=16, expand=2, conv=4, bidirectional=False):
    e, r = expand * d, math.ceil(d / 16)
    branch = e * conv + e + e * (r + 2 * n) + r * e + e + e * n + e
    return d * 2 * e + branch * (2 if bidirectional else 1) + e * d


def gla_params(d, heads=4, rank=16):
    k, v = d // 2, d
    qkv = d * k + d * k + d * v
    gate = d * rank + rank * k + k
    norm = 2 * (v // heads)
    return qkv + gate + norm + (d * v + v) + v * d


def attention_params(d, dconv=False):
    return 4 * d * d + (3 * 3 * d if dconv else 0)


MIXER_PARAMS = {
    "s4d": s4d_params,
    "sgconv": sgconv_params,
    "mamba": mamba_params,
    "gla": gla_params,
    "attention": attention_params,
}


def block_params(d, mixer_params, norm="layernorm", mlp="glu", ratio=4):
    norm_size = 2 * d if norm == "layernorm" else d
    if mlp == "none":
        return norm_size + mixer_params
    mlp_size = (3 if mlp == "glu" else 2) * d * ratio * d
    return norm_size + mixer_params + norm_size + mlp_size


# --- mixers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 48])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(state_size=8, glu=False, trainable_B=False),
        dict(state_size=4, causal=False),
    ],
)
def test_s4d(d, options):
    module = S4D(d_model=d, **options)
    n = options.get("state_size", 32)  # the default: the paper's N = 64 real states
    expected = s4d_params(
        d,
        n,
        glu=options.get("glu", True),
        trainable_B=options.get("trainable_B", True),
        bidirectional=not options.get("causal", True),
    )
    assert _mixer_counts(module) == {"params": expected}


@pytest.mark.parametrize("d", [16, 48])
@pytest.mark.parametrize(
    "options",
    [
        dict(max_len=1024),
        dict(max_len=1000, kernel_dim=32, glu=False),
        dict(max_len=4096, causal=False),
    ],
)
def test_sgconv(d, options):
    module = SGConv(d_model=d, **options)
    bidirectional = not options.get("causal", True)
    expected = sgconv_params(
        d,
        options["max_len"],
        kernel_dim=options.get("kernel_dim", 64),
        glu=options.get("glu", True),
        bidirectional=bidirectional,
    )
    counts = _mixer_counts(module)
    assert counts == {"params": expected, "constants": d * (2 if bidirectional else 1)}


@pytest.mark.parametrize("d", [16, 40, 48])
@pytest.mark.parametrize("options", [dict(), dict(state_size=4, expand=3), dict(causal=False)])
def test_mamba(d, options):
    module = Mamba(d_model=d, **options)
    expected = mamba_params(
        d,
        options.get("state_size", 16),
        options.get("expand", 2),
        bidirectional=not options.get("causal", True),
    )
    assert _mixer_counts(module) == {"params": expected}


@pytest.mark.parametrize("d", [16, 48, 64])
def test_gla(d):
    counts = _mixer_counts(GLA(d_model=d))
    assert counts == {"params": gla_params(d)}
    # The paper sizes the GLA layer like softmax attention: 4 d^2 up to terms linear in d.
    assert abs(counts["params"] - 4 * d * d) < 40 * d


@pytest.mark.parametrize("d", [16, 48])
@pytest.mark.parametrize("dconv", [False, True])
def test_attention(d, dconv):
    assert _mixer_counts(Attention(d_model=d, dconv=dconv)) == {
        "params": attention_params(d, dconv)
    }


# --- models ---------------------------------------------------------------------------------------


def _tokens(t=8):
    return jax.ShapeDtypeStruct((2, t), jnp.int32)


@pytest.mark.parametrize("mixer", ["s4d", "sgconv", "mamba", "gla", "attention"])
@pytest.mark.parametrize("d, n_layers", [(16, 2), (48, 3)])
def test_language_model_total(mixer, d, n_layers):
    V, max_len = 37, 512
    model = LanguageModel(Backbone(mixer, d, n_layers, max_len=max_len), vocab_size=V)
    mixer_size = MIXER_PARAMS[mixer](d, **({"max_len": max_len} if mixer == "sgconv" else {}))
    expected = V * d + n_layers * block_params(d, mixer_size) + 2 * d  # embed, blocks, norm
    counts = _counts(model, _tokens())
    assert counts["params"] == expected
    if mixer == "sgconv":
        assert counts["constants"] == n_layers * d


def test_language_model_hybrid_untied_rmsnorm_sqrelu():
    """GLA with full attention in every fourth layer (8 layers: 6 GLA, 2 attention), an untied
    head, RMSNorm (scale only) and Primer's squared-ReLU MLP (two matrices)."""
    V, d = 50, 32
    backbone = Backbone("gla,gla,gla,attention", d, 8, max_len=2048, norm="rmsnorm", mlp="sqrelu")
    model = LanguageModel(backbone, vocab_size=V, tie_embeddings=False)

    def block(mixer_size):
        return block_params(d, mixer_size, norm="rmsnorm", mlp="sqrelu")

    expected = V * d + 6 * block(gla_params(d)) + 2 * block(attention_params(d)) + d + d * V
    assert _counts(model, _tokens()) == {"params": expected}


def test_language_model_hybrid_default_block():
    V, d = 50, 32
    # The old LanguageModel defaults: max_len 2048, mlp_ratio 4 (block_params' ratio).
    backbone = Backbone("gla,gla,gla,attention", d, 8, max_len=2048, mlp_ratio=4)
    model = LanguageModel(backbone, vocab_size=V)
    expected = (
        V * d
        + 6 * block_params(d, gla_params(d))
        + 2 * block_params(d, attention_params(d))
        + 2 * d
    )
    assert _counts(model, _tokens()) == {"params": expected}


@pytest.mark.parametrize(
    "mixer, mixer_size",
    [
        # A classifier over causal-only GLA keeps it causal; the others become bidirectional.
        ("s4d", lambda d: s4d_params(d, bidirectional=True)),
        ("sgconv", lambda d: sgconv_params(d, 256, bidirectional=True)),
        ("mamba", lambda d: mamba_params(d, bidirectional=True)),
        ("gla", gla_params),
        ("attention", attention_params),
    ],
)
def test_sequence_classifier_total(mixer, mixer_size):
    K, V, d, L = 5, 20, 16, 2
    # The classifier's automatic direction: bidirectional where the mixer has the form.
    causal = bool(registry.causal_only(registry.names(mixer)))
    assert causal == (mixer == "gla")
    backbone = Backbone(mixer, d, L, causal=causal, max_len=256)
    model = SequenceClassifier(backbone, num_classes=K, vocab_size=V)
    expected = V * d + L * block_params(d, mixer_size(d)) + 2 * d + d * K
    assert _counts(model, _tokens())["params"] == expected


def test_sequence_classifier_pixels_dual_no_mlp():
    """Continuous inputs (c channels, linear encoder c x d), the Retrieval dual encoder's
    hidden layer on [u, v, u*v, u-v] (4d x d), no MLP in the blocks."""
    K, c, d, L = 10, 3, 16, 2
    # Mamba has a bidirectional form, which the old classifier default (auto) picked.
    backbone = Backbone("mamba", d, L, causal=False, max_len=1024, mlp="none")
    model = SequenceClassifier(backbone, num_classes=K, input_dim=c, dual=True)
    x = jax.ShapeDtypeStruct((2, 8, c), jnp.float32)
    shapes = jax.eval_shape(lambda k, a, b: model.init(k, a, inputs2=b), jax.random.key(0), x, x)
    total = sum(a.size for a in jax.tree.leaves(shapes))
    blocks = L * block_params(d, mamba_params(d, bidirectional=True), mlp="none")
    assert total == c * d + blocks + 2 * d + 4 * d * d + d * K
