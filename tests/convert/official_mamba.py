"""The official ``mamba_ssm`` modules on the CPU, for the fixtures and the parity tests.

``Mamba`` (mamba_simple) runs its non-fused path with the official ``selective_scan_ref`` in
place of the CUDA ``selective_scan_fn``. ``Mamba2`` runs its unfused path
(``use_mem_eff_path=False``) with the official ``ssd_chunk_scan_combined_ref`` in place of the
Triton ``mamba_chunk_scan_combined`` and the official ``rms_norm_ref`` in place of the Triton
gated norm; :func:`run` also steps it token by token through its pure-PyTorch ``step`` (no
Triton ``selective_state_update``) and checks that both official paths agree.
"""

from __future__ import annotations

import numpy as np

from tests.convert import official

# effseq options per case; each maps to the official constructor as in effseq.convert.mamba.
CASES = {
    "mamba": [
        dict(d_model=16, state_size=4, expand=2, conv_width=4, dt_rank="auto"),
        dict(d_model=24, state_size=8, expand=1, conv_width=3, dt_rank=5),
    ],
    "mamba2": [
        dict(d_model=16, state_size=8, expand=2, head_dim=8, num_groups=1, conv_width=4),
        dict(d_model=24, state_size=4, expand=2, head_dim=6, num_groups=2, conv_width=3),
    ],
}


def _modules():
    mamba_simple = official.import_official("mamba_ssm", "modules.mamba_simple")
    mamba2 = official.import_official("mamba_ssm", "modules.mamba2")
    interface = official.import_official("mamba_ssm", "ops.selective_scan_interface")
    combined = official.import_official("mamba_ssm", "ops.triton.ssd_combined")
    gated = official.import_official("mamba_ssm", "ops.triton.layernorm_gated")
    mamba_simple.selective_scan_fn = interface.selective_scan_ref

    def chunk_scan(
        x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, **kw
    ):
        assert not kw.get("return_final_states") and kw.get("seq_idx") is None
        return combined.ssd_chunk_scan_combined_ref(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
        )

    mamba2.mamba_chunk_scan_combined = chunk_scan
    mamba2.selective_state_update = None  # the pure-PyTorch step

    def norm_forward(self, x, z=None):
        return gated.rms_norm_ref(
            x,
            self.weight,
            self.bias,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )

    mamba2.RMSNormGated.forward = norm_forward
    return mamba_simple, mamba2


def build(name: str, options: dict, seed: int):
    """The official module for effseq ``options``, with seeded random weights."""
    import torch

    mamba_simple, mamba2 = _modules()
    torch.manual_seed(seed)
    o = options
    if name == "mamba":
        module = mamba_simple.Mamba(
            d_model=o["d_model"],
            d_state=o["state_size"],
            d_conv=o["conv_width"],
            expand=o["expand"],
            dt_rank=o["dt_rank"],
            use_fast_path=False,
        )
    else:
        module = mamba2.Mamba2(
            d_model=o["d_model"],
            d_state=o["state_size"],
            d_conv=o["conv_width"],
            expand=o["expand"],
            headdim=o["head_dim"],
            ngroups=o["num_groups"],
            use_mem_eff_path=False,
            chunk_size=1,  # the _ref needs t % chunk == 0
        )
    official.randomize(module, seed)
    return module.eval()


def forward(name: str, module, x: np.ndarray) -> np.ndarray:
    """The official forward on x (b, t, d) float32 numpy."""
    import torch

    with torch.no_grad():
        y = module(torch.from_numpy(x)).numpy()
        if name == "mamba2" and module.ngroups == 1:
            # The official pure-PyTorch decoding path must give the same outputs.
            b = x.shape[0]
            conv = torch.zeros(b, module.d_ssm + 2 * module.d_state, module.d_conv)
            ssm = torch.zeros(b, module.nheads, module.headdim, module.d_state)
            steps = [
                module.step(torch.from_numpy(x[:, i : i + 1]), conv, ssm)[0]
                for i in range(x.shape[1])
            ]
            y_steps = torch.cat(steps, 1).numpy()  # each step is (b, 1, d)
            np.testing.assert_allclose(y_steps, y, rtol=1e-4, atol=1e-4)
    return y


def run(name: str, options: dict, seed: int, x: np.ndarray):
    """(state_dict as numpy, official output) for mixer ``name`` built from ``options``."""
    module = build(name, options, seed)
    return official.state_dict_numpy(module), forward(name, module, x)
