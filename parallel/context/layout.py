"""The context-parallel context a mixer is handed: group, rank, size, mode, and the document layout.

Under context parallelism (CP) every sample of a micro-batch (``b`` samples of ``S`` tokens) is cut
into ``size`` contiguous slices of ``L = S / size`` tokens; CP rank ``r`` holds positions
``[r L, (r+1) L)`` of every sample (``data/context_parallel.py::cp_slice``). Its local stream of
``b L`` tokens has its own ``cu_seqlens`` (every slice start is a boundary there); the batch's global
``cu_seqlens`` stays the one source of document boundaries, and every rank derives the same tables
from it, so no layout information is ever communicated:

* ``continues[j, i]``: rank ``j``'s slice of sample ``i`` starts inside a document that began on an
  earlier rank (position ``j L`` is not a document start);
* ``single[j, i]``: that slice holds no document start at all (one segment, all of it continuing).

Two modes (``mode``): ``chunkwise`` keeps the contiguous slices and passes what crosses a slice
boundary (KDA's state, the short convolution's halo, MLA's compressed keys); ``ulysses`` swaps
sequence for heads with an all-to-all so that every rank sees whole samples for ``H / size`` heads
(docs/parallelism.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from kernels.host_values import host_values, to_device

MODES = ("chunkwise", "ulysses")


class ContextParallelError(ValueError):
    """The context-parallel layout does not fit the batch or the model."""


@dataclass
class ContextParallel:
    group: object  # torch.distributed process group of the CP ranks (megatron's CP group)
    rank: int
    size: int
    mode: str
    batch_size: int  # samples per micro-batch (b)
    local_length: int  # tokens of each sample on this rank (L)
    cu_seqlens: torch.Tensor  # int32, document starts in the local stream of b*L tokens
    global_cu_seqlens: torch.Tensor  # int32, document starts in the whole micro-batch (b*S tokens)
    _host: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ContextParallelError(f"--cp-mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if not 0 <= self.rank < self.size:
            raise ContextParallelError(f"CP rank {self.rank} is outside [0, {self.size})")
        total = self.batch_size * self.seq_length
        cu = [int(x) for x in host_values(self.global_cu_seqlens).tolist()]
        if cu[0] != 0 or cu[-1] != total:
            raise ContextParallelError(f"global cu_seqlens must run from 0 to b*S={total}, got {cu[0]}..{cu[-1]}")
        self._host["global_cu"] = cu
        self._host["local_cu"] = [int(x) for x in host_values(self.cu_seqlens).tolist()]

    @classmethod
    def from_slice(cls, part: dict, group, rank: int, size: int, mode: str = "chunkwise") -> "ContextParallel":
        """The context of CP rank ``rank`` from its ``cp_slice`` output."""
        b, local = part["tokens"].shape
        return cls(group=group, rank=rank, size=size, mode=mode, batch_size=b, local_length=local,
                   cu_seqlens=part["cu_seqlens"], global_cu_seqlens=part["global_cu_seqlens"])

    @property
    def seq_length(self) -> int:
        return self.local_length * self.size

    # ------------------------------------------------------------------ host tables (every rank alike)
    @cached_property
    def sample_starts(self) -> list[list[int]]:
        """Document starts of each sample, as positions inside the sample."""
        S = self.seq_length
        return [sorted(x - i * S for x in self._host["global_cu"] if i * S <= x < (i + 1) * S)
                for i in range(self.batch_size)]

    @cached_property
    def continues(self) -> torch.Tensor:
        """bool [size, b]: rank j's slice of sample i continues a document from rank j-1."""
        L = self.local_length
        return torch.tensor([[j * L not in set(starts) for starts in self.sample_starts]
                             for j in range(self.size)], dtype=torch.bool)

    @cached_property
    def single(self) -> torch.Tensor:
        """bool [size, b]: rank j's slice of sample i holds no document start (one continuing segment)."""
        L = self.local_length
        return torch.tensor([[not any(j * L <= x < (j + 1) * L for x in starts) for starts in self.sample_starts]
                             for j in range(self.size)], dtype=torch.bool)

    @cached_property
    def any_continues(self) -> bool:
        """Whether any slice boundary falls inside a document (else the ranks need not talk)."""
        return bool(self.continues[1:].any())

    @cached_property
    def local_segments(self) -> tuple[list[int], list[int]]:
        """(first, last): index of the first and the last local document segment of each sample in
        the local ``cu_seqlens``."""
        cu, L = self._host["local_cu"], self.local_length
        first = [cu.index(i * L) for i in range(self.batch_size)]
        last = [cu.index((i + 1) * L) - 1 for i in range(self.batch_size)]
        return first, last

    @property
    def local_cu(self) -> list[int]:
        return self._host["local_cu"]

    @property
    def global_cu(self) -> list[int]:
        return self._host["global_cu"]

    def positions_before(self, count: int, device="cpu") -> torch.Tensor:
        """int64 [b, count + L]: position in its document of each of the ``count`` tokens before this
        rank's slice and of the slice's own tokens (global positions; tokens before a sample's start
        get position 0). Built once per micro-batch and device (a non-blocking copy)."""
        key = ("positions_before", count, str(device))
        if key in self._host:
            return self._host[key]
        L, r = self.local_length, self.rank
        out = []
        for starts in self.sample_starts:
            pos = torch.arange(r * L - count, (r + 1) * L)
            begin = torch.tensor(starts)
            last_start = begin[torch.searchsorted(begin, pos.clamp_min(0), right=True) - 1]
            out.append(torch.where(pos >= 0, pos - last_start, torch.zeros_like(pos)))
        self._host[key] = to_device(torch.stack(out), torch.device(device))
        return self._host[key]

    def global_packed(self, device):
        """The whole micro-batch's ``PackedSequence`` (what a rank sees after the Ulysses all-to-all)."""
        from model.packed import pack

        key = ("global_packed", str(device))
        if key not in self._host:
            self._host[key] = pack(self.batch_size, self.seq_length, self.global_cu_seqlens, device)
        return self._host[key]

    def check_heads(self, heads: int, what: str) -> None:
        """Ulysses gives each CP rank ``heads / size`` whole heads."""
        if heads % self.size:
            raise ContextParallelError(
                f"--cp-mode ulysses splits the {heads} (tensor-parallel local) {what} heads over "
                f"--context-parallel-size={self.size}: heads must divide by CP x TP; use --cp-mode chunkwise "
                f"or another CP size")

    # ------------------------------------------------------------------ mixer entry points
    def kda(self, projections, kernels, g, beta_logits, gate, head_dim: int, options=None):
        """KDA/GDN core under CP: short conv + SiLU of the q/k/v projections, then the KDA op.

        projections: three [b*L, H*D] tensors (before the convolution); kernels: their conv weights
        [H*D, 1, W]; g: raw gate [b*L, H, Dk] (or [b*L, H] for GDN); beta_logits: [b*L, H] (before the
        sigmoid); gate = (A_log, dt_bias, lower_bound); options: the ``kernels.kda.KDAOptions`` of the
        Triton kernels (default ones when None). Returns o [1, b*L, H, Dv]."""
        if self.mode == "chunkwise":
            from .kda_chunkwise import chunkwise_kda_core

            return chunkwise_kda_core(self, projections, kernels, g, beta_logits, gate, head_dim, options)
        from .ulysses import ulysses_kda_core

        return ulysses_kda_core(self, projections, kernels, g, beta_logits, gate, head_dim, options)

    def mla_keys(self, compressed: torch.Tensor) -> torch.Tensor:
        """MLA's compressed keys ``[latent | k_rot]`` ([b*L, kv_lora_rank + rope]) for the keys this
        rank's queries attend to: chunkwise gathers them from the earlier ranks; ulysses keeps them."""
        if self.mode == "chunkwise":
            from .mla_latent import gather_latent

            return gather_latent(self, compressed)
        return compressed

    def mla_attention(self, q, k, v, scale: float, record_max_logits: bool = False):
        """Document-causal softmax attention of this rank's queries q [b*L, H, Dqk] against the keys of
        ``mla_keys``. Returns [b*L, H, Dv]; with ``record_max_logits`` also QK-Clip's record, fp32 [H]:
        per head the largest logit this rank computed (-inf for heads it did not see), so that a MAX
        over the CP ranks gives the whole sequences' maxima."""
        if self.mode == "chunkwise":
            from .mla_latent import latent_attention, latent_max_logits

            out = latent_attention(self, q, k, v, scale)
            return (out, latent_max_logits(self, q, k, scale)) if record_max_logits else out
        from .ulysses import ulysses_attention

        return ulysses_attention(self, q, k, v, scale, record_max_logits)
