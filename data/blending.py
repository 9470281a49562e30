"""Weighted blending of several packed-sample sequences, deterministic and random-access.

Within a block of B consecutive blended samples, position i goes to the source whose share lags
its weight the most (argmax of w_d * (i+1) - taken_d; Megatron's BlendedDataset rule). The block's
schedule is computed once and repeats: blended sample k = m*B + p is sample
m * taken_d(B) + rank_in_block(p) of source d = schedule[p]. So every source's count after any k
samples is within about one sample (plus the block's rounding) of w_d * k, and resuming at any k is
O(1).
"""

from __future__ import annotations

import numpy as np

from data.packing import PackedSamples

DEFAULT_BLOCK = 8192


class BlendedSamples:
    def __init__(self, sources: list[PackedSamples], weights: list[float],
                 block: int = DEFAULT_BLOCK):
        if len(sources) != len(weights) or not sources:
            raise ValueError("blend needs one weight per corpus and at least one corpus")
        weights_array = np.asarray(weights, dtype=np.float64)
        if np.any(~np.isfinite(weights_array)) or np.any(weights_array < 0) \
                or weights_array.sum() <= 0:
            raise ValueError(f"blend weights must be non-negative with a positive sum, got {weights}")
        self.sources = sources
        self.weights = weights_array / weights_array.sum()
        self.block = block
        self.schedule = np.empty(block, dtype=np.int32)
        self.rank_in_block = np.empty(block, dtype=np.int64)
        taken = np.zeros(len(sources), dtype=np.int64)
        for i in range(block):
            lag = self.weights * (i + 1) - taken
            d = int(np.argmax(lag))
            self.schedule[i] = d
            self.rank_in_block[i] = taken[d]
            taken[d] += 1
        self.per_block = taken

    def locate(self, index: int) -> tuple[int, int]:
        """(source, index within that source) of blended sample `index`."""
        block, position = divmod(int(index), self.block)
        source = int(self.schedule[position])
        return source, block * int(self.per_block[source]) + int(self.rank_in_block[position])

    def counts(self, stop: int) -> np.ndarray:
        """How many of the blended samples [0, stop) each source gave."""
        blocks, position = divmod(int(stop), self.block)
        return blocks * self.per_block + np.bincount(self.schedule[:position], minlength=len(self.sources))

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[int]]:
        source, local = self.locate(index)
        return self.sources[source][local]

    def fingerprint(self) -> dict:
        return {"weights": [round(float(w), 12) for w in self.weights],
                "sources": [s.fingerprint() for s in self.sources]}
