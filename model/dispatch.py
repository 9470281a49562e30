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
is known on the host (``tokens * top_k``) and megatron's own argsort-based ``permute`` needs no
sync; the counts per expert stay on the GPU, where the grouped GEMMs read them
(model/grouped_experts.py). Any other layout (TP or EP > 1, capacity factor, padding, TE fused
permutation) keeps megatron's path.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import permute
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher


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
        num_tokens = self.routing_map.shape[0]
        permuted, permuted_probs, self.reversed_local_input_permutation_mapping, _, _ = permute(
            hidden_states, self.routing_map, probs=probs, num_out_tokens=num_tokens * self.config.moe_router_topk
        )
        tokens_per_expert = self.routing_map.sum(dim=0)  # on the device: no wait
        self.routing_map = None
        # the permuted tokens are rows of hidden_states; the grouped experts may keep these two
        # (hidden_states is kept by the router anyway) instead of the k-times larger copy
        self.permuted_from = (hidden_states, self.reversed_local_input_permutation_mapping)
        return permuted, tokens_per_expert, permuted_probs

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
