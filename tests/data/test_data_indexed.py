"""Indexed token files: megatron compatibility, atomic writes, truncated/mismatched files refused."""

import numpy as np
import pytest
from tests.helpers.data import make_documents, write_shard

from data.indexed import (CorruptIndexedFileError, TokenShard, bin_path, idx_path,
                          megatron_indexed_dataset, token_dtype_for_vocab)


@pytest.mark.filterwarnings("ignore:Could not determine rank")
def test_round_trip_and_megatron_reads_our_files(tmp_path):
    docs = make_documents(20, seed=1)
    prefix = write_shard(tmp_path / "shard", docs)
    shard = TokenShard(prefix)
    assert shard.num_documents == 20 and shard.num_tokens == sum(d.size for d in docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(shard.document(i), doc)
    megatron = megatron_indexed_dataset().IndexedDataset(prefix)
    assert len(megatron) == 20
    np.testing.assert_array_equal(megatron[3], docs[3])
    assert not list(tmp_path.glob("*.tmp"))


def test_dtype_choice():
    assert token_dtype_for_vocab(8192) == np.uint16
    assert token_dtype_for_vocab(65535) == np.uint16
    assert token_dtype_for_vocab(65536) == np.int32  # megatron's format has no uint32


def test_large_vocab_uses_int32(tmp_path):
    docs = [np.array([70000, 5, 0]), np.array([1, 0])]
    prefix = write_shard(tmp_path / "big", docs, dtype=np.int32)
    assert TokenShard(prefix).max_token_id() == 70000


def test_truncated_bin_is_refused(synthetic_shard):
    prefix, _ = synthetic_shard
    data = bin_path(prefix).read_bytes()
    bin_path(prefix).write_bytes(data[:-2])
    with pytest.raises(CorruptIndexedFileError, match=r"synthetic\.bin.*truncated.*prepare_data"):
        TokenShard(prefix)


def test_truncated_idx_is_refused(synthetic_shard):
    prefix, _ = synthetic_shard
    data = idx_path(prefix).read_bytes()
    idx_path(prefix).write_bytes(data[:-8])
    with pytest.raises(CorruptIndexedFileError, match=r"synthetic\.idx.*truncated"):
        TokenShard(prefix)
    idx_path(prefix).write_bytes(data[:20])
    with pytest.raises(CorruptIndexedFileError, match="truncated"):
        TokenShard(prefix)


def test_index_of_another_bin_is_refused(tmp_path):
    a = write_shard(tmp_path / "a", make_documents(10, seed=1))
    b = write_shard(tmp_path / "b", make_documents(10, seed=2))
    bin_path(a).write_bytes(bin_path(b).read_bytes())
    with pytest.raises(CorruptIndexedFileError, match="does not belong to this index"):
        TokenShard(a)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.bin does not exist"):
        TokenShard(tmp_path / "nothere")


def test_failed_write_leaves_nothing(tmp_path):
    from data.indexed import AtomicShardWriter

    with pytest.raises(RuntimeError):
        with AtomicShardWriter(tmp_path / "x", np.uint16) as writer:
            writer.add_document(np.array([1, 2, 0]))
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
