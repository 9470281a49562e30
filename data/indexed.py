"""Megatron indexed token files (.bin + .idx): atomic writing and validated reading.

The on-disk format is exactly Megatron-LM's (`megatron.core.datasets.indexed_dataset`), so files
made here feed Megatron-LM's own GPTDataset and files made by Megatron-LM's
`tools/preprocess_data.py` feed ours. We write through megatron's `IndexedDatasetBuilder` and read
the index through megatron's `IndexedDataset`; what we add is:

* atomic shards: both files are written under temporary names, fsynced and renamed (.bin first,
  .idx last), so a crash never leaves a pair that a reader would accept;
* validation before use: a truncated or mismatched .bin/.idx is refused with a message naming the
  file and the fix, instead of megatron's bare asserts or silently reading garbage.

Token dtype: uint16 when the vocabulary has fewer than 65536 entries, else int32 (megatron's
format has no uint32 code; int32 covers every vocabulary below 2**31).
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# megatron's DType codes (indexed_dataset.DType); kept here so validation needs no megatron import
_DTYPE_BY_CODE = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}


class CorruptIndexedFileError(ValueError):
    """A .bin/.idx pair that is truncated, mismatched or not in Megatron's format."""


def megatron_indexed_dataset():
    """megatron.core.datasets.indexed_dataset, imported quietly (its package import warns about
    optional GPU libraries that token files never need)."""
    import logging

    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    finally:
        torch_logger.setLevel(level)
    return indexed_dataset


def token_dtype_for_vocab(vocab_size: int) -> type[np.integer]:
    """The smallest dtype megatron's format can store for token ids < vocab_size."""
    return np.uint16 if vocab_size < 65536 else np.int32


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".idx")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicShardWriter:
    """Writes one shard (one document per megatron sequence) under temporary names.

    `commit()` fsyncs and renames into place and returns the shard's statistics; `abort()` (or an
    exception inside a `with` block) deletes the temporary files. Nothing is visible at `prefix`
    until commit.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.integer]):
        IndexedDatasetBuilder = megatron_indexed_dataset().IndexedDatasetBuilder
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).type
        self._tmp_bin = Path(str(bin_path(prefix)) + ".tmp")
        self._tmp_idx = Path(str(idx_path(prefix)) + ".tmp")
        self._builder = IndexedDatasetBuilder(str(self._tmp_bin), dtype=self.dtype)
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1
        self._closed = False

    def add_document(self, token_ids: np.ndarray) -> None:
        token_ids = np.asarray(token_ids)
        if token_ids.size == 0:
            raise ValueError("empty document: every document carries at least its EOS token")
        if token_ids.max() > np.iinfo(self.dtype).max or token_ids.min() < 0:
            raise ValueError(
                f"token id out of range for {np.dtype(self.dtype).name} in {self.prefix}"
            )
        self._builder.add_document(token_ids.astype(self.dtype, copy=False), [int(token_ids.size)])
        self.documents += 1
        self.tokens += int(token_ids.size)
        self.max_token_id = max(self.max_token_id, int(token_ids.max()))

    def commit(self) -> dict:
        if self.documents == 0:
            self.abort()
            raise ValueError(f"refusing to write an empty shard at {self.prefix}")
        self._builder.finalize(str(self._tmp_idx))
        self._closed = True
        for path in (self._tmp_bin, self._tmp_idx):
            _fsync(path)
        # .bin first, .idx last: a reader needs both, so a crash in between leaves no valid pair
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        return {
            "prefix": self.prefix.name,
            "documents": self.documents,
            "tokens": self.tokens,
            "max_token_id": self.max_token_id,
            "bin_bytes": bin_path(self.prefix).stat().st_size,
            "idx_bytes": idx_path(self.prefix).stat().st_size,
            "bin_sha256": sha256_file(bin_path(self.prefix)),
            "idx_sha256": sha256_file(idx_path(self.prefix)),
        }

    def abort(self) -> None:
        if not self._closed:
            self._builder.data_file.close()
            self._closed = True
        for path in (self._tmp_bin, self._tmp_idx):
            path.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass(frozen=True)
class IndexHeader:
    dtype: type[np.integer]
    sequence_count: int
    document_count: int  # entries in document_indices (number of documents + 1)


def read_index_header(prefix: str | os.PathLike) -> IndexHeader:
    """Parse and size-check the .idx file and check the .bin size it implies."""
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    for path in (bpath, ipath):
        if not path.exists():
            raise FileNotFoundError(
                f"data prefix {prefix}: {path} does not exist. A prefix names a pair "
                f"{bpath.name} + {ipath.name} written by launch/prepare_data.py; check the path, "
                "or pass the prepared directory (the one holding manifest.json)."
            )
    fix = "Delete the pair and re-run launch/prepare_data.py (it rebuilds missing shards)."
    size = ipath.stat().st_size
    if size < _HEADER_BYTES:
        raise CorruptIndexedFileError(f"{ipath} is truncated ({size} bytes, header needs "
                                      f"{_HEADER_BYTES}). {fix}")
    with open(ipath, "rb") as handle:
        magic = handle.read(9)
        version = struct.unpack("<Q", handle.read(8))[0]
        code = struct.unpack("<B", handle.read(1))[0]
        sequence_count = struct.unpack("<Q", handle.read(8))[0]
        document_count = struct.unpack("<Q", handle.read(8))[0]
    if magic != INDEX_HEADER or version != 1 or code not in _DTYPE_BY_CODE:
        raise CorruptIndexedFileError(
            f"{ipath} is not a Megatron indexed-dataset index (magic {magic!r}, version "
            f"{version}, dtype code {code}). {fix}"
        )
    expected = _HEADER_BYTES + sequence_count * (4 + 8) + document_count * 8
    if size != expected:
        raise CorruptIndexedFileError(
            f"{ipath} has {size} bytes but its header ({sequence_count} sequences, "
            f"{document_count - 1} documents) needs exactly {expected}: the index is truncated "
            f"or was written by another run (multimodal indices are not supported). {fix}"
        )
    return IndexHeader(_DTYPE_BY_CODE[code], sequence_count, document_count)


class TokenShard:
    """One validated .bin/.idx pair, seen as a flat token array plus document spans.

    The index is parsed by megatron's `IndexedDataset`; tokens are read from a flat memmap of the
    .bin (megatron's sequences are stored back to back, so a document spanning several sequences
    is one contiguous run of tokens).
    """

    def __init__(self, prefix: str | os.PathLike):
        header = read_index_header(prefix)
        self.prefix = str(prefix)
        bpath = bin_path(prefix)
        itemsize = np.dtype(header.dtype).itemsize
        bin_bytes = bpath.stat().st_size

        IndexedDataset = megatron_indexed_dataset().IndexedDataset
        if header.sequence_count == 0 or bin_bytes == 0:
            raise CorruptIndexedFileError(f"{bpath} holds no tokens; prepare it again with data.")
        with warnings.catch_warnings():  # megatron warns that no distributed rank is set
            warnings.simplefilter("ignore")
            index = IndexedDataset(self.prefix, mmap=False).index  # parses .idx only
        # copies: megatron closes the index mmap when its reader is collected
        lengths = np.array(index.sequence_lengths, dtype=np.int64)
        pointers = np.array(index.sequence_pointers, dtype=np.int64)
        document_indices = np.array(index.document_indices, dtype=np.int64)
        expected_bin = int(lengths.sum()) * itemsize
        if bin_bytes != expected_bin or pointers[-1] + lengths[-1] * itemsize != expected_bin:
            raise CorruptIndexedFileError(
                f"{bpath} has {bin_bytes} bytes but {idx_path(prefix)} describes "
                f"{expected_bin} bytes ({int(lengths.sum())} tokens of {np.dtype(header.dtype).name})"
                ": the .bin is truncated or does not belong to this index. Delete the pair and "
                "re-run launch/prepare_data.py."
            )
        if (document_indices[0] != 0 or document_indices[-1] != header.sequence_count
                or np.any(np.diff(document_indices) < 0)):
            raise CorruptIndexedFileError(f"{idx_path(prefix)} has inconsistent document indices.")
        del index
        sequence_starts = pointers // itemsize
        starts = sequence_starts[document_indices[:-1]]
        ends = np.append(sequence_starts, lengths.sum())[document_indices[1:]]
        keep = ends > starts  # drop documents without sequences (megatron allows them)
        self.doc_starts = starts[keep]
        self.doc_lengths = (ends - starts)[keep]
        self.dtype = header.dtype
        self.tokens = np.memmap(bpath, dtype=header.dtype, mode="r")

    @property
    def num_documents(self) -> int:
        return int(self.doc_lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def document(self, doc: int) -> np.ndarray:
        start = int(self.doc_starts[doc])
        return np.asarray(self.tokens[start:start + int(self.doc_lengths[doc])])

    def max_token_id(self) -> int:
        return int(self.tokens.max())
