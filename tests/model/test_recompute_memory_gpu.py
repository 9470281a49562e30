"""Activation recompute on the GPU: after a recomputed layer's forward the allocator holds only what
the layer returns (the checkpoint keeps the input, which the caller owns anyway), and after its
backward nothing more than before it. Anything else a layer leaves allocated is multiplied by the
number of layers: recomputed activations kept alive after the backward (tests/model/
test_recompute_memory.py says how) made the KDA arms of the throughput benchmark (issue 10) run out
of memory. On failure after the forward the test names the lines holding the memory.
"""

import pytest
import torch

from model.packed import pack
from tests.helpers.small_models import mixed_config

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

TOKENS = 4096
CU = [0, 1000, 1001, 2900, TOKENS]


@pytest.fixture(scope="module")
def model():
    from model.model import build_model
    from parallel import state
    from train.precision import to_bf16

    state.initialize(state.ParallelDims(), seed=3)
    config = mixed_config(hidden_size=256, kda_num_heads=4, kda_head_dim=128, num_attention_heads=4,
                          qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=128)
    return to_bf16(build_model(config).cuda()).train()


def held_by_line(snapshot: dict, top: int = 8) -> str:
    """Live blocks allocated while history was recorded, by innermost repository frame."""
    sizes = {}
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            frames = block.get("frames") or []
            if block["state"] != "active_allocated" or not frames:
                continue
            ours = [f for f in frames if "site-packages" not in f["filename"]] or frames
            key = f"{ours[0]['filename'].rsplit('/', 1)[-1]}:{ours[0]['line']} {ours[0]['name']}"
            sizes[key] = sizes.get(key, 0) + block["size"]
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{size / 2**20:.1f} MiB {key}" for key, size in ranked)


@pytest.mark.parametrize("index,kind", [(0, "kda"), (1, "mla"), (2, "gdn")])
def test_recomputed_layer_holds_only_its_output(model, index, kind):
    layer = model.layers[index]
    assert layer.layer_type == kind
    layer.recompute = True
    packed = pack(1, TOKENS, torch.tensor(CU, dtype=torch.int32), "cuda")
    x = torch.randn(TOKENS, 1, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x, packed).float().sum().backward()  # warm-up: workspaces, cached tables, compiled kernels
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
    try:
        out = layer(x, packed)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    # the output, plus allocator rounding and the autograd graph's small index tensors
    allowed = out.numel() * out.element_size() + 4 * 2**20
    assert held <= allowed, f"{kind}: {held / 2**20:.1f} MiB held after a recomputed forward " \
                            f"(output {out.numel() * out.element_size() / 2**20:.1f} MiB): {held_by_line(snapshot)}"
    out.float().sum().backward()
    del out
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated() - before  # the gradients were allocated in the warm-up
    assert left <= 4 * 2**20, f"{kind}: {left / 2**20:.1f} MiB of the recomputed forward outlive its backward"
    assert torch.isfinite(x.grad).all()
