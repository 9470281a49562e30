"""Kimi Delta Attention ops.

API shared by every entry point (docs/kda_kernels.md, "API"; the math: docs/architecture.md):
  q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: [B, T, H, Dk] (KDA) or [B, T, H] (GDN scalar decay);
  beta: [B, T, H] in (0, 1); scale defaults to Dk**-0.5 (applied after the L2 norm);
  gate=None: g is the log-decay (<= 0); gate=(A_log [H], dt_bias [H*Dk] or [H], lower_bound):
  g is the raw gate projection, the op computes the log-decay itself (kernels/kda/gate.py);
  initial_state / final state: [N, H, Dk, Dv] fp32, N = B or the number of documents of
  cu_seqlens (then B == 1). Returns (o [B, T, H, Dv] in q.dtype, final_state or None).
  ``chunk_kda`` and ``chunk_kda_triton`` also take ``options``: a ``KDAOptions`` (how the Triton
  kernels run; kernels/kda/options.py).
"""
from kernels.kda.naive import chunk_kda_reference, recurrent_kda_reference
from kernels.kda.chunk import chunk_kda
from kernels.kda.chunk_cpu import chunk_kda_cpu
from kernels.kda.fused_recurrent import fused_recurrent_kda
from kernels.kda.options import CHUNK_SIZE, KDAOptions

__all__ = ["chunk_kda", "chunk_kda_cpu", "fused_recurrent_kda", "chunk_kda_reference", "recurrent_kda_reference",
           "KDAOptions", "CHUNK_SIZE"]
