"""Loader: determinism (runs, DP sizes), exact resume, blending, splits, vocab checks."""

import json

import numpy as np
import pytest
import torch
from tests.helpers.data import make_documents, write_shard

from data import build_pretraining_loaders

BATCH = dict(seq_length=32, micro_batch_size=2, global_batch_size=8)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_deterministic_across_runs_and_seeds(synthetic_shard):
    prefix, _ = synthetic_shard
    a, _ = build_pretraining_loaders([prefix], split=(1, 0), seed=3, **BATCH)
    b, _ = build_pretraining_loaders([prefix], split=(1, 0), seed=3, **BATCH)
    c, _ = build_pretraining_loaders([prefix], split=(1, 0), seed=4, **BATCH)
    first, second, other = _take(a, 12), _take(b, 12), _take(c, 12)
    _same(first, second)
    assert not torch.equal(first[0]["tokens"], other[0]["tokens"])


def _global_batches(prefix, dp_size, steps):
    """Per global batch: the list of samples (rows) of all ranks, rank-major, micro-batch order."""
    loaders = [build_pretraining_loaders([prefix], split=(1, 0), dp_rank=r, dp_size=dp_size,
                                         **BATCH)[0] for r in range(dp_size)]
    per_rank = BATCH["global_batch_size"] // dp_size // BATCH["micro_batch_size"]
    out = []
    for _ in range(steps):
        rows = []
        for loader in loaders:
            for _ in range(per_rank):
                rows.extend(next(loader)["tokens"])
        out.append(torch.stack(rows))
    return out


def test_union_over_dp_ranks_is_independent_of_dp_size(synthetic_shard):
    prefix, _ = synthetic_shard
    reference = _global_batches(prefix, 1, 6)
    for dp_size in (2, 4):
        for ref, got in zip(reference, _global_batches(prefix, dp_size, 6)):
            torch.testing.assert_close(ref, got)


def test_dp_ranks_get_disjoint_samples(synthetic_shard):
    prefix, _ = synthetic_shard
    r0, _ = build_pretraining_loaders([prefix], split=(1, 0), dp_rank=0, dp_size=2, **BATCH)
    r1, _ = build_pretraining_loaders([prefix], split=(1, 0), dp_rank=1, dp_size=2, **BATCH)
    i0 = {i for g in range(3) for m in range(2) for i in r0.sample_indices(g, m)}
    i1 = {i for g in range(3) for m in range(2) for i in r1.sample_indices(g, m)}
    assert not i0 & i1 and len(i0 | i1) == 3 * 8


@pytest.mark.parametrize("stop_after", [5, 6, 7])  # mid-step and at a step boundary
def test_exact_resume_mid_epoch(synthetic_shard, stop_after):
    prefix, _ = synthetic_shard
    uninterrupted, _ = build_pretraining_loaders([prefix], split=(1, 0), dp_rank=1, dp_size=2,
                                                 **BATCH)
    expected = _take(uninterrupted, 70)  # 280 samples: crosses into the 2nd shuffle window
    assert 70 * 4 > uninterrupted.samples.sources[0].samples_per_window
    first, _ = build_pretraining_loaders([prefix], split=(1, 0), dp_rank=1, dp_size=2, **BATCH)
    _take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed, _ = build_pretraining_loaders([prefix], split=(1, 0), dp_rank=1, dp_size=2, **BATCH)
    resumed.load_state_dict(state)
    _same(expected[stop_after:], _take(resumed, 70 - stop_after))


def test_resume_with_other_dp_size_at_step_boundary(synthetic_shard):
    prefix, _ = synthetic_shard
    single, _ = build_pretraining_loaders([prefix], split=(1, 0), **BATCH)
    expected = _take(single, 4 * 4)[8:]  # global batches 2 and 3 (4 micro-batches each)
    single2, _ = build_pretraining_loaders([prefix], split=(1, 0), **BATCH)
    _take(single2, 8)
    state = single2.state_dict()
    ranks = [build_pretraining_loaders([prefix], split=(1, 0), dp_rank=r, dp_size=2, **BATCH)[0]
             for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    for step in range(2):
        got = [b for loader in ranks for b in _take(loader, 2)]
        _same(expected[step * 4:(step + 1) * 4], got)


def test_resume_refuses_other_data(synthetic_shard, tmp_path):
    prefix, _ = synthetic_shard
    other = write_shard(tmp_path / "other", make_documents(150, seed=9))
    a, _ = build_pretraining_loaders([prefix], split=(1, 0), **BATCH)
    b, _ = build_pretraining_loaders([other], split=(1, 0), **BATCH)
    next(a)
    with pytest.raises(ValueError, match="other data or settings"):
        b.load_state_dict(a.state_dict())
    a2, _ = build_pretraining_loaders([prefix], split=(1, 0), dp_size=2, **BATCH)
    with pytest.raises(ValueError, match="step-boundary"):
        a2.load_state_dict(a.state_dict())


def test_blend_weights_within_tolerance(tmp_path):
    ranges = [(1, 100), (100, 200), (200, 300)]
    prefixes = [write_shard(tmp_path / f"c{i}", make_documents(80, seed=i, low=lo, high=hi))
                for i, (lo, hi) in enumerate(ranges)]
    weights = [0.5, 0.3, 0.2]
    train, _ = build_pretraining_loaders(blend=list(zip(weights, prefixes)), split=(1, 0),
                                         seq_length=16, micro_batch_size=8, global_batch_size=8)
    counts = np.zeros(3)
    for _ in range(500):  # 4000 samples
        for row in next(train)["tokens"]:
            body = row[row > 0]
            counts[int(body[0]) // 100] += 1
    np.testing.assert_allclose(counts / counts.sum(), weights, atol=0.01)
    # the schedule itself tracks the weights to within a couple of samples at any point
    samples = train.samples
    sources = np.array([samples.locate(k)[0] for k in range(20000)])
    for d, w in enumerate(weights):
        running = np.cumsum(sources == d)
        assert np.max(np.abs(running - w * np.arange(1, 20001))) <= 2


def test_source_shares_count_the_samples_drawn(tmp_path):
    """The logged shares are the counts of the samples all DP ranks drew from each source (read
    from the tokens: source d's documents hold ids d*100..d*100+99), over whole steps."""
    ranges = [(1, 100), (100, 200), (200, 300)]
    prefixes = [write_shard(tmp_path / f"c{i}", make_documents(80, seed=i, low=lo, high=hi))
                for i, (lo, hi) in enumerate(ranges)]
    blend = list(zip([0.6, 0.3, 0.1], prefixes))
    ranks = [build_pretraining_loaders(blend=blend, split=(1, 0), seq_length=16, micro_batch_size=2,
                                       global_batch_size=8, dp_rank=r, dp_size=2)[0] for r in range(2)]
    assert ranks[0].source_shares() == {}
    counts = np.zeros(3)
    for step in range(1, 8):
        for loader in ranks:
            for _ in range(loader.num_micro_batches):
                for row in next(loader)["tokens"]:
                    counts[int(row[row > 0][0]) // 100] += 1
        shares = ranks[0].source_shares()
        assert shares == ranks[1].source_shares()
        assert [shares[f"data/source{d}_share"] for d in range(3)] == pytest.approx(counts / (8 * step))
    # BlendedSamples.counts across its repeating block (a short block here) against locate()
    samples = ranks[0].samples
    short = type(samples)(samples.sources, [0.6, 0.3, 0.1], block=7)
    sources = [short.locate(k)[0] for k in range(40)]
    for stop in range(40):
        assert short.counts(stop).tolist() == [sources[:stop].count(d) for d in range(3)]
    single, _ = build_pretraining_loaders(prefixes[:1], split=(1, 0), seq_length=16, micro_batch_size=2,
                                          global_batch_size=8)
    for _ in range(single.num_micro_batches):
        next(single)
    assert single.consumed_samples == 8 and single.source_shares() == {}


def test_split_and_separate_validation(synthetic_shard, tmp_path):
    prefix, docs = synthetic_shard
    train, valid = build_pretraining_loaders([prefix], split=(0.9, 0.1), **BATCH)
    train_docs = set(train.samples.sources[0].doc_ids.tolist())
    valid_docs = set(valid.samples.sources[0].doc_ids.tolist())
    assert not train_docs & valid_docs and len(train_docs | valid_docs) == len(docs)
    assert len(valid_docs) == 20
    first = _take(valid, 3)
    valid.reset()
    _same(first, _take(valid, 3))
    other = write_shard(tmp_path / "valid", make_documents(30, seed=5))
    train2, valid2 = build_pretraining_loaders([prefix], valid_prefixes=[other], **BATCH)
    assert train2.samples.sources[0].doc_ids.size == len(docs)
    assert valid2.samples.sources[0].corpus.prefixes == [other]
    _, none = build_pretraining_loaders([prefix], split=(1, 0), **BATCH)
    assert none is None


def test_vocab_mismatch_is_refused(tmp_path, default_dataset):
    prefix = write_shard(tmp_path / "big_ids", [np.array([5, 9000, 0]), np.array([7, 0])] * 40)
    with pytest.raises(ValueError, match=r"token id 9000.*vocab_size is 8192"):
        build_pretraining_loaders([prefix], split=(1, 0), vocab_size=8192, **BATCH)
    with pytest.raises(ValueError, match=r"tokenizer.*needs vocab_size >= 8192.*model's vocab_size "
                                         r"is 4096"):
        build_pretraining_loaders(default_dataset.train_prefixes, split=(1, 0), vocab_size=4096,
                                  **BATCH)
    with pytest.raises(ValueError, match="needs vocab_size >= 8192"):
        build_pretraining_loaders([prefix], split=(1, 0), vocab_size=4096, **BATCH,
                                  tokenizer_dir=default_dataset.tokenizer_dir)


def test_bad_batch_layout_is_refused(synthetic_shard):
    prefix, _ = synthetic_shard
    with pytest.raises(ValueError, match="multiple of micro_batch_size \\* dp_size"):
        build_pretraining_loaders([prefix], split=(1, 0), seq_length=8, micro_batch_size=3,
                                  global_batch_size=8, dp_size=2)
    with pytest.raises(FileNotFoundError, match="missing_prefix.bin does not exist"):
        build_pretraining_loaders([str(prefix) + "missing_prefix"], **BATCH)
