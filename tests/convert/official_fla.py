"""fla-org's GLA and Gated DeltaNet layers on the CPU, for the fixtures and the parity tests.

No Triton kernel can run here, so each layer's default ``forward`` runs with fla's own
pure-PyTorch pieces in place of its kernels: ``naive_recurrent_gla`` for GLA's recurrent
kernel (the path fla takes for t <= 64), ``naive_recurrent_gated_delta_rule`` for the gated
delta rule with the in-kernel pre-processing written out (fla's ``l2norm`` with eps 1e-6, the
gate of ``naive_gdn_gate``, beta = sigmoid), ``rms_norm_ref`` (fla/modules/layernorm_gated.py,
norm before the swish gate) for ``FusedRMSNormGated``, and PyTorch's own ``Conv1d`` (causal
padding, then SiLU) for ``ShortConvolution``.
"""

from __future__ import annotations

import numpy as np

from tests.convert import official

CASES = {
    "gla": [
        dict(d_model=16, num_heads=2, expand_k=0.5, expand_v=1.0, gate_low_rank=4, norm="rms"),
        dict(d_model=24, num_heads=3, expand_k=1.0, expand_v=2.0, gate_low_rank=16, norm="rms"),
    ],
    "gdn": [
        dict(d_model=16, num_heads=2, head_dim=4, expand_v=2.0, conv_width=4),
        dict(d_model=24, num_heads=3, head_dim=6, expand_v=1.0, conv_width=3),
    ],
}


def _patch():
    import torch
    import torch.nn.functional as F

    gla = official.import_official("fla", "layers.gla")
    gdn = official.import_official("fla", "layers.gated_deltanet")
    gla_naive = official.import_official("fla", "ops.gla.naive")
    gdr_naive = official.import_official("fla", "ops.gated_delta_rule.naive")
    gate = official.import_official("fla", "ops.gated_delta_rule.gate")
    norm_ref = official.import_official("fla", "modules.layernorm_gated").rms_norm_ref
    short_conv = official.import_official("fla", "modules.conv.short_conv")

    def recurrent_gla(q, k, v, gk=None, initial_state=None, output_final_state=False, **kw):
        return gla_naive.naive_recurrent_gla(q, k, v, gk, initial_state, output_final_state)

    gla.fused_recurrent_gla = recurrent_gla

    def l2norm(x):
        return x / torch.sqrt((x.float() ** 2).sum(-1, keepdim=True) + 1e-6)

    def gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        A_log,
        dt_bias,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        use_gate_in_kernel=False,
        use_beta_sigmoid_in_kernel=False,
        allow_neg_eigval=False,
        **kw,
    ):
        assert use_qk_l2norm_in_kernel and use_gate_in_kernel and use_beta_sigmoid_in_kernel
        assert not allow_neg_eigval and kw.get("cu_seqlens") is None
        g = gate.naive_gdn_gate(g, A_log, dt_bias)
        return gdr_naive.naive_recurrent_gated_delta_rule(
            l2norm(q),
            l2norm(k),
            v,
            torch.sigmoid(beta.float()),
            g,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )

    gdn.chunk_gated_delta_rule = gated_delta_rule
    gdn.fused_recurrent_gated_delta_rule = gated_delta_rule
    gdn.GatedDeltaNet._use_fused_qkv_conv = lambda self, *a: False

    def conv_forward(
        self,
        x,
        residual=None,
        mask=None,
        cache=None,
        output_final_state=False,
        cu_seqlens=None,
        **kw,
    ):
        assert cache is None and cu_seqlens is None and residual is None and mask is None
        t = x.shape[1]
        y = F.conv1d(
            x.transpose(1, 2),
            self.weight,
            self.bias,
            padding=self.kernel_size[0] - 1,
            groups=self.hidden_size,
        )[..., :t].transpose(1, 2)
        return (F.silu(y) if self.activation else y), None

    short_conv.ShortConvolution.forward = conv_forward

    def norm_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        assert residual is None and not prenorm
        return norm_ref(x, self.weight, self.bias, z=g, eps=self.eps, norm_before_gate=True)

    for module in (gla, gdn):
        module.FusedRMSNormGated.forward = norm_forward
    return gla, gdn


def build(name: str, options: dict, seed: int):
    """The official module for effseq ``options``, with seeded random weights."""
    import torch

    gla, gdn = _patch()
    torch.manual_seed(seed)
    o = options
    if name == "gla":
        module = gla.GatedLinearAttention(
            hidden_size=o["d_model"],
            num_heads=o["num_heads"],
            expand_k=o["expand_k"],
            expand_v=o["expand_v"],
            gate_low_rank_dim=o["gate_low_rank"],
        )
    else:
        module = gdn.GatedDeltaNet(
            hidden_size=o["d_model"],
            num_heads=o["num_heads"],
            head_dim=o["head_dim"],
            expand_v=o["expand_v"],
            conv_size=o["conv_width"],
        )
    official.randomize(module, seed)
    return module.eval()


def forward(name: str, module, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x))[0].float().numpy()


def run(name: str, options: dict, seed: int, x: np.ndarray):
    """(state_dict as numpy, official output) for mixer ``name`` built from ``options``."""
    module = build(name, options, seed)
    return official.state_dict_numpy(module), forward(name, module, x)
