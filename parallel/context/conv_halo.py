"""The KDA short causal convolution on a context-parallel slice: the previous rank's halo.

A depthwise causal convolution of width W reads the W-1 tokens before each output. The first W-1
outputs of rank r's slice therefore need the last W-1 inputs of rank r-1 (the halo) when the slice
continues a document. ``conv_silu_with_halo`` sends every rank's last W-1 input rows (q, k and v
projections in one message) to the next rank, prepends what it received, and runs the model's own
convolution (``model.kda.short_conv_silu``) with each token's global position in its document, so a
tap never crosses a document start; backward sends the halo's gradient back. A pair of ranks talks
only when the later slice of some sample continues a document.
"""

from __future__ import annotations

import torch

from .comm import HaloExchange
from .layout import ContextParallel, ContextParallelError


def conv_silu_with_halo(cp: ContextParallel, projections, kernels) -> list[torch.Tensor]:
    """SiLU(causal conv) of each [b*L, C] projection with its [C, 1, W] kernel, for this rank's slice."""
    from model.kda import short_conv_silu

    b, L = cp.batch_size, cp.local_length
    halo = kernels[0].shape[-1] - 1
    if halo > L:
        raise ContextParallelError(
            f"the short convolution reads {halo} tokens back but a CP slice has only L = {L} tokens; "
            f"use a longer --seq-length or a smaller --context-parallel-size")
    xs = [x.view(b, L, -1) for x in projections]
    widths = [x.shape[-1] for x in xs]
    receive = cp.rank > 0 and bool(cp.continues[cp.rank].any())
    send = cp.rank + 1 < cp.size and bool(cp.continues[cp.rank + 1].any())
    tails = torch.cat([x[:, L - halo:] for x in xs], -1)
    received = HaloExchange.apply(tails, cp.group, cp.rank, send, receive).split(widths, -1)
    position = cp.positions_before(halo, xs[0].device).flatten()
    outs = []
    for x, before, kernel in zip(xs, received, kernels):
        extended = torch.cat([before, x], 1).flatten(0, 1)
        y = short_conv_silu(extended, kernel, position).view(b, halo + L, -1)
        outs.append(y[:, halo:].flatten(0, 1))
    return outs
