"""The chunkwise PyTorch reference against the fp64 token recurrence (the oracle)."""
import pytest
import torch

from kernels.kda import chunk_kda, chunk_kda_reference, recurrent_kda_reference
from tests.helpers.kda import CASES, assert_close, case, gdn_reference, run_with_grads

def assert_matches_recurrence(fn, inputs, cu):
    """fp32 forward, final state and every gradient of ``fn`` against the fp64 recurrence."""
    o_ref, s_ref, g_ref = run_with_grads(recurrent_kda_reference, inputs, cu)
    o, s, grads = run_with_grads(fn, inputs, cu)
    assert o.dtype == inputs["q"].dtype and s.dtype == torch.float32
    assert_close("o", o, o_ref, 2e-5)
    assert_close("final_state", s, s_ref, 2e-5)
    assert set(grads) == set(g_ref)
    for key in grads:
        # A_log / dt_bias gradients are sums over every token and channel of a head: fp32 rounding of
        # terms that partly cancel reached 1.3e-4 on another CPU (the fp64 test bounds the algorithm)
        assert_close(f"d{key}", grads[key], g_ref[key], 3e-4 if key in ("A_log", "dt_bias") else 1e-4)


def assert_exact_in_fp64(fn, inputs, cu):
    """In float64 a chunk algorithm must equal the recurrence to rounding (no approximation)."""
    o_ref, s_ref = recurrent_kda_reference(**_fwd_args(inputs), cu_seqlens=cu, output_final_state=True)
    o, s = fn(**_fwd_args(inputs), cu_seqlens=cu, output_final_state=True)
    assert o.dtype == torch.float64
    assert_close("o", o, o_ref, 1e-11)
    assert_close("final_state", s, s_ref, 1e-11)


@pytest.mark.parametrize("name", list(CASES))
def test_chunk_reference_matches_recurrence(name):
    assert_matches_recurrence(chunk_kda_reference, *case(name))


@pytest.mark.parametrize("name", ["basic_T150", "varlen", "softplus_gate_strong"])
def test_chunk_reference_exact_in_fp64(name):
    assert_exact_in_fp64(chunk_kda_reference, *case(name, torch.float64))


def _fwd_args(inputs):
    return {k: inputs[k] for k in ("q", "k", "v", "g", "beta", "initial_state", "gate")}


def test_scalar_gate_equals_independent_gdn():
    inputs, _ = case("gdn_scalar_gate", torch.float64)
    Dk = inputs["q"].shape[-1]
    o_ref, s_ref = gdn_reference(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                  Dk ** -0.5, inputs["initial_state"].double())
    for fn in (chunk_kda_reference, recurrent_kda_reference):
        o, s = fn(**_fwd_args(inputs), output_final_state=True)
        assert_close(f"{fn.__name__} o", o, o_ref, 1e-11)
        assert_close(f"{fn.__name__} S", s, s_ref, 1e-11)


def test_causality():
    """Perturbing inputs at positions >= P changes no output or input gradient before P."""
    P = 70
    inputs, _ = case("softplus_gate_strong")
    pert = dict(inputs)
    for key in ("q", "k", "v", "g", "beta"):
        x = inputs[key].clone()
        x[:, P:] = x[:, P:] + torch.randn_like(x[:, P:])
        pert[key] = x.clamp(max=0) if key == "g" and inputs["gate"] is None else x
    pert["beta"] = pert["beta"].clamp(0.01, 0.99)
    # the same output cotangent before P; the final-state cotangent must then be zero
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(inputs["v"].shape, generator=gen, dtype=torch.float64)
    do[:, P:] = 0
    o1, _, g1 = run_with_grads(chunk_kda_reference, inputs, do=do, dht=torch.zeros(1, 2, 16, 16))
    o2, _, g2 = run_with_grads(chunk_kda_reference, pert, do=do, dht=torch.zeros(1, 2, 16, 16))
    assert torch.equal(o1[:, :P], o2[:, :P])
    assert not torch.allclose(o1[:, P:], o2[:, P:])
    for key in ("q", "k", "v", "g", "beta"):
        assert torch.allclose(g1[key][:, :P], g2[key][:, :P], rtol=1e-5, atol=1e-6), key


def test_chunk_kda_cpu_dispatches_to_reference():
    inputs, _ = case("basic_T150")
    o1, s1 = chunk_kda(**_fwd_args(inputs), output_final_state=True)
    o2, s2 = chunk_kda_reference(**_fwd_args(inputs), output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
