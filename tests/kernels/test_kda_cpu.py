"""The CPU KDA path (kernels/kda/chunk_cpu.py: the chunk reference with vectorised intra-chunk products)
against the fp64 token recurrence (the oracle) and the chunk reference, forward and every gradient,
on the kernel tests' cases plus the tiny preset's micro-batch shapes."""
import pytest
import torch

from kernels.kda import chunk_kda_reference
from kernels.kda import chunk_kda_cpu
from model import kda as model_kda
from tests.helpers.kda import CASES, assert_close, case, make_inputs, random_cu_seqlens
from tests.kernels.test_kda_reference import assert_exact_in_fp64, assert_matches_recurrence

MODEL_CASES = {
    # the tiny preset's micro-batches: 2 samples, documents split inside them
    "tiny_microbatch": (dict(B=1, T=256, H=2, Dk=32, Dv=32, gate_kind="softplus"), [128, 46, 41, 41]),
    "tiny_short_docs": (dict(B=1, T=128, H=2, Dk=32, Dv=32, gate_kind="softplus"), [64, 30, 1, 33]),
    "one_token_docs": (dict(B=1, T=40, H=2, Dk=16, Dv=16), [1] * 8 + [17, 1, 14]),
    "strong_decay_varlen": (dict(B=1, T=200, H=2, Dk=16, Dv=8, decay=(0.0, 20.0)), [37, 90, 73]),
}


def _model_case(name, dtype=torch.float32):
    kw, lens = MODEL_CASES[name]
    return make_inputs(dtype=dtype, n_docs=len(lens), **kw), random_cu_seqlens(lens)


ALL = [(n, case) for n in CASES] + [(n, _model_case) for n in MODEL_CASES]


@pytest.mark.parametrize("name,make", ALL, ids=[n for n, _ in ALL])
def test_cpu_kda_matches_recurrence(name, make):
    assert_matches_recurrence(chunk_kda_cpu, *make(name))


@pytest.mark.parametrize("name,make", [("basic_T150", case), ("varlen", case), ("softplus_gate_strong", case),
                                       ("varlen_empty_docs", case), ("strong_decay_varlen", _model_case)])
def test_cpu_kda_exact_in_fp64(name, make):
    assert_exact_in_fp64(chunk_kda_cpu, *make(name, torch.float64))


@pytest.mark.parametrize("name", ["tiny_microbatch", "tiny_short_docs"])
def test_model_call_matches_chunk_reference(name):
    """The model's call (no initial state, no final state: the single-chunk shortcut when documents
    fit one chunk) agrees with the chunk reference, output and gradients."""
    inputs, cu = _model_case(name)
    inputs = dict(inputs, initial_state=None)

    def run(fn):
        leaves = {key: inputs[key].detach().clone().requires_grad_(True) for key in ("q", "k", "v", "g", "beta")}
        o, s = fn(**leaves, gate=inputs["gate"], cu_seqlens=cu)
        assert s is None
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
        return o, {key: x.grad for key, x in leaves.items()}

    o, grads = run(chunk_kda_cpu)
    o_ref, grads_ref = run(chunk_kda_reference)
    assert_close("o", o, o_ref, 1e-5)
    for key in grads:
        assert_close(f"d{key}", grads[key], grads_ref[key], 1e-4)


def test_kda_dispatch_uses_the_cpu_path_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(model_kda, "chunk_kda_cpu", lambda *a, **k: calls.append("cpu") or chunk_kda_reference(*a, **k))
    inputs = make_inputs(1, 16, 1, 8, 8, h0=False)
    model_kda.kda_op(**{key: inputs[key] for key in ("q", "k", "v", "g", "beta", "gate")})
    assert calls == ["cpu"]
