"""The official Based layer (fla-org's ``fla.layers.based.BasedLinearAttention``) for the
fixtures and the parity test (needs torch; ``make test`` never imports this file).

Its default forward (mode="parallel") calls the Triton kernel ``parallel_based``, which cannot
run on a CPU. :func:`run` swaps that name inside ``fla.layers.based`` for fla's own
pure-PyTorch reference of the same function, ``fla.ops.based.naive.naive_parallel_based``
(the reference takes (b, h, t, f) where the kernel's wrapper takes (b, t, h, f), so the swap
transposes around it); both compute sum_{s<=t} (1 + q.k + (q.k)^2 / 2) v_s divided by the sum
of the same weights plus 1e-6, with scale 1 as the layer passes it. Everything else in the
forward (projections, head split, output projection) is the official code unchanged.
"""

from __future__ import annotations

from tests.convert import official

# Options of effseq's Based; the official module gets hidden_size = d_model, feature_dim,
# num_heads = num_key_value_heads = num_heads (its default forward needs d_model = h * f).
CASES = {
    "based": [
        {"d_model": 16, "num_heads": 2, "feature_dim": 8},
        {"d_model": 12, "num_heads": 3, "feature_dim": 4},
    ]
}


def _module(options: dict):
    """The official module for effseq ``options``, with its Triton call swapped (see above)."""
    official.import_official("fla", "ops")  # first: fla.modules.backends <-> fla.ops cycle
    layers = official.import_official("fla", "layers.based")
    naive = official.import_official("fla", "ops.based.naive")

    def parallel_based_reference(q, k, v, scale=None, use_norm=True, **kwargs):
        o = naive.naive_parallel_based(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, use_norm
        )
        return o.transpose(1, 2).to(q.dtype)

    layers.parallel_based = parallel_based_reference
    h = options["num_heads"]
    return layers.BasedLinearAttention(
        hidden_size=options["d_model"],
        feature_dim=options["feature_dim"],
        num_key_value_heads=h,
        num_heads=h,
    )


def run(name: str, options: dict, seed: int, x):
    """The official module for ``options`` with seeded random parameters, run on x (b, t, d)
    float32 numpy: returns (state_dict as float32 numpy arrays, y (b, t, d) float32 numpy)."""
    import torch

    if name != "based":
        raise ValueError(f"official_based.run: no official module for mixer {name!r}")
    module = _module(options)
    official.randomize(module, seed)
    module.eval()
    with torch.no_grad():
        y = module(torch.from_numpy(x))
    return official.state_dict_numpy(module), y.float().numpy()
