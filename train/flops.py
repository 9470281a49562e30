"""Model FLOPs of a training step (varlen-aware) and MFU.

Counted: matrix multiplies (2 FLOPs per multiply-add) and the short depthwise convs; a training
step costs 3x the forward (backward = 2x forward). Not counted: norms, activations, softmax, the
gate nonlinearities, the embedding lookup (0 FLOPs) and optimizer math, as in the usual MFU
definitions (PaLM, Megatron, torchtitan). Per token and layer, with d = hidden size:

* KDA / GDN (H heads of dim dh, short conv width W, low-rank gates of rank dh, decay width
  H*dh for KDA, H for GDN): projections ``2d(3 H dh) + 2d dh + 2 dh decay + 2d H + 2d dh
  + 2 dh H dh + 2 H dh d`` (q/k/v, f_a, f_b, b, g_a, g_b, o) and convs ``3 * 2 W H dh``; the chunked
  recurrence per head is the tech report's Eq. 13 (docs/architecture.md, "Cost"),
  ``6 T dh^2 + 3 T C dh + T C^2`` for chunk C = 64,
  evaluated per document (state resets at document starts): a document of length L has
  floor(L / C) full chunks and one partial chunk of length c = L mod C, which costs
  ``6 c dh^2 + 3 c^2 dh + c^3`` (the same formula with T = C = c). For documents that are
  multiples of C this is exactly Eq. 13 with T = L.
* MLA (H heads, latent L_kv, nope n, rope r, value v): projections ``2d H(n+r) + 2d(L_kv+r)
  + 2 L_kv H(n+v) + 2 H v d``; attention per document of length L: ``L^2 / 2`` causal (q, k)
  pairs, each ``2 H (n+r)`` for the logits and ``2 H v`` for the weighted values.
* Dense SwiGLU MLP: ``3 * 2 d F``. MoE: router ``2 d E`` plus the active experts only,
  ``(top_k + shared) * 3 * 2 d F_moe``.
* LM head ``2 d V``; embedding 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.kda.options import CHUNK_SIZE
from model.config import ModelConfig

# dense bf16 tensor-core peak per GPU (no sparsity), FLOP/s
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
}


def peak_flops_per_gpu(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of the current (or named) GPU; None on CPUs and unknown GPUs
    (then MFU is not reported)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # GH200 before H200
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops: float, seconds: float, num_gpus: int, peak_flops_per_gpu: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all GPUs; None without a peak."""
    if not peak_flops_per_gpu or seconds <= 0 or num_gpus <= 0:
        return None
    return flops / seconds / (num_gpus * peak_flops_per_gpu)


def document_lengths(
    seq_length: int | None = None,
    micro_batch_size: int = 1,
    num_micro_batches: int = 1,
    cu_seqlens_list: Sequence | None = None,
    doc_lengths: Sequence[int] | None = None,
) -> list[int]:
    """Document lengths of a step: given directly, from the loader's ``cu_seqlens`` of each
    micro-batch, or (neither given) one document per sample of ``seq_length`` tokens."""
    if doc_lengths is not None:
        return [int(x) for x in doc_lengths]
    if cu_seqlens_list is not None:
        out = []
        for cu in cu_seqlens_list:
            values = cu.tolist() if torch.is_tensor(cu) else list(cu)
            out.extend(int(b - a) for a, b in zip(values, values[1:]))
        return out
    if seq_length is None:
        raise ValueError("give seq_length, cu_seqlens_list or doc_lengths")
    return [int(seq_length)] * (micro_batch_size * num_micro_batches)


def kda_recurrence_flops(doc_lengths: Sequence[int], head_dim: int, chunk: int = CHUNK_SIZE) -> int:
    """Forward FLOPs of the chunked KDA/GDN recurrence for ONE head over the given documents."""
    total = 0
    for length in doc_lengths:
        full, rest = divmod(int(length), chunk)
        for c, n in ((chunk, full), (rest, 1 if rest else 0)):
            total += n * (6 * c * head_dim**2 + 3 * c * c * head_dim + c**3)
    return total


def forward_flops(config: ModelConfig, doc_lengths: Sequence[int], chunk: int = CHUNK_SIZE) -> dict:
    """Forward FLOPs by part for the documents ``doc_lengths`` (their sum = tokens)."""
    d = config.hidden_size
    tokens = sum(int(x) for x in doc_lengths)
    pairs = sum(int(x) ** 2 for x in doc_lengths) / 2  # causal (q, k) pairs, L^2 / 2 per document
    parts = dict.fromkeys(
        ["kda_projections", "kda_recurrence", "gdn_projections", "gdn_recurrence", "mla_projections",
         "mla_attention", "dense_mlp", "moe_router", "moe_experts", "lm_head", "embedding"], 0.0)
    H, dh, W = config.kda_num_heads, config.kda_head_dim, config.short_conv_kernel
    recurrence = H * kda_recurrence_flops(doc_lengths, dh, chunk)
    ha, n, r, v, lkv = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                        config.v_head_dim, config.kv_lora_rank)
    for kind, ffn in zip(config.layer_types, config.ffn_types):
        if kind in ("kda", "gdn"):
            decay = H * dh if kind == "kda" else H
            per_token = (
                2 * d * 3 * H * dh  # q, k, v
                + 2 * d * dh + 2 * dh * decay  # forget gate, low rank
                + 2 * d * H  # beta
                + 2 * d * dh + 2 * dh * H * dh  # output gate, low rank
                + 2 * H * dh * d  # o_proj
                + 3 * 2 * W * H * dh  # three depthwise short convs
            )
            parts[f"{kind}_projections"] += per_token * tokens
            parts[f"{kind}_recurrence"] += recurrence
        else:
            per_token = 2 * d * ha * (n + r) + 2 * d * (lkv + r) + 2 * lkv * ha * (n + v) + 2 * ha * v * d
            parts["mla_projections"] += per_token * tokens
            parts["mla_attention"] += pairs * (2 * ha * (n + r) + 2 * ha * v)
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


def model_flops_per_step(
    config: ModelConfig,
    seq_length: int | None = None,
    micro_batch_size: int = 1,
    num_micro_batches: int = 1,
    cu_seqlens_list: Sequence | None = None,
    doc_lengths: Sequence[int] | None = None,
    chunk: int = CHUNK_SIZE,
    training: bool = True,
) -> dict:
    """Training FLOPs (3x forward; ``training=False``: forward only) of one step, by part and
    ``total`` (``tokens``: the token count). Documents from ``doc_lengths``, the loader's
    ``cu_seqlens`` per micro-batch, or one per sample of ``seq_length`` (see ``document_lengths``).
    Pass this rank's micro-batches and sum over data-parallel ranks for the step's model FLOPs."""
    docs = document_lengths(seq_length, micro_batch_size, num_micro_batches, cu_seqlens_list, doc_lengths)
    parts = forward_flops(config, docs, chunk)
    factor = 3 if training else 1
    return {k: (v if k == "tokens" else v * factor) for k, v in parts.items()}
