"""Activation recompute keeps nothing of a layer alive after its backward (CPU).

torch's non-reentrant checkpoint keeps every tensor saved by the recomputed forward inside that
forward's autograd graph, so any reference to the recomputed graph (megatron's token dispatcher
stores the routing probabilities, with their grad_fn, as an attribute) keeps all of the layer's
recomputed activations until the layer's next forward. On the H200 that was 3.2 GiB per KDA layer
at 16k tokens (issue 10). The test counts the bytes of every tensor created during a step that are
still alive after it, with and without recompute: they must be the same.
"""

import gc
import weakref

import pytest
import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher
from torch.utils._python_dispatch import TorchDispatchMode

from model.dispatch import LocalAllGatherDispatcher
from model.packed import pack
from tests.helpers.small_models import mixed_config

TOKENS = 256
CU = [0, 100, 101, TOKENS]


class TensorsCreated(TorchDispatchMode):
    """Weak references to the outputs of every op run under it."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.refs.append(weakref.ref(value))
        return out

    def bytes_alive(self, exclude: set[int]) -> int:
        gc.collect()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (r() for r in self.refs) if t is not None and id(t) not in exclude}
        return sum(storages.values())


@pytest.fixture(scope="module")
def model():
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=3)
    return build_model(mixed_config()).train()


def bytes_left_by_a_step(model, layer, recompute: bool) -> int:
    layer.recompute = recompute
    packed = pack(1, TOKENS, torch.tensor(CU, dtype=torch.int32), "cpu")
    x = torch.randn(TOKENS, 1, mixed_config().hidden_size, requires_grad=True)
    created = TensorsCreated()
    with created:
        layer(x, packed).sum().backward()
    kept = {id(t) for t in [*layer.parameters(), *layer.buffers()]}
    kept |= {id(p.grad) for p in layer.parameters() if p.grad is not None}
    return created.bytes_alive(kept)


@pytest.mark.parametrize("dispatcher", ["local", "megatron"])  # megatron's keeps local_probs (TP/EP path)
@pytest.mark.parametrize("index,kind", [(1, "mla"), (2, "gdn"), (3, "kda")])
def test_recomputed_moe_layer_keeps_nothing_after_backward(model, index, kind, dispatcher):
    layer = model.layers[index]
    assert (layer.layer_type, layer.ffn_type) == (kind, "moe")
    classes = {"local": LocalAllGatherDispatcher, "megatron": MoEAllGatherTokenDispatcher}
    layer.ffn.token_dispatcher.__class__ = classes[dispatcher]
    bytes_left_by_a_step(model, layer, recompute=False)  # first step: gradients and counters appear
    plain = bytes_left_by_a_step(model, layer, recompute=False)
    recomputed = bytes_left_by_a_step(model, layer, recompute=True)
    layer.ffn.token_dispatcher.__class__ = LocalAllGatherDispatcher
    assert recomputed <= plain + 1024, f"{kind}: {recomputed - plain} bytes of the recomputed forward outlive the step"
