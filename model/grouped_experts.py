"""Routed experts as two grouped GEMMs instead of a Python loop over experts.

megatron-core's ``SequentialMLP`` (the experts it offers without Transformer Engine) runs each local
expert as its own MLP: per expert a host sync on the token counts, a split, two linear layers and
the activation, i.e. hundreds of small kernels per MoE layer, launched one by one. On a GPU the
launches, not the math, then set the pace (docs/benchmarks.md, "Training throughput").

``GroupedExperts`` keeps ``SequentialMLP``'s parameters (``local_experts.{i}.linear_fc1/fc2``), so
checkpoints, the HF name map, the optimizers' parameter groups and expert parallelism see exactly
the same model. Only the forward changes: the expert weights are stacked and the permuted tokens go
through ``torch._grouped_mm`` (one GEMM per projection for all experts, token counts as group
offsets), with the same SwiGLU and the same routing-probability scaling as megatron's MLP. Backward
recomputes the SwiGLU from the first GEMM's output instead of keeping its intermediates
(``_SwiGLUExperts``): the routed experts then hold 2 x F values per routed token, not 5 x F.

Used when it computes the same thing: SwiGLU experts without bias, no expert tensor parallelism,
no FP8/FP4, probabilities applied after the activation, and a torch with ``_grouped_mm`` (on a GPU:
bf16). Anything else falls back to ``SequentialMLP.forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from .fusion import fused


def grouped_mm_available(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    return x.dtype == torch.bfloat16 if x.is_cuda else x.device.type == "cpu"


class GroupedExperts(SequentialMLP):
    # set by model/ffn.py: the dispatcher's ``take_permuted_from`` (x's source rows and their index)
    permutation_source = None

    def _grouped_applies(self, x: torch.Tensor) -> bool:
        c = self.config
        return (
            self.num_local_experts > 1
            and self.tp_group.size() == 1
            and c.gated_linear_unit
            and c.activation_func is F.silu
            and not c.add_bias_linear
            and not c.moe_apply_probs_on_input
            and not (c.fp8 or c.fp4)
            and not c.use_te_activation_func
            and c.activation_func_clamp_value is None
            and c.glu_linear_offset == 0
            and grouped_mm_available(x)
        )

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        # taken in every path: an unused reference would keep this forward's graph alive
        source, index = (self.permutation_source(x) if self.permutation_source else None) or (None, None)
        if not self._grouped_applies(x):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        # [E, 2F, H] and [E, H, F]; transposed views are the [E, in, out] operands _grouped_mm takes
        fc1 = torch.stack([expert.linear_fc1.weight for expert in self.local_experts])
        fc2 = torch.stack([expert.linear_fc2.weight for expert in self.local_experts])
        # group ends in the permuted token order (tokens arrive sorted by local expert); the counts
        # come on the device from model/dispatch.py (host counts from other dispatchers are copied)
        ends = torch.cumsum(torch.as_tensor(tokens_per_expert, device=x.device), 0).to(torch.int32)
        out = _SwiGLUExperts.apply(x, fc1.to(x.dtype), fc2.to(x.dtype), permuted_probs, ends, source, index)
        return out, None


@fused
def _swiglu_times_probs(hidden: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * probs from hidden = [gate | up], computed in fp32 (megatron's MLP rounds
    silu(gate) * up to the input dtype before the fp32 probability product)."""
    gate, up = hidden.float().chunk(2, dim=-1)
    return (F.silu(gate) * up * probs.unsqueeze(-1)).to(hidden.dtype)


@fused
def _swiglu_times_probs_backward(hidden: torch.Tensor, probs: torch.Tensor, d_act: torch.Tensor):
    """(act, d hidden, d probs) of ``_swiglu_times_probs`` for the output gradient ``d_act``: one
    elementwise pass and one row sum (two fused kernels when compiled). The ops and their order are
    autograd's for the forward's expression, so in fp32 the gradients equal autograd's to the bit
    (the parallel-layout tests compare this path with megatron's expert loop over training steps)."""
    gate, up = hidden.float().chunk(2, dim=-1)
    silu = F.silu(gate)
    swiglu = silu * up
    p = probs.unsqueeze(-1)
    d = d_act.float()
    d_probs = (d * swiglu).sum(-1)
    d_swiglu = d * p
    d_gate = torch.ops.aten.silu_backward(d_swiglu * up, gate)
    d_hidden = torch.cat([d_gate, d_swiglu * silu], dim=-1).to(hidden.dtype)
    return (swiglu * p).to(hidden.dtype), d_hidden, d_probs


class _SwiGLUExperts(torch.autograd.Function):
    """``grouped(silu(gate) * up * probs) @ fc2`` with ``[gate | up] = grouped x @ fc1``, keeping for
    backward only ``x``, ``[gate | up]`` and the probabilities. Plain autograd would also keep
    silu(gate), their product and the scaled product: three more [tokens, F] tensors, more than half
    of what a MoE layer holds. Backward redoes that elementwise chain from ``[gate | up]`` with its
    gradient in one pass (``_swiglu_times_probs_backward``; fused kernels under ``train.compile``);
    the GEMMs are not redone, their gradients are the grouped GEMMs autograd itself would run
    (``x`` is [tokens, in] and ``w`` is [experts, out, in]: dx = grouped(dy, w), dw = grouped(dy^T, x)
    with the same group ends). With ``source`` and ``index`` (``x == source[index]``, the dispatcher's
    permutation) x itself is not kept either: backward gathers it again from ``source``, which the
    router keeps anyway; the source gets no gradient here (it reaches it through x)."""

    @staticmethod
    def forward(ctx, x, fc1, fc2, probs, ends, source=None, index=None):
        hidden = torch._grouped_mm(x, fc1.transpose(1, 2), offs=ends)
        out = torch._grouped_mm(_swiglu_times_probs(hidden, probs), fc2.transpose(1, 2), offs=ends)
        ctx.regather = source is not None
        ctx.save_for_backward(*((source, index) if ctx.regather else (x,)), fc1, fc2, probs, ends, hidden)
        return out

    @staticmethod
    def backward(ctx, d_out):
        if ctx.regather:
            source, index, fc1, fc2, probs, ends, hidden = ctx.saved_tensors
            x = source.index_select(0, index)
        else:
            x, fc1, fc2, probs, ends, hidden = ctx.saved_tensors
        d_act = torch._grouped_mm(d_out, fc2, offs=ends)
        act, d_hidden, d_probs = _swiglu_times_probs_backward(hidden, probs, d_act)
        d_fc2 = torch._grouped_mm(d_out.t(), act, offs=ends)
        d_x = torch._grouped_mm(d_hidden, fc1, offs=ends)
        d_fc1 = torch._grouped_mm(d_hidden.t(), x, offs=ends)
        return d_x, d_fc1, d_fc2, d_probs, None, None, None
