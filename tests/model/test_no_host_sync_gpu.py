"""No host synchronisation in the layers' hot path on a GPU: after the first call of a batch, the
KDA op (its chunk tables are cached per cu_seqlens tensor) and a MoE layer (model/dispatch.py) run
forward and backward without waiting for the GPU. Each wait drains the GPU's queue, and the
throughput profile counts what follows as idle time (docs/benchmarks.md)."""

import pytest
import torch

from tests.helpers.small_models import mixed_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_kda_op_does_not_sync_after_the_first_call():
    from kernels.kda import chunk_kda

    torch.manual_seed(0)
    T, H, D = 300, 2, 64
    cu = torch.tensor([0, 100, 101, T], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, T, H, D, device="cuda", requires_grad=True)
    beta = torch.rand(1, T, H, device="cuda", requires_grad=True)
    gate = (torch.zeros(H, device="cuda"), torch.zeros(H * D, device="cuda"), None)

    def step():
        o, _ = chunk_kda(q, k, v, g, beta, cu_seqlens=cu, gate=gate)
        o.float().sum().backward()

    step()  # builds the tables for this cu_seqlens (one read of it)
    no_sync(step)


def test_moe_layer_does_not_sync():
    from model.model import build_model
    from parallel import state
    from train.precision import to_bf16

    state.initialize(state.ParallelDims(), seed=2)
    model = to_bf16(build_model(mixed_config(hidden_size=128, moe_intermediate_size=64)).cuda())
    moe = next(layer.ffn for layer in model.layers if layer.ffn_type == "moe")
    x = torch.randn(256, 1, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, _ = moe(x)
        out.float().sum().backward()

    step()  # first call: lazily built state
    no_sync(step)


def test_model_step_on_a_new_batch_does_not_sync():
    """A whole forward and backward of a KDA + MLA + MoE model on a batch it has not seen, moved to
    the GPU as the training loop moves it: the host reads the document boundaries from its own copy
    (kernels/host_values.py), so queueing the step never waits for the GPU (the next step's forward
    can be queued while the GPU still runs this one's optimizer)."""
    from model.model import build_model
    from parallel import state
    from train.loop import _to_device
    from train.precision import to_bf16

    state.initialize(state.ParallelDims(), seed=2)
    model = to_bf16(build_model(mixed_config(hidden_size=128, moe_intermediate_size=64)).cuda())

    def batch(boundaries):
        tokens = torch.randint(0, 512, (2, 256))
        return {"tokens": tokens, "labels": tokens.roll(-1, 1), "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32)}

    def step(host_batch):
        b = _to_device(host_batch, torch.device("cuda"))
        model(b["tokens"], b["cu_seqlens"], labels=b["labels"]).float().sum().backward()

    step(batch([0, 100, 256, 300, 512]))  # first call: lazily built state
    no_sync(lambda: step(batch([0, 7, 256, 400, 512])))
