"""Model FLOPs of a training step (varlen-aware) and MFU.

The forward FLOPs by part are model/flops.py's (each mixer's formula is registered with it in
model/mixers.py); a training step costs 3x the forward (backward = 2x forward). Optimizer math is
not counted, as in the usual MFU definitions (PaLM, Megatron, torchtitan).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.config import ModelConfig
from model.flops import KDA_CHUNK, forward_flops, kda_recurrence_flops

__all__ = ["KDA_CHUNK", "document_lengths", "forward_flops", "kda_recurrence_flops", "mfu", "model_flops_per_step",
           "peak_flops_per_gpu"]

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


def model_flops_per_step(
    config: ModelConfig,
    seq_length: int | None = None,
    micro_batch_size: int = 1,
    num_micro_batches: int = 1,
    cu_seqlens_list: Sequence | None = None,
    doc_lengths: Sequence[int] | None = None,
    chunk: int = KDA_CHUNK,
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
