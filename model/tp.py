"""Thin helpers over megatron-core's tensor-parallel layers, shared by the mixers.

Every weight is initialised from the full (unsharded) tensor on the CPU generator and then sliced,
so initialisation does not depend on the device. (megatron's fused SwiGLU ``linear_fc1`` reads its
TP slice as ``[gate_r; up_r]``, so a TP=2 model is not the slice of a TP=1 model with the same seed;
to compare layouts, load one checkpoint into both.)
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state, tensor_parallel
from torch import nn


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def normal_init(std: float):
    return lambda weight: nn.init.normal_(weight, mean=0.0, std=std)


def column(in_features: int, out_features: int, tconfig, std: float) -> tensor_parallel.ColumnParallelLinear:
    """Output dimension split over TP ranks (heads); the input is the replicated hidden state."""
    return tensor_parallel.ColumnParallelLinear(
        in_features, out_features, config=tconfig, init_method=normal_init(std),
        bias=False, gather_output=False, skip_bias_add=True,
    )


def row(in_features: int, out_features: int, tconfig, std: float) -> tensor_parallel.RowParallelLinear:
    """Input dimension split over TP ranks; the output is all-reduced back to the full hidden state."""
    return tensor_parallel.RowParallelLinear(
        in_features, out_features, config=tconfig, init_method=normal_init(std),
        bias=False, input_is_parallel=True, skip_bias_add=True,
    )


def replicated_linear(in_features: int, out_features: int, std: float, tconfig) -> nn.Linear:
    """A small projection every TP rank holds whole (low-rank gate down-projections, MLA kv_a).

    Under sequence parallelism it sees only this rank's tokens, so its gradient is partial over
    tokens: ``sequence_parallel`` marks it for the TP all-reduce after backward (as megatron does
    for norms and the router).
    """
    layer = nn.Linear(in_features, out_features, bias=False)
    if layer.weight.device.type != "meta":
        nn.init.normal_(layer.weight, mean=0.0, std=std)
    layer.weight.sequence_parallel = bool(tconfig.sequence_parallel)
    return layer


def gather_tokens(tensor: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Full sequence from this rank's token shard (backward: reduce-scatter, summing the head-local
    partial gradients of all ranks); without SP the tensor is already whole and only its gradient
    needs the TP sum."""
    if sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(tensor, tensor_parallel_output_grad=True)
    return reduce_grad_over_tp(tensor)


def sharded_parameter(full: torch.Tensor, dim: int = 0) -> nn.Parameter:
    """Keep this rank's slice of ``full`` along ``dim`` and mark it as TP-sharded for megatron."""
    size = tp_size()
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split over {size} TP ranks")
    piece = full.shape[dim] // size
    local = full.narrow(dim, tp_rank() * piece, piece).clone()
    param = nn.Parameter(local)
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


def conv_init(channels: int, width: int) -> torch.Tensor:
    """nn.Conv1d's default init for a depthwise kernel (fan_in = width)."""
    bound = 1.0 / math.sqrt(width)
    return torch.empty(channels, 1, width).uniform_(-bound, bound)


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
