"""Packing: samples are windows of the shuffled document stream; cu_seqlens = starts after EOS."""

import numpy as np
import pytest
import torch
from tests.helpers.data import EOS, make_documents, write_shard

from data import build_pretraining_loaders
from data.loader import collate
from data.packing import DocumentCorpus, PackedSamples


def _packed(prefix, seq_length, seed=7):
    corpus = DocumentCorpus(prefix)
    return PackedSamples(corpus, np.arange(corpus.num_documents), seq_length, seed, "t")


def test_unshuffled_samples_tile_the_shuffled_document_stream(synthetic_shard):
    prefix, docs = synthetic_shard
    samples = _packed(prefix, 16)
    order, _ = samples._epoch(0)
    assert sorted(order.tolist()) == list(range(len(docs)))  # a permutation of all documents
    stream = np.concatenate([docs[i] for i in order])
    for j in range(samples.samples_per_window):
        span, _ = samples.read_stream(j * 16, 17)
        np.testing.assert_array_equal(span, stream[j * 16:j * 16 + 17])
    # samples shuffle inside a window: each unshuffled sample exactly once
    window = [samples.unshuffled_index(k) for k in range(samples.samples_per_window)]
    assert sorted(window) == list(range(samples.samples_per_window))
    assert window != sorted(window)


def test_epochs_differ_and_continue_the_stream(synthetic_shard):
    prefix, docs = synthetic_shard
    samples = _packed(prefix, 16)
    assert not np.array_equal(samples._epoch(0)[0], samples._epoch(1)[0])
    total = samples.tokens_per_epoch
    span, _ = samples.read_stream(total - 5, 10)  # crosses from epoch 0 into epoch 1
    first_doc_epoch1 = docs[samples._epoch(1)[0][0]]
    np.testing.assert_array_equal(span[5:], first_doc_epoch1[:5])


@pytest.mark.parametrize("seq_length", [8, 64])
def test_cu_seqlens_are_positions_after_eos(synthetic_shard, seq_length):
    prefix, _ = synthetic_shard
    train, _ = build_pretraining_loaders([prefix], split=(1, 0), seq_length=seq_length,
                                         micro_batch_size=4, global_batch_size=8)
    seen_inner_boundary = False
    for _ in range(20):
        batch = next(train)
        flat = batch["tokens"].flatten()
        eos_positions = (flat == EOS).nonzero().flatten() + 1
        sample_starts = torch.arange(0, flat.numel() + 1, seq_length)
        expected = torch.unique(torch.cat([eos_positions, sample_starts]))
        torch.testing.assert_close(batch["cu_seqlens"], expected.to(torch.int32))
        assert batch["cu_seqlens"].dtype == torch.int32
        torch.testing.assert_close(batch["tokens"][:, 1:], batch["labels"][:, :-1])
        seen_inner_boundary |= batch["cu_seqlens"].numel() > 4 + 1
    assert seen_inner_boundary


def test_real_text_boundaries(default_dataset):
    train, _ = build_pretraining_loaders(default_dataset.train_prefixes, split=(1, 0),
                                         seq_length=512, micro_batch_size=2, global_batch_size=2)
    eos = default_dataset.eos_token_id
    boundaries = 0
    for _ in range(30):
        batch = next(train)
        flat = batch["tokens"].flatten()
        expected = torch.unique(torch.cat([(flat == eos).nonzero().flatten() + 1,
                                           torch.tensor([0, 512, 1024])]))
        torch.testing.assert_close(batch["cu_seqlens"], expected.to(torch.int32))
        boundaries += batch["cu_seqlens"].numel() - 3
    assert boundaries > 0


def test_plain_concatenation_for_ablations(synthetic_shard):
    prefix, _ = synthetic_shard
    kwargs = dict(split=(1, 0), seq_length=32, micro_batch_size=2, global_batch_size=2)
    plain, _ = build_pretraining_loaders([prefix], reset_at_document_boundaries=False, **kwargs)
    reset, _ = build_pretraining_loaders([prefix], **kwargs)
    a, b = next(plain), next(reset)
    torch.testing.assert_close(a["cu_seqlens"], torch.tensor([0, 32, 64], dtype=torch.int32))
    torch.testing.assert_close(a["tokens"], b["tokens"])  # same data, only the boundaries differ


def test_mask_cross_document_loss():
    samples = [(np.array([5, 6, 0, 7, 8, 0, 9]), [3, 6])]
    batch = collate(samples, 6, True, mask_cross_document_loss=True)
    torch.testing.assert_close(batch["loss_mask"], torch.tensor([[1, 1, 0, 1, 1, 0.]]))
    torch.testing.assert_close(batch["cu_seqlens"], torch.tensor([0, 3, 6], dtype=torch.int32))


def test_sequence_longer_than_the_data_is_refused(tmp_path):
    prefix = write_shard(tmp_path / "tiny", make_documents(3, seed=0, max_len=6))
    with pytest.raises(ValueError, match=r"tiny.*cannot fill one sample.*smaller seq_length"):
        build_pretraining_loaders([prefix], split=(1, 0), seq_length=4096, micro_batch_size=1,
                                  global_batch_size=1)
