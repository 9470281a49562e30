"""Helpers for the data tests: tiny synthetic token shards whose documents are known exactly."""

from __future__ import annotations

import numpy as np

from data.indexed import AtomicShardWriter

EOS = 0


def make_documents(count: int, seed: int, low: int = 1, high: int = 100, min_len: int = 3,
                   max_len: int = 60) -> list[np.ndarray]:
    """Random documents of ids in [low, high), each ending with EOS (id 0)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        body = rng.integers(low, high, size=int(rng.integers(min_len, max_len)))
        docs.append(np.append(body, EOS))
    return docs


def write_shard(prefix, docs, dtype=np.uint16) -> str:
    with AtomicShardWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
        writer.commit()
    return str(prefix)
