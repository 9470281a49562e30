"""The sync-free local dispatcher (model/dispatch.py) == megatron's allgather dispatcher: same
permuted tokens, probabilities and counts, and the same MoE layer output and gradients."""

import pytest
import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

from model.dispatch import LocalAllGatherDispatcher
from tests.helpers.small_models import mixed_config


@pytest.fixture(scope="module")
def moe():
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=11)
    model = build_model(mixed_config(num_experts=8, num_experts_per_token=3))
    layer = next(layer.ffn for layer in model.layers if layer.ffn_type == "moe")
    assert type(layer.token_dispatcher) is LocalAllGatherDispatcher
    return layer


def run(moe, dispatcher_class, x):
    moe.token_dispatcher.__class__ = dispatcher_class
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, _ = moe(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def test_dispatch_step_matches_megatron(moe):
    gen = torch.Generator().manual_seed(0)
    tokens, experts = 50, 8
    hidden = torch.randn(tokens, 16, generator=gen)
    scores = torch.rand(tokens, experts, generator=gen)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    routing_map.scatter_(1, scores.topk(3, dim=1).indices, True)
    probs = (scores * routing_map).requires_grad_()
    results = []
    for cls in (MoEAllGatherTokenDispatcher, LocalAllGatherDispatcher):
        moe.token_dispatcher.__class__ = cls
        moe.token_dispatcher.routing_map = routing_map
        results.append(moe.token_dispatcher.dispatch_postprocess(hidden, probs))
    (ref_x, ref_counts, ref_p), (x, counts, p) = results
    assert torch.equal(x, ref_x) and torch.equal(p, ref_p)
    assert counts.tolist() == ref_counts.tolist() and counts.device == hidden.device
    moe.token_dispatcher.__class__ = LocalAllGatherDispatcher


def test_moe_layer_output_and_gradients_match_megatron(moe):
    x = torch.randn(40, 1, mixed_config().hidden_size, generator=torch.Generator().manual_seed(1))
    ref_out, ref_dx, ref_grads = run(moe, MoEAllGatherTokenDispatcher, x)
    out, dx, grads = run(moe, LocalAllGatherDispatcher, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
