"""When flash-linear-attention's kernels may be called here (for comparisons, never for training)."""

from __future__ import annotations

import re

import torch


def fla_backward_usable() -> bool:
    """FLA's gated-delta backward is miscompiled by Triton < 3.7.1 on Hopper (fla#640). FLA 0.6.0
    does not refuse it on Triton 3.6: on an H200 it hung for minutes and then left the CUDA context
    with an illegal-address error, so benchmarks and tests do not call it there."""
    import triton

    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:3])
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    return not (hopper and version < (3, 7, 1))
