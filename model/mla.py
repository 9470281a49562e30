"""Multi-head Latent Attention without positional encoding (NoPE MLA, docs/architecture.md).

Queries ``[q_nope_h | q_rot_h]`` per head; keys ``[k_nope_h | k_rot]`` where ``k_rot`` (the 64-dim
"rope" slice) is shared by all heads and never rotated; values from the same latent. Softmax scale
``(nope + rope)^-0.5``, causal within each document of the packed stream.

Tensor parallel by head, as its plan (``model.mixers.mla_plan``) declares: ``q_proj``/``kv_b_proj``
column-parallel, ``o_proj`` row-parallel, ``kv_a_proj_with_mqa`` and ``kv_a_layernorm`` replicated.
The shared ``k_rot`` feeds only this rank's heads, so its gradient is summed over TP ranks
(megatron-core's own MLA misses this: NVIDIA/Megatron-LM#1699).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from . import tp
from .config import ModelConfig
from .mixers import mla_plan
from .packed import PackedSequence
from .profiling import profiled


def document_causal_attention(q, k, v, packed: PackedSequence, scale: float) -> torch.Tensor:
    """Softmax attention inside each document. q,k: [T, H, Dqk], v: [T, H, Dv] -> [T, H, Dv].

    On a GPU in bf16/fp16: flash attention over the packed stream with ``cu_seqlens`` (no mask in
    memory). Elsewhere (CPU, fp32) per sample, since samples never attend to each other (every sample
    start is a document start): one causal SDPA call when every sample is a single document, else
    with a block-diagonal causal mask built from the document ids.
    """
    if _use_varlen_flash(q):
        return _varlen_flash_attention(q, k, v, packed, scale)
    b, s = packed.batch_size, packed.seq_length

    def per_sample(x):
        return x.view(b, s, x.shape[1], x.shape[2]).transpose(1, 2)  # [B, H, S, D]

    qb, kb, vb = per_sample(q), per_sample(k), per_sample(v)
    if packed.single_document_rows:
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
    else:
        ids = packed.document_ids
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        mask = (ids[:, :, None] == ids[:, None, :]) & causal  # [B, S, S]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b * s, out.shape[1], out.shape[3])


@functools.cache
def _varlen_attn():
    """torch's flash-attention entry for packed sequences and its causal flag, or None where this
    torch has none. torch <= 2.9 spells causality ``is_causal=True``, later ``window_size=(-1, 0)``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    causal = {"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters else {"window_size": (-1, 0)}
    return varlen_attn, causal


def _use_varlen_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _varlen_attn() is not None


def _varlen_flash_attention(q, k, v, packed: PackedSequence, scale: float) -> torch.Tensor:
    cu, longest = packed.cu_seqlens, packed.max_document_length
    return varlen_flash_attention(q, k, v, cu, cu, longest, longest, scale)


def varlen_flash_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """Flash attention of packed query and key segments (segment i: queries cu_q[i]:cu_q[i+1] against
    keys cu_k[i]:cu_k[i+1]), causal with the diagonal at the segments' ends (bottom-right): a query
    sees the keys up to its own position when its segment's keys end where its queries end."""
    varlen_attn, causal = _varlen_attn()
    dv, width = v.shape[-1], max(q.shape[-1], v.shape[-1])
    # flash attention takes one head dim for q, k and v: zero-pad the narrower (v: 128 vs 192 here;
    # zeros in q and k would leave the logits unchanged), slice the output back
    q, k, v = (F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x.contiguous() for x in (q, k, v))
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **causal)
    return out[..., :dv]


class MultiLatentAttention(tp.PlannedMixer):
    """NoPE MLA; its parameters and their tensor-parallel layout are ``model.mixers.mla_plan``."""

    def __init__(self, config: ModelConfig, tconfig, layer_idx: int):
        super().__init__(config, tconfig, layer_idx, mla_plan(config))
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scale = (self.nope + self.rope) ** -0.5
        self.sequence_parallel = bool(tconfig.sequence_parallel)
        # QK-Clip (train/muon.py): when set, training forwards keep the running max over micro-batches
        # of each local head's largest logit q.k * scale (document-causal) in max_logits [local_heads]
        self.record_max_logits = False
        self.max_logits = None

    def forward(self, hidden: torch.Tensor, packed: PackedSequence, context_parallel=None) -> torch.Tensor:
        """hidden: [T, 1, hidden] ([T/TP, 1, hidden] under sequence parallelism) -> same shape.
        ``context_parallel``: a ``parallel.context.ContextParallel`` when the stream is this rank's
        slice of longer sequences (docs/parallelism.md)."""
        x = hidden.squeeze(1)
        t = packed.num_tokens
        q = self.q_proj(x)[0].view(t, self.local_heads, self.nope + self.rope)
        compressed = self.kv_a_proj_with_mqa(x)  # [latent | k_rot] of this rank's tokens
        whole_keys = False  # the keys are already gathered over TP (sequence parallelism) and CP
        recording = self.record_max_logits and self.training
        if context_parallel is not None:
            whole_keys = self.sequence_parallel and context_parallel.mode == "chunkwise"
            if whole_keys:
                compressed = self._gather_sequence_parallel(compressed)
            compressed = context_parallel.mla_keys(compressed)  # the keys these queries see
        latent, k_rot = compressed.split([self.kv_lora_rank, self.rope], dim=-1)
        if whole_keys:
            kv = self._expand_whole_keys(latent)
        else:
            k_rot = tp.gather_tokens(k_rot, self.sequence_parallel)
            kv = self.kv_b_proj(self.kv_a_layernorm(latent))[0]
        n = kv.shape[0]  # key tokens: t, or the gathered keys under context parallelism
        k_nope, v = kv.view(n, self.local_heads, self.nope + self.v_dim).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.unsqueeze(1).expand(n, self.local_heads, self.rope)], dim=-1)
        if context_parallel is not None:
            out = profiled("mla_core_attention", context_parallel.mla_attention, q, k, v, self.scale,
                           record_max_logits=recording)
            if recording:  # this rank's queries (chunkwise) or heads (ulysses); qk_clip max-reduces over CP
                out, best = out
                self._keep_max_logits(best)
        else:
            if recording:
                self._keep_max_logits(document_max_logits(q, k, packed, self.scale))
            out = profiled("mla_core_attention", document_causal_attention, q, k, v, packed, self.scale)
        return self.o_proj(out.reshape(t, -1))[0].unsqueeze(1)

    @torch.no_grad()
    def clip_qk(self, gamma: torch.Tensor) -> None:
        """QK-Clip (train/muon.py): scale every logit of local head h by ``gamma[h]``: the rows of
        ``q_proj`` for head h's nope part and of ``kv_b_proj`` for its k_nope part by sqrt(gamma), the
        rows of ``q_proj`` for its rope part by gamma; the shared k_rot (it feeds every head) stays."""
        heads, nope, rope = self.local_heads, self.nope, self.rope
        qw = self.q_proj.weight.view(heads, nope + rope, -1)
        kvw = self.kv_b_proj.weight.view(heads, nope + self.v_dim, -1)
        root = gamma.sqrt().to(qw.dtype)[:, None, None]
        qw[:, :nope].mul_(root)
        qw[:, nope:].mul_(gamma.to(qw.dtype)[:, None, None])
        kvw[:, :nope].mul_(root.to(kvw.dtype))

    def _gather_sequence_parallel(self, compressed: torch.Tensor) -> torch.Tensor:
        """This rank's sequence-parallel share of ``[latent | k_rot]`` -> every local token's, so that
        the CP all-gather sees the slice in order. The latent's gradient comes back whole on every
        TP rank (``_expand_whole_keys``), so its backward keeps this rank's rows; k_rot's is head-local,
        so its backward sums over TP."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        latent, k_rot = compressed.split([self.kv_lora_rank, self.rope], dim=-1)
        latent = gather_from_sequence_parallel_region(latent, tensor_parallel_output_grad=False)
        return torch.cat([latent, tp.gather_tokens(k_rot, True)], dim=-1)

    def _expand_whole_keys(self, latent: torch.Tensor) -> torch.Tensor:
        """kv_a_layernorm + kv_b_proj of keys that every TP rank holds whole ([K, kv_lora_rank]): each
        rank normalises its 1/TP of the rows (padded to a multiple of TP), as under plain sequence
        parallelism, and kv_b_proj gathers them, so the norm's weight gradient is summed over TP
        exactly once."""
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        n, pad = latent.shape[0], -latent.shape[0] % tp.tp_size()
        rows = scatter_to_sequence_parallel_region(F.pad(latent, (0, 0, 0, pad)))
        return self.kv_b_proj(self.kv_a_layernorm(rows))[0][:n]

    def _keep_max_logits(self, best: torch.Tensor) -> None:
        self.max_logits = best if self.max_logits is None else torch.maximum(self.max_logits, best)


@torch.no_grad()
def document_max_logits(q: torch.Tensor, k: torch.Tensor, packed: PackedSequence, scale: float) -> torch.Tensor:
    """Per head, the largest logit ``q.k * scale`` a query gives a key it attends to (same document,
    not later): q, k [T, H, D] -> fp32 [H]. QK-Clip's record (train/muon.py)."""
    s, heads = packed.seq_length, q.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    best = torch.full((heads,), float("-inf"), device=q.device)
    for i in range(packed.batch_size):
        ids = packed.document_ids[i]
        mask = (ids[:, None] == ids[None, :]) & causal
        qi, ki = q[i * s:(i + 1) * s].float(), k[i * s:(i + 1) * s].float()
        for h in range(heads):  # one head at a time: S x S memory
            logits = (qi[:, h] @ ki[:, h].T) * scale
            best[h] = torch.maximum(best[h], logits.masked_fill(~mask, float("-inf")).max())
    return best
