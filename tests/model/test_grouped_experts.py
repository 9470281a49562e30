"""Grouped-GEMM experts == megatron's SequentialMLP loop: outputs and every gradient, including
experts that receive no token, in fp32 and bf16 (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from model import grouped_experts
from tests.helpers.saved import saved_storages
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


def _plain_autograd(x, fc1, fc2, probs, ends):
    """The grouped experts' math as autograd alone would run it (keeping every intermediate)."""
    hidden = torch._grouped_mm(x, fc1.transpose(1, 2), offs=ends)
    gate, up = hidden.float().chunk(2, dim=-1)
    act = (F.silu(gate) * up * probs.unsqueeze(-1)).to(hidden.dtype)
    return torch._grouped_mm(act, fc2.transpose(1, 2), offs=ends)


def _saved_bytes(fn, *args):
    out, storages = saved_storages(fn, *args)
    return out, sum(nbytes for nbytes, _ in storages)


def _moe_step(moe, x, regather: bool):
    """One forward and backward of the whole MoE layer: output, input gradient, parameter gradients
    and the bytes autograd kept for the backward."""
    source = moe.experts.permutation_source
    moe.experts.permutation_source = source if regather else None
    try:
        moe.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        (out, _), kept = _saved_bytes(moe, x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    finally:
        moe.experts.permutation_source = source
    return out.detach(), x.grad, [p.grad for p in moe.parameters()], kept


def test_moe_layer_gathers_the_routed_input_again(experts):
    """In the MoE layer the experts keep the dispatcher's (layer input, permutation index) instead of
    the permuted copy of the input (k rows per token) and gather it again in backward: the same
    outputs and gradients to the bit, and k x tokens x hidden fewer kept bytes."""
    from model.model import build_model

    model = build_model(mixed_config())
    layer = next(layer for layer in model.layers if layer.ffn_type == "moe")
    moe, config = layer.ffn, mixed_config()
    assert moe.experts.permutation_source is not None
    tokens = 48
    x = torch.randn(tokens, 1, config.hidden_size, generator=torch.Generator().manual_seed(5))
    plain, regathered = _moe_step(moe, x, False), _moe_step(moe, x, True)
    assert torch.equal(regathered[0], plain[0]) and torch.equal(regathered[1], plain[1])
    for a, b in zip(regathered[2], plain[2]):
        assert (a is None and b is None) or torch.equal(a, b)
    routed_copy = config.num_experts_per_token * tokens * config.hidden_size * 4
    assert plain[3] - regathered[3] >= routed_copy - 1024  # the index (int64) is kept instead
    assert moe.token_dispatcher.permuted_from is None  # consumed: no reference outlives the forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_activation_matches_autograd_and_keeps_less(dtype):
    """The experts' function (SwiGLU and its gradient recomputed in one pass in backward) gives
    autograd's output and, in fp32, its gradients to the bit, and keeps only x, [gate | up] and the
    probabilities besides the weights."""
    E, H, Fd = 4, 16, 24
    counts = torch.tensor([5, 0, 7, 4])  # an expert without tokens
    N = int(counts.sum())
    ends = torch.cumsum(counts, 0).to(torch.int32)
    gen = torch.Generator().manual_seed(3)
    leaves = [torch.randn(N, H, generator=gen).to(dtype), torch.randn(E, 2 * Fd, H, generator=gen).to(dtype),
              torch.randn(E, H, Fd, generator=gen).to(dtype), torch.rand(N, generator=gen)]
    d_out = torch.randn(N, H, generator=gen).to(dtype)
    results = []
    for fn in (_plain_autograd, grouped_experts._SwiGLUExperts.apply):
        args = [t.clone().requires_grad_() for t in leaves]
        out, saved = _saved_bytes(fn, *args, ends)
        out.backward(d_out)
        results.append((out.detach(), [a.grad for a in args], saved))
    (out_ref, grads_ref, saved_ref), (out, grads, saved) = results
    assert torch.equal(out, out_ref)
    for name, g, g_ref in zip(("x", "fc1", "fc2", "probs"), grads, grads_ref):
        if dtype == torch.float32:  # autograd's ops in autograd's order
            assert torch.equal(g, g_ref), name
        else:  # bf16 in, fp32 inside: autograd rounds silu(gate) * up to bf16 on the way
            err = ((g.float() - g_ref.float()).norm() / g_ref.float().norm()).item()
            assert err < 2e-2, f"{name}: relative error {err:.2e}"
    weights = sum(t.numel() * t.element_size() for t in leaves[1:3])
    size = leaves[0].element_size()
    assert saved - weights <= N * (H + 2 * Fd) * size + N * 4 + ends.numel() * 4
    assert saved_ref - weights >= N * (H + 3 * Fd) * size  # what the recompute saves


def test_fused_swiglu_and_row_sums_compile_to_their_eager_form():
    """The compiled (train.compile) SwiGLU forward/backward and the dispatcher's row sums equal their
    eager form (CPU inductor; the CUDA build runs the same graphs as Triton kernels)."""
    from model import dispatch, fusion

    gen = torch.Generator().manual_seed(8)
    hidden, probs, d_act = (torch.randn(12, 10, generator=gen), torch.rand(12, generator=gen),
                            torch.randn(12, 5, generator=gen))
    rows, by_token = torch.randn(12, 6, generator=gen), torch.randperm(12, generator=gen)
    cases = [(grouped_experts._swiglu_times_probs, (hidden, probs)),
             (grouped_experts._swiglu_times_probs_backward, (hidden, probs, d_act)),
             (dispatch._sum_rows, (rows, by_token, 3))]
    torch._dynamo.reset()
    fusion.enable(True, cpu=True)
    try:
        with torch._dynamo.config.patch(disable=False):
            for fn, args in cases:
                got, want = fn(*args), fn.eager(*args)
                for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        fusion.enable(False)
        torch._dynamo.reset()
