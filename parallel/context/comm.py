"""The collectives of context parallelism over the CP process group, with their gradients.

* ``all_gather_pairs``: all-gather of fixed-size fp32 tensors (KDA's chunk-state pairs); no autograd.
* ``GatherTokens``: all-gather along dim 0 (MLA's compressed keys); backward reduce-scatters the
  gradient (summing what every rank's queries sent back to each token's owner).
* ``HaloExchange``: the previous rank's last rows to the next rank (the short convolution's halo);
  backward sends the halo's gradient back.

Each call moves a size fixed by the layer's shape: docs/parallelism.md gives the formulas and
tests/parallel/test_context_parallel.py counts the bytes against them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_pairs(local: torch.Tensor, group, size: int) -> torch.Tensor:
    """[*shape] on every rank -> [size, *shape], rank-major (no autograd)."""
    out = local.new_empty(size * local.numel())
    dist.all_gather_into_tensor(out, local.contiguous().view(-1), group=group)
    return out.view(size, *local.shape)


class GatherTokens(torch.autograd.Function):
    """[n, ...] per rank -> [size * n, ...] rank-major; backward: reduce-scatter (sum) to the owners."""

    @staticmethod
    def forward(ctx, local, group, size):
        ctx.group, ctx.size = group, size
        out = local.new_empty(size * local.shape[0], *local.shape[1:])
        dist.all_gather_into_tensor(out, local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        local = grad.new_empty(grad.shape[0] // ctx.size, *grad.shape[1:])
        dist.reduce_scatter_tensor(local, grad.contiguous(), group=ctx.group)
        return local, None, None


def _neighbour_exchange(send: torch.Tensor | None, send_to: int | None, recv_like: torch.Tensor,
                        recv_from: int | None, group) -> torch.Tensor:
    """Post the receive and the send together (no ordering deadlock); zeros where nothing arrives."""
    received = torch.zeros_like(recv_like)
    peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    requests = []
    if recv_from is not None:
        requests.append(dist.irecv(received, peer(recv_from), group=group))
    if send_to is not None:
        requests.append(dist.isend(send.contiguous(), peer(send_to), group=group))
    for request in requests:
        request.wait()
    return received


class HaloExchange(torch.autograd.Function):
    """Rank r gets rank r-1's ``tail`` (zeros where nothing is received); backward returns the
    gradient of what it received to rank r-1. ``send`` / ``receive``: whether this rank sends to
    r+1 and receives from r-1 (both ends of a pair must agree)."""

    @staticmethod
    def forward(ctx, tail, group, rank, send, receive):
        ctx.group, ctx.rank, ctx.send, ctx.receive = group, rank, send, receive
        return _neighbour_exchange(tail, rank + 1 if send else None, tail, rank - 1 if receive else None, group)

    @staticmethod
    def backward(ctx, grad):
        back = _neighbour_exchange(grad, ctx.rank - 1 if ctx.receive else None, grad,
                                   ctx.rank + 1 if ctx.send else None, ctx.group)
        return back, None, None, None, None
