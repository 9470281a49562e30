"""Gradient reduction across data-parallel ranks and a tensor-parallel-aware global norm/clip."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn


def all_reduce_data_parallel(model: nn.Module) -> None:
    """Average gradients over the data-parallel group, one flat buffer per dtype."""
    world = parallel_state.get_data_parallel_world_size()
    if world == 1:
        return
    group = parallel_state.get_data_parallel_group()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def all_reduce_sequence_parallel(model: nn.Module) -> None:
    """Sum over TP ranks the gradients of replicated weights that saw only this rank's tokens
    (norms, router, low-rank down-projections under sequence parallelism)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def global_grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm of the full model's gradient: TP-split parameters counted once per shard,
    replicated ones once in total."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    grads = [
        p.grad.detach() for p in model.parameters()
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    ]
    norms = torch._foreach_norm(grads) if grads else []
    squares = torch.stack([n.double() for n in norms]).pow(2).sum().cpu() if grads else torch.zeros((), dtype=torch.float64)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(squares, group=parallel_state.get_pipeline_model_parallel_group())
    return squares.sqrt()


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping."""
    norm = global_grad_norm(model)
    if max_norm > 0 and torch.isfinite(norm) and norm > max_norm:
        scale = max_norm / (float(norm) + 1e-6)
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], scale)
    return float(norm)
