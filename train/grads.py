"""Gradient synchronisation and clipping for every parallel layout.

After backward each rank holds the gradient of its own micro-batches and its own shards:
- replicated weights that saw only this rank's tokens under sequence parallelism (norms, router,
  low-rank down-projections) are summed over the TP group;
- dense parameters are averaged over the data-parallel group (with context parallelism folded in);
- expert parameters (megatron marks them ``allreduce=False``) over the expert-data-parallel group,
  the ranks that hold the same experts.
The global norm counts every shard once: TP/ETP-split parameters on every rank, replicated ones on
rank 0 of their group, summed over TP, EP and PP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn


def is_expert(param: nn.Parameter) -> bool:
    return not getattr(param, "allreduce", True)


def same_dtype_groups(tensors: list[torch.Tensor]) -> list[tuple[list[int], list[torch.Tensor]]]:
    """(indices, tensors) per (dtype, device), for ops that need one dtype (a flat buffer) or run
    best with one: a foreach op on a list that mixes dtypes (bf16
    gradients with the fp32 ones of A_log, dt_bias and the routers) takes its slow path on a GPU,
    one kernel per tensor (~2,000 per step at 3.7 B parameters) instead of a few."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        # get_device() is an int; building a torch.device per tensor costs ~1 us x 2,000 per call
        indices, members = groups.setdefault((t.dtype, t.get_device()), ([], []))
        indices.append(i)
        members.append(t)
    return list(groups.values())


class ParameterPlan:
    """The model's parameters sorted once into the lists the per-step gradient work needs.

    A walk over ``model.parameters()`` visits every module (~12,700 at scaling-653m, whose 64
    experts per layer are separate modules): ~10 ms of host time each, and the step took five,
    while the GPU waited. The parallel layout is fixed for a model's life, so the lists are too.
    """

    def __init__(self, model: nn.Module):
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        self.params = list(model.parameters())
        self.experts = [p for p in self.params if is_expert(p)]
        self.dense = [p for p in self.params if not is_expert(p)]
        self.sequence_parallel = [p for p in self.params if getattr(p, "sequence_parallel", False)]
        # the global norm counts every shard once: split parameters on every rank, replicated
        # ones on rank 0 of their (expert) tensor-parallel group
        split = [getattr(p, "tensor_model_parallel", False) for p in self.params]
        norm_dense = [p for p, s in zip(self.params, split) if not is_expert(p) and (s or tp_rank == 0)]
        norm_experts = [p for p, s in zip(self.params, split) if is_expert(p) and (s or etp_rank == 0)]
        # the same split by dtype, for foreach ops (a gradient has its parameter's dtype)
        self.by_dtype = _dtype_lists(self.params)
        self.norm_dense_by_dtype = _dtype_lists(norm_dense)
        self.norm_experts_by_dtype = _dtype_lists(norm_experts)


def _dtype_lists(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    return [members for _, members in same_dtype_groups(params)]


def parameter_plan(model: nn.Module) -> ParameterPlan:
    plan = model.__dict__.get("_parameter_plan")
    if plan is None:
        plan = model.__dict__["_parameter_plan"] = ParameterPlan(model)
    return plan


def grads_of(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _all_reduce_flat(grads: list[torch.Tensor], group, average_over: int = 1) -> None:
    if not grads:
        return
    for _, same in same_dtype_groups(grads):
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        if average_over > 1:
            flat /= average_over
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _same_ranks(group_a, group_b) -> bool:
    return dist.get_process_group_ranks(group_a) == dist.get_process_group_ranks(group_b)


def all_reduce_sequence_parallel(model: nn.Module) -> None:
    """Sum over TP ranks the gradients of replicated weights that saw only this rank's tokens."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = grads_of(parameter_plan(model).sequence_parallel)
    _all_reduce_flat(grads, parallel_state.get_tensor_model_parallel_group())


def all_reduce_data_parallel(model: nn.Module) -> None:
    """Average dense gradients over DP(xCP) ranks and expert gradients over expert-DP ranks."""
    plan = parameter_plan(model)
    dense, experts = grads_of(plan.dense), grads_of(plan.experts)
    dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if experts and dp > 1 and _same_ranks(dp_group, parallel_state.get_expert_data_parallel_group()):
        # no expert parallelism: the expert-DP ranks are the DP ranks, one all-reduce averages both
        _all_reduce_flat(dense + experts, dp_group, dp)
        return
    if dp > 1:
        _all_reduce_flat(dense, dp_group, dp)
    if experts:
        # An expert's gradient already sums the tokens that all ranks of its EP group sent it, so
        # summing over the expert-DP ranks covers every DP rank once: divide by DP, like the
        # dense average (average over expert-DP, then scale by expert-DP / DP).
        edp = parallel_state.get_expert_data_parallel_world_size()
        if edp > 1:
            _all_reduce_flat(experts, parallel_state.get_expert_data_parallel_group(), edp)
        if dp != edp:
            torch._foreach_mul_(experts, edp / dp)


@torch.no_grad()
def grad_norm_on_device(model: nn.Module) -> torch.Tensor:
    """L2 norm of the full model's gradient (each shard counted once), fp64, where the gradients
    are: reading it is the caller's choice (a read makes the host wait for the backward)."""
    plan = parameter_plan(model)
    first = next((p.grad for p in plan.params if p.grad is not None), None)
    device = first.device if first is not None else torch.device("cpu")

    def squares(groups):
        # fp32 accumulation and result for bf16 gradients (a bf16 norm loses digits) without the
        # fp32 copies of every gradient that upcasting first would allocate (14 GiB at 3.7 B params)
        norms = []
        for group in groups:
            grads = grads_of(group)
            if grads:
                norms.extend(torch._foreach_norm(grads, 2, dtype=torch.float32))
        if not norms:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(norms).double().pow(2).sum()

    # reduced where the gradients are (NCCL reduces no CPU tensors)
    dense_sq, expert_sq = squares(plan.norm_dense_by_dtype), squares(plan.norm_experts_by_dtype)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(dense_sq, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_expert_tensor_and_model_parallel_world_size() > 1:
        dist.all_reduce(expert_sq, group=parallel_state.get_expert_tensor_and_model_parallel_group())
    total = dense_sq + expert_sq
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total.sqrt()


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that brings a gradient of norm ``norm`` (a 0-dim fp64 tensor) to at most
    ``max_norm``, as an fp32 0-dim tensor on its device: 1 when it is within (or ``max_norm`` <= 0,
    or the norm is not finite: that step is skipped), else ``max_norm / (norm + 1e-6)`` (the
    division in fp64, then one rounding to fp32)."""
    if max_norm <= 0:
        return torch.ones((), dtype=torch.float32, device=norm.device)
    return torch.where(norm > max_norm, max_norm / (norm + 1e-6), 1.0).float()  # NaN > x is false


def scale_gradients(groups: list[list[nn.Parameter]], factor: torch.Tensor) -> None:
    """Multiply the gradients of ``groups`` (same-dtype lists) by ``factor`` (an fp32 0-dim tensor on
    their device; a foreach op takes its one-launch path only when a tensor factor has the list's
    dtype, so other dtypes get it rounded to theirs)."""
    for group in groups:
        grads = grads_of(group)
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))
