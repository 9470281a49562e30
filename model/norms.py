"""RMSNorm variants, computed in fp32 as the released model does."""

from __future__ import annotations

import torch
from torch import nn

from .fusion import fused


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """``weight * normalize(x)``; the normalised value is cast back to the input dtype first."""

    def __init__(self, size: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        # under sequence parallelism each rank normalises its own tokens: the gradient is partial
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * rms_normalize(x, eps).to(x.dtype)


@fused
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """KDA output norm: RMSNorm over each head's channels times sigmoid(gate), in fp32."""
    y = rms_normalize(x, eps) * weight.float() * torch.sigmoid(gate.float())
    return y.to(x.dtype)
