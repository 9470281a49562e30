"""Forward FLOPs of the model by part, for a list of document lengths (varlen-aware).

Counted: matrix multiplies (2 FLOPs per multiply-add) and the short depthwise convs. Not counted:
norms, activations, softmax, the gate nonlinearities, the embedding lookup (0 FLOPs), as in the
usual MFU definitions (PaLM, Megatron, torchtitan). Per token and layer, with d = hidden size:

* each mixer: its registered formula (model/mixers.py), counted as ``<kind>_<part>``: KDA/GDN
  projections, convs and the chunked recurrence (TR Eq. 13, per document since the state resets at
  document starts); MLA projections and ``L^2 / 2`` causal (q, k) pairs per document of length L;
* dense SwiGLU MLP: ``3 * 2 d F``. MoE: router ``2 d E`` plus the active experts only,
  ``(top_k + shared) * 3 * 2 d F_moe``;
* LM head ``2 d V``; embedding 0.

train/flops.py turns this into the training FLOPs of a step (3x forward) and MFU.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import mixers
from .config import ModelConfig
from .mixers import KDA_CHUNK, kda_recurrence_flops

__all__ = ["KDA_CHUNK", "forward_flops", "kda_recurrence_flops"]


def forward_flops(config: ModelConfig, doc_lengths: Sequence[int], chunk: int = KDA_CHUNK) -> dict:
    """Forward FLOPs by part for the documents ``doc_lengths`` (their sum = tokens); every
    registered mixer's parts are present (0 for mixers the model does not use)."""
    d = config.hidden_size
    tokens = sum(int(x) for x in doc_lengths)
    parts = dict.fromkeys([f"{m.kind}_{part}" for m in mixers.registered() for part in m.flops_parts], 0.0)
    parts.update(dict.fromkeys(["dense_mlp", "moe_router", "moe_experts", "lm_head", "embedding"], 0.0))
    per_layer = {m.kind: m.flops(config, doc_lengths, chunk) for m in mixers.in_config(config)}
    for kind, ffn in zip(config.layer_types, config.ffn_types):
        for part, value in per_layer[kind].items():
            parts[f"{kind}_{part}"] += value
        if ffn == "dense":
            parts["dense_mlp"] += 3 * 2 * d * config.intermediate_size * tokens
        else:
            active = config.num_experts_per_token + config.num_shared_experts
            parts["moe_router"] += 2 * d * config.num_experts * tokens
            parts["moe_experts"] += active * 3 * 2 * d * config.moe_intermediate_size * tokens
    parts["lm_head"] = 2 * d * config.vocab_size * tokens
    parts["total"] = sum(parts.values())
    parts["tokens"] = tokens
    return parts
