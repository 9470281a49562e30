"""Feed-forward blocks from megatron-core: the dense SwiGLU MLP and the MoE layer (docs/architecture.md,
"Mixture of experts").

``megatron_config`` translates our ModelConfig into megatron's TransformerConfig: sigmoid router
scores in fp32, top-k over ``score + expert_bias`` (aux-loss-free balancing, the bias updated once
per global batch from the token counts), renormalised weights times ``routed_scaling_factor``, one
shared expert, optional group-limited top-k.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import ModelConfig
from .dispatch import use_local_dispatcher
from .grouped_experts import GroupedExperts


def megatron_config(
    config: ModelConfig,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    pipeline_parallel: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    token_dispatcher: str = "allgather",
) -> TransformerConfig:
    moe = config.num_experts > 0 and "moe" in config.ffn_types
    grouped = config.num_expert_group > 1
    moe_fields = dict(
        num_moe_experts=config.num_experts,
        moe_router_topk=config.num_experts_per_token,
        moe_ffn_hidden_size=config.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(
            config.moe_intermediate_size * config.num_shared_experts if config.num_shared_experts else None
        ),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=config.router_bias_update_rate,
        moe_router_topk_scaling_factor=config.routed_scaling_factor,
        moe_router_num_groups=config.num_expert_group if grouped else None,
        moe_router_group_topk=config.topk_group if grouped else None,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=token_dispatcher,
        moe_grouped_gemm=False,
    ) if moe else {}
    return TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        ffn_hidden_size=config.intermediate_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        # megatron's fused SwiGLU keeps only [gate; up] for its backward (plain autograd also keeps
        # silu(gate) and the product: 2F more per token in the dense MLP and the shared expert)
        bias_activation_fusion=True,
        add_bias_linear=False,
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        init_method_std=config.initializer_range,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        # megatron's layers only allocate their local shard (on torch's default device, so the meta
        # device works too) and draw nothing: build_model fills every tensor (model/init.py)
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        # our loss functions return token sums; pipeline schedules must not rescale them
        calculate_per_token_loss=True,
        # gloo does not group batched isend/irecv, so two same-shaped tensors between one pair of
        # ranks (interleaved PP=2) can be matched in the wrong order; send them one by one there
        batch_p2p_comm=torch.cuda.is_available(),
        pipeline_dtype=params_dtype,
        **moe_fields,
    )


def dense_mlp(tconfig: TransformerConfig) -> MLP:
    """SwiGLU MLP; ``linear_fc1`` holds [gate; up] (HF gate_proj, up_proj), ``linear_fc2`` = down."""
    return MLP(tconfig, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def moe_layer(tconfig: TransformerConfig, layer_number: int):
    """megatron-core MoELayer with local (non-TE) experts and a shared expert; the routed experts run
    as grouped GEMMs (model/grouped_experts.py) with SequentialMLP's parameters, dispatched without
    host synchronisation when all experts are local (model/dispatch.py)."""
    builder = get_moe_module_spec(use_te=False, num_experts=tconfig.num_moe_experts, moe_grouped_gemm=False)
    experts = builder.keywords["submodules"].experts
    builder.keywords["submodules"].experts = functools.partial(GroupedExperts, *experts.args, **experts.keywords)
    layer = builder(config=tconfig, layer_number=layer_number)
    use_local_dispatcher(layer)
    if hasattr(layer.token_dispatcher, "take_permuted_from"):
        layer.experts.permutation_source = layer.token_dispatcher.take_permuted_from
    return layer


def drop_graph_references(moe: torch.nn.Module) -> None:
    """Call after a MoE layer's forward: clears the tensors with a grad_fn that its submodules keep
    as attributes (megatron's allgather dispatcher keeps the routing probabilities as
    ``local_probs``). Under activation recompute such an attribute, set by the recomputed forward,
    keeps that forward's autograd graph alive, and with it every activation torch's checkpoint
    saved while recomputing the whole layer, until the layer runs again: 3.2 GiB per KDA layer at
    16k tokens on the H200. Nothing reads these attributes after the forward."""
    holders = [*moe.modules(), getattr(moe, "token_dispatcher", None)]  # the dispatcher is no Module
    for holder in filter(None, holders):
        for name, value in list(vars(holder).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(holder, name, None)


def check_renormalize(config: ModelConfig) -> None:
    """megatron renormalises the top-k sigmoid weights whenever top-k > 1, as the released model does."""
    if not config.moe_renormalize and config.num_experts_per_token > 1:
        raise ValueError("moe_renormalize=False is not supported: megatron-core always renormalises top-k > 1")
