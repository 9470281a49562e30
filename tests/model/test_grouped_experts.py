"""Grouped-GEMM experts == megatron's SequentialMLP loop: outputs and every gradient, including
experts that receive no token, in fp32 and bf16 (CPU)."""

import pytest
import torch

from model import grouped_experts
from tests.helpers.small_models import mixed_config


@pytest.fixture(scope="module")
def experts():
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=7)
    model = build_model(mixed_config())
    moe = next(layer.ffn for layer in model.layers if layer.ffn_type == "moe")
    assert isinstance(moe.experts, grouped_experts.GroupedExperts)
    return moe.experts


def run(experts, x, counts, probs, grouped, monkeypatch):
    monkeypatch.setattr(grouped_experts, "grouped_mm_available", lambda t: grouped)
    experts.zero_grad(set_to_none=True)
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = experts(x, counts, probs)
    assert bias is None
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    grads = [p.grad.clone() for p in experts.parameters()]
    return out.detach(), x.grad, probs.grad, grads


CASES = [("cpu", torch.float32), ("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    CASES.append(("cuda", torch.bfloat16))  # torch._grouped_mm on a GPU takes bf16


@pytest.mark.parametrize("device,dtype", CASES)
def test_grouped_matches_sequential(experts, device, dtype, monkeypatch):
    experts.to(device=device, dtype=dtype)
    try:
        n = experts.num_local_experts
        counts = torch.tensor([5, 0, 3, 9][:n] + [2] * max(0, n - 4))  # one expert gets no token
        torch.manual_seed(0)
        hidden = experts.local_experts[0].linear_fc1.weight.shape[1]
        x = torch.randn(int(counts.sum()), hidden, dtype=dtype).to(device)
        probs = torch.rand(int(counts.sum())).to(device)  # fp32, as the router gives them
        loop = run(experts, x, counts, probs, False, monkeypatch)
        grouped = run(experts, x, counts, probs, True, monkeypatch)
    finally:
        experts.to(device="cpu", dtype=torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(grouped[:3], loop[:3]):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    for a, b in zip(grouped[3], loop[3]):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    assert loop[3][2].abs().sum() == 0  # the idle expert's fc1 gets no gradient in either path
