"""Synthetic-task generators: the answers are right by construction (checked against plain
re-derivations), the batch format is the pretraining loader's, and samples are deterministic."""

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticSamples, build_synthetic_loaders, check_length, heldout_batches, make_task
from model.config import ConfigError


def _samples(task, length, count=64, seed=0, split="train"):
    samples = SyntheticSamples(task, length, seed, split)
    return [samples[i] for i in range(count)]


@pytest.mark.parametrize("length", [2, 9, 64, 257])
def test_palindrome_answers_are_the_reversed_sequence(length):
    task = make_task("palindrome", symbols=5)
    for stream, answer in _samples(task, length):
        assert stream.shape == answer.shape == (length + 1,)
        n = length // 2
        first, second = stream[:n], stream[n + 1:2 * n + 1]
        assert stream[n] == task.sep and (first < task.symbols).all()
        assert list(second) == list(reversed(first))
        assert np.flatnonzero(answer).tolist() == list(range(n + 1, 2 * n + 1))
        assert (stream[2 * n + 1:] == task.pad).all()  # one pad when the length is odd


@pytest.mark.parametrize("length,pairs", [(3, 0), (64, 0), (100, 5), (1024, 0)])
def test_mqar_answers_are_the_values_of_the_queried_keys(length, pairs):
    task = make_task("mqar", keys=300, values=300, kv_pairs=pairs)
    n = pairs or max(1, length // 64)
    for stream, answer in _samples(task, length, count=16):
        context = {int(stream[2 * i]): int(stream[2 * i + 1]) for i in range(n)}
        assert len(context) == n and all(k < task.keys <= v for k, v in context.items())
        queried = []
        for position in np.flatnonzero(answer):
            assert position >= 2 * n + 1
            key = int(stream[position - 1])
            assert stream[position] == context[key]
            queried.append(key)
        assert sorted(queried) == sorted(context)  # every key asked exactly once
        rest = np.ones(length + 1, dtype=bool)
        rest[:2 * n] = False
        rest[np.flatnonzero(answer) - 1] = False
        assert (stream[rest] >= task.keys).all()  # outside the pairs and queries: values/noise, never a key
        rest[np.flatnonzero(answer)] = False
        assert (stream[rest] == task.pad).all()  # the gaps hold the default fill: <pad>, the last id


def test_mqar_gap_fill_pad_or_value_noise():
    pad = make_task("mqar", keys=50, values=60, kv_pairs=4)
    noisy = make_task("mqar", keys=50, values=60, kv_pairs=4, noise="values")
    assert (pad.vocab_size, pad.pad, noisy.vocab_size) == (111, 110, 110)
    for task in (pad, noisy):
        for stream, answer in _samples(task, 40, count=8):
            gaps = np.ones(41, dtype=bool)
            gaps[:8] = False
            gaps[np.flatnonzero(answer) - 1] = False
            gaps[np.flatnonzero(answer)] = False
            fill = stream[gaps]
            if task is pad:
                assert (fill == task.pad).all()
            else:
                assert (fill >= task.keys).all() and (fill < task.keys + task.values).all() and len(set(fill)) > 1
    with pytest.raises(ConfigError, match="noise='zeros': use pad or values"):
        check_length(make_task("mqar", noise="zeros"), 64)


@pytest.mark.parametrize("length", [5, 47, 300, 2048])
def test_stack_pops_return_the_last_push_of_that_stack(length):
    task = make_task("stack", stacks=6, values=7)
    pops = 0
    for stream, answer in _samples(task, length):
        stacks = {}
        ops = (length + 1) // 3
        sample_pops = 0
        for i in range(ops):
            kind, stack, value = (int(x) for x in stream[3 * i:3 * i + 3])
            assert task.values <= stack < task.values + task.stacks and 0 <= value < task.values
            assert not answer[3 * i] and not answer[3 * i + 1]
            if kind == task.push:
                assert not answer[3 * i + 2]
                stacks.setdefault(stack, []).append(value)
            else:
                assert kind == task.pop and answer[3 * i + 2]
                assert stacks[stack].pop() == value
                sample_pops += 1
        assert sample_pops >= 1
        assert (stream[3 * ops:] == task.pad).all() and not answer[3 * ops:].any()
        pops += sample_pops
    if length >= 300:  # pushes and pops are roughly balanced
        assert 0.35 < pops / (64 * ((length + 1) // 3)) < 0.5


def test_batch_format_matches_the_pretraining_loader():
    task = make_task("stack")
    train, heldout = build_synthetic_loaders(task, seq_length=32, micro_batch_size=4, global_batch_size=8,
                                             heldout_samples=8)
    batch = next(train)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (4, 32)
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["cu_seqlens"].tolist() == [0, 32, 64, 96, 128] and batch["cu_seqlens"].dtype == torch.int32
    stream, answer = SyntheticSamples(task, 32, 1234, "train")[0]
    assert batch["tokens"][0].tolist() == stream[:-1].tolist() and batch["labels"][0].tolist() == stream[1:].tolist()
    assert batch["loss_mask"][0].tolist() == answer[1:].astype(float).tolist()
    assert not torch.equal(next(heldout)["tokens"], batch["tokens"])  # another random stream


def test_samples_are_deterministic_and_independent_of_the_layout():
    task = make_task("mqar", keys=64, values=64)
    one = build_synthetic_loaders(task, seq_length=24, micro_batch_size=8, global_batch_size=8,
                                  heldout_samples=8, seed=5)[0]
    again = build_synthetic_loaders(task, seq_length=24, micro_batch_size=8, global_batch_size=8,
                                    heldout_samples=8, seed=5)[0]
    other_seed = build_synthetic_loaders(task, seq_length=24, micro_batch_size=8, global_batch_size=8,
                                         heldout_samples=8, seed=6)[0]
    ranks = [build_synthetic_loaders(task, seq_length=24, micro_batch_size=2, global_batch_size=8,
                                     heldout_samples=4, dp_rank=r, dp_size=2, seed=5)[0] for r in range(2)]
    for _ in range(3):  # global batches
        whole = next(one)["tokens"]
        assert torch.equal(whole, next(again)["tokens"])
        assert not torch.equal(whole, next(other_seed)["tokens"])
        split = torch.cat([next(rank)["tokens"] for rank in ranks for _ in range(2)])
        assert torch.equal(whole, split)


def test_loader_resumes_exactly():
    task = make_task("palindrome")
    loader = build_synthetic_loaders(task, seq_length=16, micro_batch_size=2, global_batch_size=4,
                                     heldout_samples=2)[0]
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader)["tokens"] for _ in range(4)]
    fresh = build_synthetic_loaders(task, seq_length=16, micro_batch_size=2, global_batch_size=4,
                                    heldout_samples=2)[0]
    fresh.load_state_dict(state)
    assert all(torch.equal(a, next(fresh)["tokens"]) for a in expected)
    other = build_synthetic_loaders(make_task("palindrome", symbols=8), seq_length=16, micro_batch_size=2,
                                    global_batch_size=4, heldout_samples=2)[0]
    with pytest.raises(ValueError, match="other data or settings"):
        other.load_state_dict(state)


def test_heldout_batches_are_the_heldout_loaders_samples():
    task = make_task("stack")
    _, heldout = build_synthetic_loaders(task, seq_length=20, micro_batch_size=3, global_batch_size=3,
                                         heldout_samples=9)
    from_loader = torch.cat([next(heldout)["tokens"] for _ in range(3)])
    batches = heldout_batches(task, 20, 9, batch_size=4)
    assert [len(b["tokens"]) for b in batches] == [4, 4, 1]
    assert torch.equal(torch.cat([b["tokens"] for b in batches]), from_loader)


def test_bad_settings_give_clear_errors():
    with pytest.raises(ConfigError, match="unknown task"):
        make_task("sorting")
    with pytest.raises(ConfigError, match="palindrome has no such setting"):
        make_task("palindrome", kv_pairs=3)
    with pytest.raises(ConfigError, match="expected a int"):
        make_task("stack", stacks="many")
    with pytest.raises(ConfigError, match="must be positive and at most 1"):
        make_task("stack", push_probability=1.5)
    with pytest.raises(ConfigError, match="need 4 x 10 - 1 = 39 tokens"):
        check_length(make_task("mqar", kv_pairs=10), 30)
    with pytest.raises(ConfigError, match="needs at least 5 tokens"):
        check_length(make_task("stack"), 4)
    with pytest.raises(ConfigError, match="--eval-samples 10 must be a multiple"):
        build_synthetic_loaders(make_task("stack"), seq_length=8, micro_batch_size=4, global_batch_size=4,
                                heldout_samples=10)
