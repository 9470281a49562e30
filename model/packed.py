"""Document boundaries of a packed micro-batch, derived once from the loader's ``cu_seqlens``.

The model flattens a ``[B, S]`` micro-batch into one stream of ``B*S`` tokens. ``cu_seqlens`` (from
the data loader, the single source of truth) marks where documents start in that stream; every
sample start is also a document start. KDA/GDN reset their state and short-conv window there, MLA
masks attention across them. Nothing here looks at token values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.host_values import host_values, to_device


@dataclass
class PackedSequence:
    cu_seqlens: torch.Tensor  # int32 [N+1], document starts in the flattened stream, ends with B*S
    batch_size: int
    seq_length: int
    position_in_document: torch.Tensor  # int64 [B*S]
    document_ids: torch.Tensor  # int64 [B, S], unique per document in the micro-batch
    single_document_rows: bool  # every sample is one document: plain causal attention suffices
    max_document_length: int = 0  # longest document (host int, for varlen attention kernels)

    @property
    def num_tokens(self) -> int:
        return self.batch_size * self.seq_length


def pack(batch_size: int, seq_length: int, cu_seqlens: torch.Tensor | None, device) -> PackedSequence:
    """Validates ``cu_seqlens`` (a CPU tensor, or one moved by ``kernels.host_values.to_device`` with
    its host copy: nothing here then waits for the GPU) and derives the tables on ``device``."""
    total = batch_size * seq_length
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, total + 1, seq_length, dtype=torch.int32)
    host = host_values(cu_seqlens).to(torch.int32)
    lengths = _check(host, batch_size, seq_length)
    target = torch.device(device)
    placed = cu_seqlens.device.type == target.type and target.index in (None, cu_seqlens.device.index)
    if not placed or cu_seqlens.dtype != torch.int32:
        cu_seqlens = to_device(host, target, keep_host_copy=True)
    starts = torch.zeros(total, dtype=torch.int64, device=device)
    starts[cu_seqlens[:-1].long()] = 1
    document_ids = torch.cumsum(starts, 0) - 1
    first_of_document = cu_seqlens[:-1].long()[document_ids]
    position = torch.arange(total, device=device) - first_of_document
    return PackedSequence(
        cu_seqlens=cu_seqlens,
        batch_size=batch_size,
        seq_length=seq_length,
        position_in_document=position,
        document_ids=document_ids.view(batch_size, seq_length),
        single_document_rows=cu_seqlens.numel() == batch_size + 1,
        max_document_length=max(lengths),
    )


def _check(cu_seqlens: torch.Tensor, batch_size: int, seq_length: int) -> list[int]:
    """Validates ``cu_seqlens`` and returns the document lengths."""
    total = batch_size * seq_length
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [0, ..., B*S] of document starts")
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at B*S={total}, got {values[0]}..{values[-1]}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (no empty documents)")
    missing = set(range(0, total, seq_length)) - set(values)
    if missing:
        raise ValueError(f"every sample start must be a document start in cu_seqlens; missing {sorted(missing)[:4]}")
    return [b - a for a, b in zip(values, values[1:])]


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``y_t[c] = sum_i w[c, i] x_{t-W+1+i}[c]`` within each document (taps before its start are 0).

    x: [T, C] flattened stream; weight: [C, 1, W]; position: [T] position of each token in its
    document. Equal to a causal ``nn.Conv1d(groups=C)`` run on every document separately.
    """
    width = weight.shape[-1]
    w = weight.squeeze(1).to(x.dtype)  # [C, W]
    out = x * w[:, width - 1]
    for shift in range(1, width):
        shifted = torch.nn.functional.pad(x[:-shift], (0, 0, shift, 0)) if shift < x.shape[0] else torch.zeros_like(x)
        valid = (position >= shift).to(x.dtype).unsqueeze(-1)
        out = out + shifted * valid * w[:, width - 1 - shift]
    return out
