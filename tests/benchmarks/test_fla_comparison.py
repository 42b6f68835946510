"""The flash-linear-attention comparison's own logic, against a stand-in torch and fla.

torch and fla are not installed here, so the code path that times them would otherwise run
only where they are. The stand-ins compute GLA with effseq's reference on numpy arrays, in
the layout a given fla release expects; the comparison must find that layout, time only the
lengths its CPU path allows, and report a wrong-layout or missing op instead of timing it.
"""

import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from effseq import ops
from effseq.benchmarks import models

PLAN = models.Plan(mixers=("gla",), lengths=(16, 4096), contexts=(), d_model=32, repeats=5)


class FakeTensor:
    def __init__(self, x):
        self.x = np.asarray(x)

    def transpose(self, a, b):
        return FakeTensor(np.swapaxes(self.x, a, b))

    def sum(self):
        return types.SimpleNamespace(backward=lambda: None)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.x


def _fake_torch():
    torch = types.ModuleType("torch")
    torch.__version__ = "0.0-fake"
    torch.tensor = lambda x, device="cpu", requires_grad=False: FakeTensor(x)
    torch.cuda = types.SimpleNamespace(is_available=lambda: False, synchronize=lambda: None)
    return torch


def _gla(head_first: bool, wrong: bool = False):
    """A GLA op in fla's calling convention: (b, t, h, k) or head-first (b, h, t, k)."""

    def op(q, k, v, g):
        xs = [t.x for t in (q, k, v, g)]
        if head_first:
            xs = [np.swapaxes(x, 1, 2) for x in xs]
        o = np.asarray(ops.gated_linear_attention_reference(*map(jnp.asarray, xs))[0])
        if wrong:
            o = o * 1.5
        return FakeTensor(np.swapaxes(o, 1, 2) if head_first else o), None

    return op


def _install(monkeypatch, naive_module=None, **gla_ops):
    """Stand-in torch and fla; ``naive_module``: the op exported by fla.ops.gla.naive only (the
    layout of fla 0.6, whose fla.ops.gla exports the Triton ops alone)."""
    fla = types.ModuleType("fla")
    fla_ops = types.ModuleType("fla.ops")
    gla = types.ModuleType("fla.ops.gla")
    for name, fn in gla_ops.items():
        setattr(gla, name, fn)
    fla.ops, fla_ops.gla = fla_ops, gla
    modules = {"torch": _fake_torch(), "fla": fla, "fla.ops": fla_ops, "fla.ops.gla": gla}
    if naive_module is not None:
        gla.__path__ = []  # a package, as in fla
        naive = types.ModuleType("fla.ops.gla.naive")
        naive.naive_recurrent_gla = naive_module
        gla.naive = modules["fla.ops.gla.naive"] = naive
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("head_first,layout", [(False, "bthk"), (True, "bhtk")])
def test_finds_the_layout_and_times_short_lengths_on_cpu(monkeypatch, head_first, layout):
    _install(monkeypatch, chunk_gla=_gla(head_first))
    result = models.fla_comparison(PLAN, PLAN.lengths)
    assert result["fla_path"] == "chunk_gla" and result["layout"] == layout
    assert result["device"] == "cpu" and "error" not in result
    # The CPU path is a Python loop: 4096 > FLA_MAX_LENGTH is left out.
    assert [r["length"] for r in result["records"]] == [16]
    r = result["records"][0]
    assert r["fla_median_s"] > 0 and r["effseq_median_s"] > 0
    assert r["fla_over_effseq"] == pytest.approx(r["fla_median_s"] / r["effseq_median_s"])


def test_wrong_output_is_reported_not_timed(monkeypatch):
    _install(monkeypatch, chunk_gla=_gla(False, wrong=True))
    result = models.fla_comparison(PLAN, PLAN.lengths)
    assert "records" not in result and result["device"] == "cpu"
    # A 1.5x output is 50% off in relative RMS; both layouts are tried and reported.
    assert "chunk_gla/bthk: output differs from effseq's reference (rel 0.5)" in result["skipped"]
    assert "chunk_gla/bhtk: output differs" in result["skipped"]
    assert "naive_recurrent_gla: not in this fla" in result["skipped"]


def test_falls_back_to_the_naive_path(monkeypatch):
    # An fla with a broken chunk_gla and the naive op exported from fla.ops.gla (older
    # releases; fla 0.6 keeps it in fla.ops.gla.naive).
    _install(monkeypatch, chunk_gla=_gla(False, wrong=True), naive_recurrent_gla=_gla(True))
    result = models.fla_comparison(PLAN, PLAN.lengths)
    assert result["fla_path"] == "naive_recurrent_gla" and result["layout"] == "bhtk"


def test_finds_the_naive_path_in_its_fla_0_6_module(monkeypatch):
    _install(monkeypatch, naive_module=_gla(False), chunk_gla=_gla(False, wrong=True))
    result = models.fla_comparison(PLAN, PLAN.lengths)
    assert result["fla_path"] == "naive_recurrent_gla" and result["layout"] == "bthk"
    assert result["match_rel_error"] < 1e-6


@pytest.mark.parametrize("chunk_ok,timed", [(True, [16, 4096]), (False, [16])])
def test_on_a_gpu_only_the_naive_path_is_capped(monkeypatch, chunk_ok, timed):
    # On a GPU the Triton op is timed at every length; the naive one is a Python loop anywhere.
    _install(monkeypatch, naive_module=_gla(False), chunk_gla=_gla(False, wrong=not chunk_ok))
    monkeypatch.setattr(models, "_fla_device", lambda torch: "cuda")
    result = models.fla_comparison(PLAN, PLAN.lengths)
    assert result["device"] == "cuda"
    assert [r["length"] for r in result["records"]] == timed


def test_an_error_while_timing_keeps_the_records_made(monkeypatch):
    def fails_when_long(q, k, v, g):
        if q.x.shape[1] > 2048:  # the layout check runs at t=37
            raise MemoryError("out of memory (stand-in)")
        return _gla(False)(q, k, v, g)

    _install(monkeypatch, chunk_gla=fails_when_long)
    monkeypatch.setattr(models, "_fla_device", lambda torch: "cuda")
    result = models.fla_comparison(PLAN, PLAN.lengths)
    assert [r["length"] for r in result["records"]] == [16]
    assert result["error"] == "MemoryError: out of memory (stand-in)"


def test_missing_torch_is_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    result = models.fla_comparison(PLAN, PLAN.lengths)
    assert result["skipped"].startswith("torch / fla not importable")
