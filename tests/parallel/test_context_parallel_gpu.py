"""Chunkwise KDA context parallelism with the Triton pre-passes on a GPU, ranks simulated in one process.

The all-gather is replaced by a stub that hands each rank the pairs (forward) and gradients (backward)
the other ranks produced earlier: forwards run from rank 0 up, backwards from the last rank down, as
the data dependencies of the scheme require. fp32 must match CP=1 to fp32 tolerance; in bf16 (the
pieces stored in bf16, states and pre-pass dots fp32) the error against the fp32 CP=1 run may not
exceed 1.5x the bf16 CP=1 run's own.
"""
import pytest
import torch

from kernels.kda.chunk import chunk_kda_triton
from parallel.context import ContextParallel, kda_chunkwise

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
P, L, H, D = 4, 320, 4, 128
CU_SAMPLE = [0, 70, 640, 641, 1000, 1280]  # straddles, spans three ranks, length 1, starts at 640 = 2L


class SequentialGather:
    """The other ranks' contributions of the same kind (pairs or gradients: told apart by shape)."""

    def __init__(self):
        self.rank, self.seen = 0, {}

    def __call__(self, local, group, size):
        store = self.seen.setdefault(tuple(local.shape), {})
        store[self.rank] = local.clone()
        out = local.new_zeros(size, *local.shape)
        for j, value in store.items():
            out[j] = value
        return out


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    T = P * L
    x = dict(q=torch.randn(1, T, H, D, generator=gen), k=torch.randn(1, T, H, D, generator=gen),
             v=torch.randn(1, T, H, D, generator=gen), g=torch.randn(1, T, H, D, generator=gen),
             beta=torch.rand(1, T, H, generator=gen) * 0.9 + 0.05)
    gate = (torch.empty(H).uniform_(1, 16, generator=gen).log(), torch.randn(H * D, generator=gen) * 0.5 - 1.0)
    w = torch.randn(1, T, H, D, generator=gen)
    cast = lambda t: t.to(DEVICE, dtype if t.dim() == 4 else torch.float32)  # beta stays fp32, as in the model
    return {k: cast(v) for k, v in x.items()}, tuple(t.to(DEVICE) for t in gate), w.to(DEVICE, dtype)


def _grads(o, w, leaves):
    return [o.float()] + list(torch.autograd.grad(o, leaves, w))


def _cp1(inputs, gate, w):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    params = [p.clone().requires_grad_() for p in gate]
    o, _ = chunk_kda_triton(**leaves, cu_seqlens=torch.tensor(CU_SAMPLE, dtype=torch.int32),
                            gate=(*params, None))
    return _grads(o, w, [*leaves.values(), *params])


def _cp(inputs, gate, w, monkeypatch):
    stub = SequentialGather()
    monkeypatch.setattr(kda_chunkwise, "all_gather_pairs", stub)
    global_cu = torch.tensor(CU_SAMPLE, dtype=torch.int32)
    params = [p.clone().requires_grad_() for p in gate]
    outs, leaves = [], []
    for r in range(P):
        starts = [x - r * L for x in CU_SAMPLE if r * L < x < (r + 1) * L]
        cp = ContextParallel(group=None, rank=r, size=P, mode="chunkwise", batch_size=1, local_length=L,
                             cu_seqlens=torch.tensor([0, *starts, L], dtype=torch.int32), global_cu_seqlens=global_cu)
        mine = {k: v[:, r * L:(r + 1) * L].clone().requires_grad_() for k, v in inputs.items()}
        stub.rank = r
        outs.append(kda_chunkwise.chunkwise_kda(**mine, cp=cp, gate=(*params, None), fused_prepass=True))
        leaves.append(mine)
    for r in reversed(range(P)):
        stub.rank = r
        outs[r].backward(w[:, r * L:(r + 1) * L])
    cat = lambda name: torch.cat([leaf[name].grad for leaf in leaves], 1)
    return [torch.cat(outs, 1).float()] + [cat(name) for name in inputs] + [p.grad for p in params]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


NAMES = ["o", "dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias"]


def test_fp32_matches_cp1(monkeypatch):
    inputs, gate, w = _inputs(torch.float32)
    for name, ours, ref in zip(NAMES, _cp(inputs, gate, w, monkeypatch), _cp1(inputs, gate, w)):
        # the gate-parameter gradients are sums over all tokens of terms that partly cancel
        assert _rel(ours, ref) < (3e-4 if name in ("dA_log", "ddt_bias") else 3e-5), name


def test_bf16_error_like_cp1(monkeypatch):
    inputs, gate, w = _inputs(torch.bfloat16)
    exact = _cp1({k: v.float() for k, v in inputs.items()}, gate, w.float())
    ours, cp1 = _cp(inputs, gate, w, monkeypatch), _cp1(inputs, gate, w)
    for name, a, b, ref in zip(NAMES, ours, cp1, exact):
        assert _rel(a, ref) <= 1.5 * _rel(b, ref) + 1e-3, (name, _rel(a, ref), _rel(b, ref))


def test_mla_latent_flash_path_matches_masked_path():
    """The varlen flash call (query segments against their documents' keys, bottom-right causal) equals
    the masked SDPA of the same keys, on a middle rank whose first segment continues a document."""
    from model.mla import _varlen_attn
    from parallel.context.mla_latent import _KeyPlan, latent_attention

    if _varlen_attn() is None:
        pytest.skip("this torch has no varlen attention")
    r = 2
    starts = [x - r * L for x in CU_SAMPLE if r * L < x < (r + 1) * L]
    cp = ContextParallel(group=None, rank=r, size=P, mode="chunkwise", batch_size=1, local_length=L,
                         cu_seqlens=torch.tensor([0, *starts, L], dtype=torch.int32),
                         global_cu_seqlens=torch.tensor(CU_SAMPLE, dtype=torch.int32))
    keys = sum(_KeyPlan.of(cp, "cuda").key_count)
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(n, 8, 192, generator=gen).cuda().to(torch.bfloat16) for n in (L, keys))
    v = torch.randn(keys, 8, 128, generator=gen).cuda().to(torch.bfloat16)
    flash = latent_attention(cp, q, k, v, 192 ** -0.5, flash=True)
    masked = latent_attention(cp, q.float(), k.float(), v.float(), 192 ** -0.5, flash=False)
    assert _rel(flash, masked) < 1e-2
