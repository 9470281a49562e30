"""kernels/short_conv.py against the PyTorch expression it replaces (model/packed.py's per-document
causal convolution, then SiLU): output and the gradients of the input and the weight, in fp32 in the
Triton interpreter on CPU, in bf16 on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from kernels.short_conv import BLOCK_CHANNELS, BLOCK_TOKENS, short_conv_silu_triton
from model.packed import causal_depthwise_conv, pack


def reference(x, weight, position):
    return F.silu(causal_depthwise_conv(x.double(), weight.double(), position))


def _case(lengths, channels, width, device, dtype, seed=0):
    """Documents of ``lengths`` packed into one stream (one sample), random input and weight."""
    torch.manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    position = pack(1, total, cu, device).position_in_document
    x = torch.randn(total, channels, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(channels, 1, width, device=device) / width).to(dtype).requires_grad_()
    return x, weight, position


def _check(lengths, channels, width, device, dtype, tol):
    x, weight, position = _case(lengths, channels, width, device, dtype)
    dy = torch.randn(x.shape, device=device).to(dtype)
    out = short_conv_silu_triton(x, weight, position)
    dx, dw = torch.autograd.grad(out, (x, weight), dy)
    want = reference(x, weight, position)
    dx_ref, dw_ref = torch.autograd.grad(want, (x, weight), dy.double())
    assert out.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == weight.dtype and dw.shape == weight.shape
    for got, ref in ((out, want), (dx, dx_ref), (dw, dw_ref)):
        err = (got.double() - ref).norm() / ref.norm()
        assert err < tol, (err, got.shape)


@pytest.mark.parametrize("lengths,channels,width", [
    ([BLOCK_TOKENS + 5], BLOCK_CHANNELS, 4),  # one document over two token blocks
    ([1, 2, 3, 70, 1, 50], 80, 4),  # documents shorter than the window, channels over one block
    ([40, 33], 16, 2),
    ([9, 128], 8, 3),
])
def test_matches_the_pytorch_convolution_in_fp32(lengths, channels, width):
    _check(lengths, channels, width, "cpu", torch.float32, tol=1e-6)


def test_taps_never_cross_a_document_start():
    """A document's outputs and its input gradients do not change when the previous document does."""
    x, weight, position = _case([5, 7], 8, 4, "cpu", torch.float32)
    out = short_conv_silu_triton(x, weight, position)
    changed = x.detach().clone()
    changed[:5] += 10.0
    again = short_conv_silu_triton(changed, weight, position)
    assert torch.equal(out[5:], again[5:]) and not torch.equal(out[:5], again[:5])
    dy = torch.zeros_like(out)
    dy[5:] = 1.0
    (dx,) = torch.autograd.grad(short_conv_silu_triton(x, weight, position), (x,), dy)
    assert torch.equal(dx[:5], torch.zeros_like(dx[:5])) and dx[5:].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_the_gpu():
    _check([1, 2, 3, 500, 4000, 1], 2048, 4, "cuda", torch.bfloat16, tol=1e-2)
