"""Triton fused_recurrent_kda (decode, forward only) against the fp64 recurrence."""
import pytest
import torch

from kernels.kda import fused_recurrent_kda, recurrent_kda_reference
from kernels.kda.fused_recurrent import fused_recurrent_kda_triton
from tests.helpers.kda import CASES, HAS_CUDA, assert_close, case

DEVICE = "cuda" if HAS_CUDA else "cpu"
FWD_KEYS = ("q", "k", "v", "g", "beta", "initial_state")


def _args(inputs, device, dtype=None):
    out = {}
    for key in FWD_KEYS:
        x = inputs[key]
        if x is not None:
            x = x.to(device)
            if dtype is not None and key in ("q", "k", "v"):
                x = x.to(dtype)
        out[key] = x
    gate = inputs["gate"]
    out["gate"] = None if gate is None else (gate[0].to(device), gate[1].to(device), gate[2])
    return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if HAS_CUDA else []))
def test_fused_recurrent_matches_recurrence(name, dtype):
    inputs, cu = case(name)
    o_ref, s_ref = recurrent_kda_reference(**_args(inputs, "cpu"), cu_seqlens=cu, output_final_state=True)
    o, s = fused_recurrent_kda_triton(**_args(inputs, DEVICE, dtype), output_final_state=True,
                                      cu_seqlens=None if cu is None else cu.to(DEVICE))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close("o", o, o_ref, tol)
    assert_close("final_state", s, s_ref, tol)


def test_fused_recurrent_inplace_state_and_no_l2norm():
    """Decode step by step with the state updated in place equals one pass over all tokens."""
    inputs, _ = case("softplus_gate_strong")
    args = _args(inputs, DEVICE)
    args["q"], args["k"] = args["q"] * 0.3, args["k"] * 0.3   # without the norm keep |k| small
    o_ref, s_ref = recurrent_kda_reference(**_args(dict(inputs, q=inputs["q"] * 0.3, k=inputs["k"] * 0.3),
                                                   "cpu"), output_final_state=True, use_qk_l2norm=False)
    state = args["initial_state"].clone()
    outs = []
    T = args["q"].shape[1]
    for t0 in range(0, T, 7):   # a few tokens per call, like speculative/multi-token decode
        sl = slice(t0, min(t0 + 7, T))
        step = {key: (args[key][:, sl] if key in ("q", "k", "v", "g", "beta") else args[key])
                for key in ("q", "k", "v", "g", "beta", "gate")}
        o, none = fused_recurrent_kda_triton(**step, initial_state=state, inplace_state=True,
                                             use_qk_l2norm=False)
        assert none is None
        outs.append(o)
    assert_close("o", torch.cat(outs, 1), o_ref, 2e-5)
    assert_close("state (in place)", state, s_ref, 2e-5)


def test_fused_recurrent_cpu_entry_point_is_the_recurrence():
    inputs, cu = case("varlen")
    o1, s1 = fused_recurrent_kda(**_args(inputs, "cpu"), cu_seqlens=cu, output_final_state=True)
    o2, s2 = recurrent_kda_reference(**_args(inputs, "cpu"), cu_seqlens=cu, output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
