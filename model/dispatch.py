"""megatron's allgather token dispatcher without its host synchronisations, for local experts.

Without tensor or expert parallelism every expert is local and the dispatcher's work is a
permutation: sort the (token, expert) pairs by expert, run the experts, scatter-add back.
megatron-core's ``MoEAllGatherTokenDispatcher`` does that, but on the way it copies the token
counts per expert to the host (``.cpu()``, which waits for the GPU to finish everything queued so
far), selects the routing probabilities with ``masked_select`` (whose output size the host must
read: a second wait) and keeps them as an attribute; the grouped experts then copied the host
counts back to the GPU (a third). Each wait drains the GPU's queue, which then idles until the
host has launched enough new work: with 15 MoE layers, each run forward and again in the
recompute, about 90 waits per training step.

With dropless top-k routing every token goes to exactly ``top_k`` experts (the model routes every
token: it passes megatron no padding mask), so the permuted length
is known on the host (``tokens * top_k``) and the argsort-based permutation (megatron's ``permute``,
done here the same way) needs no sync; the counts per expert stay on the GPU, where the grouped
GEMMs read them (model/grouped_experts.py). Any other layout (TP or EP > 1, capacity factor,
padding, TE fused permutation) keeps megatron's path.

The two scatters of megatron's path are replaced as well. It adds rows into the token order with
atomics: the combine step's ``scatter_add_`` and the backward of the dispatch's ``index_select``,
each in bf16, in a nondeterministic order, and slow (2.6 ms per MoE layer for the backward alone at
32k tokens on the H200). Every token has exactly ``top_k`` rows, so both are "gather each token's
k rows and sum them" here (``_sum_rows``: fp32 sum of k rows, deterministic), and the adjoint of
that sum is a plain gather.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

from .fusion import fused


@fused
def _sum_rows(rows: torch.Tensor, by_token: torch.Tensor, k: int) -> torch.Tensor:
    """[N, H] -> [N / k, H]: row t is the fp32 sum of rows ``by_token[t k : (t + 1) k]``."""
    return rows.index_select(0, by_token).view(-1, k, rows.shape[-1]).float().sum(1).to(rows.dtype)


class _PermuteRows(torch.autograd.Function):
    """``hidden[index]`` (each token's row k times, in expert order); backward sums each token's k
    gradient rows (``by_token``: the positions of token 0's rows, then token 1's, ...)."""

    @staticmethod
    def forward(ctx, hidden, index, by_token, k):
        ctx.save_for_backward(by_token)
        ctx.k = k
        return hidden.index_select(0, index)

    @staticmethod
    def backward(ctx, d_rows):
        (by_token,) = ctx.saved_tensors
        return _sum_rows(d_rows, by_token, ctx.k), None, None, None


class _UnpermuteRows(torch.autograd.Function):
    """The adjoint of ``_PermuteRows``: each token's output is the sum of its k expert rows."""

    @staticmethod
    def forward(ctx, rows, index, by_token, k):
        ctx.save_for_backward(index)
        return _sum_rows(rows, by_token, k)

    @staticmethod
    def backward(ctx, d_out):
        (index,) = ctx.saved_tensors
        return d_out.index_select(0, index), None, None, None


class LocalAllGatherDispatcher(MoEAllGatherTokenDispatcher):
    def _sync_free(self) -> bool:
        c = self.config
        return (
            self.tp_size == 1
            and self.ep_size == 1
            and c.moe_expert_capacity_factor is None
            and not c.moe_pad_expert_input_to_capacity
            and not c.moe_permute_fusion
        )

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if not self._sync_free():
            return super().dispatch_postprocess(hidden_states, probs)
        self.hidden_shape_before_permute = hidden_states.shape
        self.local_map = self.routing_map
        num_tokens, k = self.routing_map.shape[0], self.config.moe_router_topk
        # (expert, token) pairs in expert-major order, as megatron's argsort-based permute: the first
        # tokens * k entries of the sorted [experts, tokens] mask are the selected pairs
        expert_major = self.routing_map.bool().T.contiguous().reshape(-1)
        pairs = expert_major.argsort(descending=True, stable=True)[: num_tokens * k]
        index = pairs % num_tokens
        by_token = index.argsort(stable=True)  # every token has k rows: token-major positions
        permuted = _PermuteRows.apply(hidden_states, index, by_token, k)
        permuted_probs = probs.T.contiguous().reshape(-1)[pairs]
        self.reversed_local_input_permutation_mapping = index
        self.rows_by_token = by_token
        tokens_per_expert = self.routing_map.sum(dim=0)  # on the device: no wait
        self.routing_map = None
        # the permuted tokens are rows of hidden_states; the grouped experts may keep these two
        # (hidden_states is kept by the router anyway) instead of the k-times larger copy
        self.permuted_from = (hidden_states, index)
        return permuted, tokens_per_expert, permuted_probs

    def combine_preprocess(self, hidden_states: torch.Tensor):
        if not self._sync_free():
            return super().combine_preprocess(hidden_states)
        index, by_token = self.reversed_local_input_permutation_mapping, self.rows_by_token
        self.rows_by_token = None
        out = _UnpermuteRows.apply(hidden_states, index, by_token, self.config.moe_router_topk)
        return out.view(self.hidden_shape_before_permute)

    def take_permuted_from(self, permuted: torch.Tensor):
        """(source, index) with ``permuted == source.index_select(0, index)`` for the tokens this
        dispatcher just permuted, once (the reference is dropped: it must not outlive the forward);
        None when it did not permute them."""
        found, self.permuted_from = getattr(self, "permuted_from", None), None
        if found is None or found[1].numel() != permuted.shape[0] or found[0].shape[-1] != permuted.shape[-1]:
            return None
        return found


def use_local_dispatcher(moe_layer) -> None:
    """Switch a freshly built MoELayer's allgather dispatcher to ``LocalAllGatherDispatcher`` (same
    state, only the dispatch step differs)."""
    if type(moe_layer.token_dispatcher) is MoEAllGatherTokenDispatcher:
        moe_layer.token_dispatcher.__class__ = LocalAllGatherDispatcher
