"""The KDA/GDN short convolution with its SiLU, forward and backward as one Triton kernel each.

``y[t, c] = silu(sum_i w[c, i] x[t - (W-1-i), c])`` over the taps that stay in ``t``'s document
(``position[t] >= W-1-i``): the causal depthwise convolution of model/packed.py followed by SiLU.
Compiled by inductor from that PyTorch expression, a q/k/v convolution of a 32k-token, 2048-channel
step took about 1 ms forward + backward on the H200 (four kernels, the weight gradient a separate
reduction over all tokens), about six times what its bytes cost (docs/log.md, 2026-12-04). Here:

* forward: one program per (block of ``BT`` tokens, block of ``BC`` channels) accumulates the W
  shifted rows in fp32 (the shifted loads of one block overlap and hit the cache);
* backward: the same blocks; the gradient of the pre-activation at a token ``u`` is recomputed
  where it is needed (rows ``t .. t+W-1`` for ``dx[t]``) instead of being written and read back,
  and each block writes its partial weight gradient ``[C, W]`` (fp32), summed by PyTorch.

Numerics: products and sums in fp32, results in the input's dtype; the weight gradient sums the
blocks' fp32 partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 64 x 64 blocks on 8 warps: 189 registers in the backward without spills on sm_90 (Triton 3.8; 4 warps
# spill 640 bytes), 112 in the forward; fewer token blocks keep the weight-gradient partials small
BLOCK_TOKENS, BLOCK_CHANNELS, WARPS = 64, 64, 8


@triton.jit
def _pre_activation(x, w, pos, u, cols, T, C, W: tl.constexpr):
    """fp32 ``[BT, BC]``: the convolution at tokens ``u`` (0 where ``u >= T``), and the position of ``u``."""
    inside = u < T
    p = tl.load(pos + u, mask=inside, other=0)
    cmask = cols < C
    acc = tl.zeros((u.shape[0], cols.shape[0]), dtype=tl.float32)
    for i in tl.static_range(W):
        shift = W - 1 - i
        tap = inside & (p >= shift)  # the source token is in u's document (position >= shift)
        xs = tl.load(x + (u - shift)[:, None] * C + cols[None, :], mask=tap[:, None] & cmask[None, :], other=0.)
        wi = tl.load(w + cols * W + i, mask=cmask, other=0.).to(tl.float32)
        acc += xs.to(tl.float32) * wi[None, :]
    return acc, p


@triton.jit
def short_conv_silu_fwd_kernel(x, w, pos, y, T, C, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    pre, _ = _pre_activation(x, w, pos, rows, cols, T, C, W)
    out = pre * tl.sigmoid(pre)
    tl.store(y + rows[:, None] * C + cols[None, :], out.to(y.dtype.element_ty),
             mask=(rows < T)[:, None] & (cols < C)[None, :])


@triton.jit
def _pre_activation_grad(x, w, pos, dy, u, cols, T, C, W: tl.constexpr):
    """fp32 ``[BT, BC]`` gradient of the pre-activation at tokens ``u`` (0 where ``u >= T``), and
    the position of ``u`` in its document."""
    pre, p = _pre_activation(x, w, pos, u, cols, T, C, W)
    inside = u < T
    grad = tl.load(dy + u[:, None] * C + cols[None, :], mask=inside[:, None] & (cols < C)[None, :], other=0.)
    sig = tl.sigmoid(pre)
    return grad.to(tl.float32) * sig * (1. + pre * (1. - sig)), p  # d silu(z) / dz


@triton.jit
def short_conv_silu_bwd_kernel(x, w, pos, dy, dx, dw_part, T, C, W: tl.constexpr, BT: tl.constexpr,
                               BC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    inside = rows < T
    # this block's tokens: their share of dw[c, i] = sum_t d_pre[t, c] x[t - (W-1-i), c]
    d_pre, p = _pre_activation_grad(x, w, pos, dy, rows, cols, T, C, W)
    for i in range(W):
        shift = W - 1 - i
        tap = inside & (p >= shift)
        xs = tl.load(x + (rows - shift)[:, None] * C + cols[None, :], mask=tap[:, None] & cmask[None, :], other=0.)
        part = tl.sum(d_pre * xs.to(tl.float32), axis=0)
        tl.store(dw_part + (tl.program_id(0).to(tl.int64) * C + cols) * W + i, part, mask=cmask)
    d_x = d_pre * tl.load(w + cols * W + (W - 1), mask=cmask, other=0.).to(tl.float32)[None, :]
    for j in range(1, W):
        # token u = t + j reads x[t] through tap W-1-j, when that tap stays in u's document
        u = rows + j
        d_pre, p = _pre_activation_grad(x, w, pos, dy, u, cols, T, C, W)
        wj = tl.load(w + cols * W + (W - 1 - j), mask=cmask, other=0.).to(tl.float32)
        d_x += tl.where(((u < T) & (p >= j))[:, None], d_pre * wj[None, :], 0.)
    tl.store(dx + rows[:, None] * C + cols[None, :], d_x.to(dx.dtype.element_ty), mask=inside[:, None] & cmask[None, :])


def _grid(T, C):
    return triton.cdiv(T, BLOCK_TOKENS), triton.cdiv(C, BLOCK_CHANNELS)


class ShortConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, position):
        T, C = x.shape
        W = weight.shape[-1]
        x = x.contiguous()
        w = weight.reshape(C, W).contiguous()
        position = position.contiguous()
        y = torch.empty_like(x)
        short_conv_silu_fwd_kernel[_grid(T, C)](x, w, position, y, T, C, W=W, BT=BLOCK_TOKENS,
                                                BC=BLOCK_CHANNELS, num_warps=WARPS)
        ctx.save_for_backward(x, w, position)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, position = ctx.saved_tensors
        T, C = x.shape
        W = w.shape[-1]
        dx = torch.empty_like(x)
        grid = _grid(T, C)
        dw_part = torch.empty(grid[0], C, W, dtype=torch.float32, device=x.device)
        short_conv_silu_bwd_kernel[grid](x, w, position, dy.contiguous(), dx, dw_part, T, C, W=W,
                                         BT=BLOCK_TOKENS, BC=BLOCK_CHANNELS, num_warps=WARPS)
        dw = dw_part.sum(0).to(ctx.weight_dtype).view(ctx.weight_shape)
        return dx, dw, None


def short_conv_silu_triton(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``silu(causal_depthwise_conv(x, weight, position))`` (model/packed.py) by the Triton kernels:
    x ``[T, C]``, weight ``[C, 1, W]``, position ``[T]`` (each token's position in its document)."""
    return ShortConvSiLU.apply(x, weight, position)
