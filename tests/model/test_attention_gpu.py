"""The GPU attention path of MLA (flash attention over cu_seqlens) against the masked SDPA path.

Both see the same bf16 inputs; the reference runs the block-diagonal causal mask in fp32 on the GPU.
Documents end mid-sample, one has length 1, v is narrower than q/k (as in the presets: 128 vs 192).
"""

import pytest
import torch

from model import mla
from model.packed import pack

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def test_varlen_flash_matches_masked_attention():
    torch.manual_seed(0)
    batch, seq, heads, dqk, dv = 2, 384, 4, 192, 128
    cu = torch.tensor([0, 100, 101, 384, 500, 768], dtype=torch.int32)
    packed = pack(batch, seq, cu, "cuda")
    assert packed.max_document_length == 283
    q, k, v = (torch.randn(batch * seq, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for d in (dqk, dqk, dv))
    assert mla._use_varlen_flash(q), "torch.nn.attention.varlen is missing on this GPU's torch"
    scale = dqk ** -0.5
    out = mla.document_causal_attention(q, k, v, packed, scale)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = mla.document_causal_attention(q32, k32, v32, packed, scale)  # fp32: the masked SDPA path
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert out.shape == ref.shape == (batch * seq, heads, dv)
    assert rel(out, ref) < 1e-2
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel(g, r) < 2e-2, name
