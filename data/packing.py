"""Packed fixed-length samples over a document corpus, with the document boundaries they cross.

Model (Megatron GPTDataset's, computed lazily so the sample sequence is endless):

* the token stream of a split is its documents in a seeded random order, epoch after epoch
  (epoch e uses permutation e; every document ends with EOS, written by the preparation);
* unshuffled sample j is stream tokens [j*S, j*S + S + 1): inputs are its first S tokens, labels
  its last S (consecutive samples share one token, as in Megatron);
* samples are shuffled within windows of W = (tokens per epoch - 1) // S samples (about one epoch):
  shuffled sample k is unshuffled sample m*W + perm_m[k % W] with m = k // W, so every sample of a
  window is seen once and random access (resume at any k) is O(log documents).

Each sample carries the stream positions where a document ends; the loader turns those into
`cu_seqlens`, the single source of document boundaries. We do not use megatron's GPTDataset
because its samples do not expose where documents end (its reset_attention_mask path re-derives
boundaries from EOS ids, which is what our design forbids) and it needs a fixed sample count.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data.indexed import TokenShard
from data.prepare import MANIFEST_NAME, read_manifest, shard_prefixes


def resolve_prefixes(prefixes: list[str] | str) -> list[str]:
    """Expand prepared folders (holding manifest.json) into their shard prefixes."""
    if isinstance(prefixes, (str, Path)):
        prefixes = [prefixes]
    resolved = []
    for prefix in prefixes:
        if Path(prefix).is_dir():
            resolved.extend(shard_prefixes(prefix))
        else:
            resolved.append(str(prefix))
    if not resolved:
        raise ValueError("no data prefixes given: pass data_prefixes=[...] or blend=[(w, p), ...]")
    return resolved


def _manifest_entry(prefix: str) -> tuple[dict | None, dict | None]:
    """(manifest, shard entry) of the prepared folder a shard prefix belongs to, if any."""
    folder = Path(prefix).parent
    if not (folder / MANIFEST_NAME).exists():
        return None, None
    manifest = read_manifest(folder)
    for shard in manifest.get("shards", []):
        if shard["prefix"] == Path(prefix).name:
            return manifest, shard
    return manifest, None


def recorded_tokenizers(prefixes: list[str] | str) -> dict[str, dict]:
    """{shard prefix: the tokenizer its preparation manifest records (path, sha256, vocab_size,
    eos_token_id)} for the prefixes (or prepared folders) whose manifest records one."""
    records = {}
    for prefix in resolve_prefixes(prefixes):
        manifest, _ = _manifest_entry(prefix)
        if manifest and "tokenizer" in manifest:
            records[prefix] = manifest["tokenizer"]
    return records


class DocumentCorpus:
    """All documents of a list of shards, pooled: document id -> (shard, start, length)."""

    def __init__(self, prefixes: list[str] | str, name: str | None = None):
        self.prefixes = resolve_prefixes(prefixes)
        self.name = name or ",".join(str(p) for p in (prefixes if isinstance(prefixes, list)
                                                       else [prefixes]))
        self.shards = [TokenShard(prefix) for prefix in self.prefixes]
        self.doc_shard = np.concatenate([np.full(s.num_documents, i, dtype=np.int32)
                                         for i, s in enumerate(self.shards)])
        self.doc_start = np.concatenate([s.doc_starts for s in self.shards]).astype(np.int64)
        self.doc_length = np.concatenate([s.doc_lengths for s in self.shards]).astype(np.int64)

    @property
    def num_documents(self) -> int:
        return int(self.doc_length.size)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_length.sum())

    def read(self, doc: int, offset: int, count: int) -> np.ndarray:
        start = int(self.doc_start[doc]) + offset
        return self.shards[int(self.doc_shard[doc])].tokens[start:start + count]

    def max_token_id(self) -> int:
        """Largest id in the data: from the manifests when they know it, else by scanning."""
        largest = -1
        for prefix, shard in zip(self.prefixes, self.shards):
            _, entry = _manifest_entry(prefix)
            largest = max(largest, entry["max_token_id"] if entry else shard.max_token_id())
        return largest

    def tokenizer_vocab_sizes(self) -> dict[str, int]:
        """{prefix: vocab size of the tokenizer that made it} where a manifest records it."""
        return {prefix: int(record["vocab_size"]) for prefix, record in recorded_tokenizers(self.prefixes).items()}

    def split_documents(self, split: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Contiguous train/valid document ranges (as Megatron: the last documents validate;
        prepared corpora keep a book's chapters together, so this splits by book)."""
        if len(split) != 2 or min(split) < 0 or sum(split) <= 0:
            raise ValueError(f"split must be two non-negative fractions (train, valid), got {split}")
        n = self.num_documents
        n_valid = int(round(n * split[1] / sum(split)))
        if split[1] > 0:
            n_valid = max(1, n_valid)
        if n - n_valid < 1:
            raise ValueError(f"{self.name}: {n} document(s) cannot be split {split} into training and "
                             "validation documents; give a separate validation corpus (launch/pretrain.py "
                             "--set train.valid_prefixes=PREFIX; in Python valid_prefixes=[...]) or add documents")
        return np.arange(0, n - n_valid), np.arange(n - n_valid, n)


class PackedSamples:
    """The endless, seeded sequence of packed samples of one split of one corpus."""

    def __init__(self, corpus: DocumentCorpus, doc_ids: np.ndarray, seq_length: int, seed: int,
                 stream_name: str):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.corpus = corpus
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.seq_length = seq_length
        self.lengths = corpus.doc_length[self.doc_ids]
        self.tokens_per_epoch = int(self.lengths.sum())
        self.name = f"{corpus.name} [{stream_name}]"
        if self.tokens_per_epoch < seq_length + 1:
            raise ValueError(
                f"{self.name}: {self.tokens_per_epoch} tokens in {self.doc_ids.size} documents "
                f"cannot fill one sample of seq_length+1 = {seq_length + 1} tokens; use a smaller "
                "seq_length or add data (or a smaller validation split)."
            )
        self.samples_per_window = max(1, (self.tokens_per_epoch - 1) // seq_length)
        # a stable salt: the same stream_name gives the same order wherever the files live
        self.stream_name = stream_name
        self._salt = zlib.crc32(stream_name.encode())
        self._seed = seed
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[int, np.ndarray] = OrderedDict()

    def _rng(self, kind: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, self._salt, kind, index])

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token offsets with a leading 0) of one epoch."""
        if epoch not in self._epochs:
            perm = self._rng(0, epoch).permutation(self.doc_ids.size)
            cum = np.zeros(perm.size + 1, dtype=np.int64)
            np.cumsum(self.lengths[perm], out=cum[1:])
            self._epochs[epoch] = (self.doc_ids[perm], cum)
            if len(self._epochs) > 3:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _window(self, window: int) -> np.ndarray:
        if window not in self._windows:
            self._windows[window] = self._rng(1, window).permutation(self.samples_per_window)
            if len(self._windows) > 3:
                self._windows.popitem(last=False)
        return self._windows[window]

    def unshuffled_index(self, index: int) -> int:
        window, position = divmod(int(index), self.samples_per_window)
        return window * self.samples_per_window + int(self._window(window)[position])

    def read_stream(self, start: int, count: int) -> tuple[np.ndarray, list[int]]:
        """Stream tokens [start, start+count) and the span offsets right after each document end."""
        out = np.empty(count, dtype=np.int64)
        ends: list[int] = []
        filled = 0
        while filled < count:
            epoch, within = divmod(start + filled, self.tokens_per_epoch)
            order, cum = self._epoch(epoch)
            k = int(np.searchsorted(cum, within, side="right")) - 1
            offset = within - int(cum[k])
            doc = int(order[k])
            doc_length = int(cum[k + 1] - cum[k])
            take = min(doc_length - offset, count - filled)
            out[filled:filled + take] = self.corpus.read(doc, offset, take)
            filled += take
            if offset + take == doc_length:
                ends.append(filled)
        return out, ends

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[int]]:
        """Shuffled sample `index`: seq_length+1 tokens and the offsets after document ends."""
        j = self.unshuffled_index(index)
        return self.read_stream(j * self.seq_length, self.seq_length + 1)

    def fingerprint(self) -> dict:
        """What must match for a saved loader position to mean the same samples (no paths, so a
        moved data folder still resumes)."""
        return {"stream": self.stream_name, "documents": int(self.doc_ids.size),
                "tokens": self.tokens_per_epoch, "seq_length": self.seq_length, "seed": self._seed}
