"""Thin helpers over megatron-core's tensor-parallel layers, shared by the mixers.

Every weight is initialised from the full (unsharded) tensor on the CPU generator and then sliced,
so a model built at TP=2 holds exactly the slices of the TP=1 model built with the same seed.
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


def replicated_linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    """A small projection every TP rank holds whole (low-rank gate down-projections, MLA kv_a)."""
    layer = nn.Linear(in_features, out_features, bias=False)
    if layer.weight.device.type != "meta":
        nn.init.normal_(layer.weight, mean=0.0, std=std)
    return layer


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
    """megatron's default sharded state dict, but with ``module``'s own parameters in ``axis_map``
    marked as split over TP along the given dimension (children describe themselves)."""
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
        sharded_state_dict_default,
    )

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    own = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    sharded = make_sharded_tensors_for_checkpoint(
        own, prefix, axis_map, sharded_offsets,
        tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"],
    )
    for name, child in module.named_children():
        sharded.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata))
    return sharded
