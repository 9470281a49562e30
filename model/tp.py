"""Thin helpers over megatron-core's tensor-parallel layers, and the mixers' builder from their plans.

``build_from_plan`` makes a mixer's layers and tensors from its declarative plan (model/plan.py);
``PlannedMixer`` is the base of every mixer (its checkpoint axes come from the plan too).
Layers here only allocate this rank's shard; nothing is drawn when they are built. ``build_model``
then fills every tensor from the seed, the tensor's global name and each element's global index
(model/init.py), so a TP=2 shard equals the corresponding slice of the TP=1 tensor (for megatron's
fused SwiGLU ``linear_fc1``: ``[gate_r; up_r]`` of the global ``[gate; up]``), on any device.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from torch import nn

from . import plan as plans
from .norms import RMSNorm


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def deferred_init(weight: torch.Tensor) -> None:
    """The ``init_method`` handed to megatron's layers; never called, since they are built with
    ``perform_initialization=False`` and model/init.py fills them."""
    raise RuntimeError("megatron-core tried to initialise a weight; build models with model.model.build_model")


def column(in_features: int, out_features: int, tconfig) -> tensor_parallel.ColumnParallelLinear:
    """Output dimension split over TP ranks (heads); the input is the replicated hidden state."""
    return tensor_parallel.ColumnParallelLinear(
        in_features, out_features, config=tconfig, init_method=deferred_init,
        bias=False, gather_output=False, skip_bias_add=True,
    )


def row(in_features: int, out_features: int, tconfig) -> tensor_parallel.RowParallelLinear:
    """Input dimension split over TP ranks; the output is all-reduced back to the full hidden state."""
    return tensor_parallel.RowParallelLinear(
        in_features, out_features, config=tconfig, init_method=deferred_init,
        bias=False, input_is_parallel=True, skip_bias_add=True,
    )


def replicated_linear(in_features: int, out_features: int, tconfig) -> nn.Linear:
    """A small projection every TP rank holds whole (low-rank gate down-projections, MLA kv_a).

    Under sequence parallelism it sees only this rank's tokens, so its gradient is partial over
    tokens: ``sequence_parallel`` marks it for the TP all-reduce after backward (as megatron does
    for norms and the router).
    """
    # built on the meta device and then allocated, so that nn.Linear's own init draws nothing
    layer = nn.Linear(in_features, out_features, bias=False, device="meta").to_empty(device=torch.get_default_device())
    layer.weight.sequence_parallel = bool(tconfig.sequence_parallel)
    return layer


def gather_tokens(tensor: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Full sequence from this rank's token shard (backward: reduce-scatter, summing the head-local
    partial gradients of all ranks); without SP the tensor is already whole and only its gradient
    needs the TP sum."""
    if sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(tensor, tensor_parallel_output_grad=True)
    return reduce_grad_over_tp(tensor)


def sharded_parameter(global_shape: tuple[int, ...], dim: int = 0) -> nn.Parameter:
    """This rank's (empty) slice along ``dim`` of a fp32 tensor of ``global_shape``, marked as
    TP-sharded for megatron; its values come from model/init.py."""
    size = tp_size()
    if global_shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {global_shape[dim]} does not split over {size} TP ranks")
    local_shape = list(global_shape)
    local_shape[dim] //= size
    param = nn.Parameter(torch.empty(local_shape, dtype=torch.float32))
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    return param


def reduce_grad_over_tp(tensor: torch.Tensor) -> torch.Tensor:
    """Identity forward, all-reduce backward: for replicated values whose consumers are head-local.

    A replicated tensor used only by this rank's heads receives a partial gradient; summing over TP
    ranks makes it complete (the MLA shared k_rot slice, the KDA output-norm weight).
    """
    if tp_size() == 1:
        return tensor
    return tensor_parallel.copy_to_tensor_model_parallel_region(tensor)


def sharded_state_dict_with_axes(module, prefix, axis_map, sharded_offsets=(), metadata=None):
    """Sharded state dict of ``module``: its own tensors named in ``axis_map`` split over TP along
    that dimension, the others replicated; megatron layers below describe themselves, and plain
    containers (ModuleList, ...) are descended into rather than treated as one replicated blob."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    own = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    sharded = make_sharded_tensors_for_checkpoint(
        own, prefix, axis_map, sharded_offsets,
        tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"],
    )
    for name, child in module.named_children():
        child_prefix = f"{prefix}{name}."
        if hasattr(child, "sharded_state_dict"):
            sharded.update(child.sharded_state_dict(child_prefix, sharded_offsets, metadata))
        else:  # plain containers and leaves (ModuleList, nn.Linear, RMSNorm): replicated, recurse
            sharded.update(sharded_state_dict_with_axes(child, child_prefix, {}, sharded_offsets, metadata))
    return sharded


def build_from_plan(module: nn.Module, plan: plans.ParallelPlan, tconfig) -> None:
    """Give ``module`` one attribute per entry of ``plan``, in the plan's order: megatron's
    column/row-parallel linears, replicated linears and norms, head-split or replicated tensors.

    Every parameter is marked with its plan entry (``placement``) and with what the training code
    reads: megatron's ``tensor_model_parallel``/``partition_dim`` (Muon, gradient norms, the
    checkpoint), ``sequence_parallel`` (the TP gradient sum after backward: replicated weights fed
    this rank's tokens under sequence parallelism), ``keep_fp32`` and ``no_weight_decay``."""
    sequence_parallel = bool(tconfig.sequence_parallel)
    for attribute, p in plan.params.items():
        if p.builds == plans.LINEAR:
            out_features, in_features = p.shape
            make = {plans.COLUMN: column, plans.ROW: row, plans.REPLICATED: replicated_linear}[p.layout]
            holder = make(in_features, out_features, tconfig)
            param = holder.weight
        elif p.builds == plans.NORM:
            holder = RMSNorm(p.shape[0], p.eps, sequence_parallel and p.local_tokens)
            param = holder.weight
        elif p.layout == plans.HEADS:
            holder = param = sharded_parameter(p.shape, p.axis)
        elif p.layout == plans.REPLICATED:
            holder = param = nn.Parameter(torch.empty(p.shape))
        else:
            raise ValueError(f"{type(module).__name__}.{attribute}: a {p.layout} {p.builds} cannot be built")
        if p.layout == plans.REPLICATED:
            param.sequence_parallel = sequence_parallel and p.local_tokens
        if p.keep_fp32:
            param.keep_fp32 = True  # stays fp32 under mixed precision (train/precision.py)
        if not p.weight_decay:
            param.no_weight_decay = True
        param.placement = p
        setattr(module, attribute, holder)


class PlannedMixer(MegatronModule):
    """A token mixer whose parameters come from its parallel plan (model/plan.py, model/mixers.py).

    Subclasses call ``super().__init__(config, tconfig, layer_idx, plan)`` and then use the
    attributes the plan names; ``forward(hidden [T, 1, hidden], packed, context_parallel=None)``
    returns the same shape ([T/TP, 1, hidden] under sequence parallelism)."""

    def __init__(self, config, tconfig, layer_idx: int, plan: plans.ParallelPlan):
        super().__init__(config=tconfig)
        self.layer_idx = layer_idx
        self.plan = plan
        self.local_heads = plan.heads // tp_size()
        build_from_plan(self, plan, tconfig)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return sharded_state_dict_with_axes(self, prefix, self.plan.checkpoint_axes(), sharded_offsets, metadata)
