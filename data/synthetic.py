"""The paper's synthetic tasks (Palindrome, MQAR, Stack) as seeded, random-access samples and a
loader with the pretraining loader's batch format (see docs/synthetic.md for the layouts, the
vocabulary sizes and why they were chosen).

A sample of training length ``L`` is a stream of ``L + 1`` tokens and a boolean mask of the stream
positions that hold an answer; the model reads ``stream[:-1]`` and predicts ``stream[1:]``, and the
loss (and accuracy) count only the answer tokens. Sample ``i`` of a split depends only on
``(seed, task, split, i)``, so runs, resumes and data-parallel layouts see the same samples, and the
held-out split is a separate random stream.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from data.loader import PretrainingLoader
from model.config import ConfigError


@dataclass(frozen=True)
class Palindrome:
    """``x_1 .. x_n <sep> x_n .. x_1`` with ``n = L // 2`` random symbols; answers: the reversed half.
    Token ids: symbols ``0 .. symbols-1``, then ``<sep>``, ``<pad>`` (fills one slot when L is odd)."""

    symbols: int = 64
    name = "palindrome"

    @property
    def sep(self) -> int:
        return self.symbols

    @property
    def pad(self) -> int:
        return self.symbols + 1

    @property
    def vocab_size(self) -> int:
        return self.symbols + 2

    def min_length(self) -> int:
        return 2

    def generate(self, rng: np.random.Generator, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        n = length // 2
        x = rng.integers(0, self.symbols, (count, n))
        stream = np.full((count, length + 1), self.pad, dtype=np.int64)
        stream[:, :n] = x
        stream[:, n] = self.sep
        stream[:, n + 1:2 * n + 1] = x[:, ::-1]
        answer = np.zeros((count, length + 1), dtype=bool)
        answer[:, n + 1:2 * n + 1] = True
        return stream, answer


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall: ``k_1 v_1 .. k_n v_n`` (distinct keys, distinct values), then
    every key once more in random order, each followed by its value, at random 2-token slots of the
    rest of the sequence; the gaps hold ``<pad>`` (``noise="pad"``, as Zoology's MQAR) or random tokens
    of the value range (``noise="values"``, never a key; much slower to learn: every gap token is
    written into a linear mixer's state). ``n = kv_pairs``, or ``L // 64`` when 0 (docs/synthetic.md
    says why so few: with 64 pairs at length 1024 neither linear arm left chance in 1,750 steps).
    Answers: the values after the queried keys. Token ids: keys ``0 .. keys-1``, values
    ``keys .. keys+values-1``, then ``<pad>`` (with ``noise="pad"``)."""

    keys: int = 512
    values: int = 512
    kv_pairs: int = 0
    noise: str = "pad"
    name = "mqar"

    @property
    def pad(self) -> int:
        return self.keys + self.values

    @property
    def vocab_size(self) -> int:
        return self.keys + self.values + (self.noise == "pad")

    def pairs(self, length: int) -> int:
        return self.kv_pairs or max(1, length // 64)

    def min_length(self) -> int:
        return 3  # one pair and its query; check() covers more pairs

    def check(self, length: int) -> None:
        if self.noise not in ("pad", "values"):
            raise ConfigError(f"mqar: noise={self.noise!r}: use pad or values")
        n = self.pairs(length)
        if (length + 1 - 2 * n) // 2 < n:
            raise ConfigError(
                f"mqar: {n} key-value pairs and their {n} queries need 4 x {n} - 1 = {4 * n - 1} tokens, more "
                f"than --length {length}; use fewer pairs (--task-arg kv_pairs=N) or a longer length"
            )
        if n > min(self.keys, self.values):
            raise ConfigError(f"mqar: {n} pairs need at least {n} keys and {n} values (keys={self.keys}, "
                              f"values={self.values}); raise them or lower kv_pairs")

    def generate(self, rng: np.random.Generator, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.pairs(length)
        rest = length + 1 - 2 * n
        keys = np.stack([rng.choice(self.keys, n, replace=False) for _ in range(count)])
        values = self.keys + np.stack([rng.choice(self.values, n, replace=False) for _ in range(count)])
        slots = np.sort(np.stack([rng.choice(rest // 2, n, replace=False) for _ in range(count)]), axis=1)
        order = rng.permuted(np.tile(np.arange(n), (count, 1)), axis=1)
        stream = np.empty((count, length + 1), dtype=np.int64)
        stream[:, 0:2 * n:2] = keys
        stream[:, 1:2 * n:2] = values
        if self.noise == "pad":
            stream[:, 2 * n:] = self.pad
        else:
            stream[:, 2 * n:] = self.keys + rng.integers(0, self.values, (count, rest))
        rows, where = np.arange(count)[:, None], 2 * n + 2 * slots
        stream[rows, where] = np.take_along_axis(keys, order, 1)
        stream[rows, where + 1] = np.take_along_axis(values, order, 1)
        answer = np.zeros((count, length + 1), dtype=bool)
        answer[rows, where + 1] = True
        return stream, answer


@dataclass(frozen=True)
class Stack:
    """``stacks`` independent LIFO stacks; ``(L + 1) // 3`` operations of three tokens each,
    ``<push> id X`` or ``<pop> id X`` where X of a pop is the value on top of stack ``id`` (the
    answer). Each operation picks a stack uniformly; an empty stack is pushed, any other is pushed
    with probability ``push_probability`` and popped otherwise; depth is unbounded. A sample without
    any pop gets its last operation turned into one. ``<pad>`` fills the 0-2 slots left at the end.
    Token ids: values ``0 .. values-1``, stack ids, then ``<push>``, ``<pop>``, ``<pad>``."""

    stacks: int = 64
    values: int = 64
    push_probability: float = 0.5
    name = "stack"

    @property
    def push(self) -> int:
        return self.values + self.stacks

    @property
    def pop(self) -> int:
        return self.push + 1

    @property
    def pad(self) -> int:
        return self.push + 2

    @property
    def vocab_size(self) -> int:
        return self.values + self.stacks + 3

    def min_length(self) -> int:
        return 5  # two operations: a push and a pop

    def generate(self, rng: np.random.Generator, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        ops = (length + 1) // 3
        ids = rng.integers(0, self.stacks, (count, ops))
        wants_push = rng.random((count, ops)) < self.push_probability
        values = rng.integers(0, self.values, (count, ops))  # a pop's entry is overwritten with its answer
        is_pop = np.zeros((count, ops), dtype=bool)
        # The operations on one stack of one sample run in time order; those of different stacks are
        # independent, so round j handles the j-th operation of every (sample, stack) at once.
        rank = _rank_within_group(ids)
        by_round = np.argsort(rank, axis=None, kind="stable")
        rounds = np.bincount(rank.ravel())
        depth = np.zeros((count, self.stacks), dtype=np.int64)
        contents = np.zeros((count, self.stacks, len(rounds)), dtype=np.int64)
        start = 0
        for size in rounds:
            row, op = np.divmod(by_round[start:start + size], ops)
            start += size
            stack = ids[row, op]
            d = depth[row, stack]
            push = (d == 0) | wants_push[row, op]
            r, s, o, dp = row[push], stack[push], op[push], d[push]
            contents[r, s, dp] = values[r, o]
            depth[r, s] = dp + 1
            r, s, o, dp = row[~push], stack[~push], op[~push], d[~push]
            values[r, o] = contents[r, s, dp - 1]
            depth[r, s] = dp - 1
            is_pop[r, o] = True
        # a sample without a pop: its last push never happened; pop the stack of the push before it
        none = ~is_pop.any(axis=1)
        ids[none, -1], values[none, -1], is_pop[none, -1] = ids[none, -2], values[none, -2], True
        stream = np.full((count, length + 1), self.pad, dtype=np.int64)
        body = stream[:, :3 * ops].reshape(count, ops, 3)
        body[:, :, 0] = np.where(is_pop, self.pop, self.push)
        body[:, :, 1] = self.values + ids
        body[:, :, 2] = values
        answer = np.zeros((count, length + 1), dtype=bool)
        answer[:, :3 * ops].reshape(count, ops, 3)[:, :, 2] = is_pop
        return stream, answer


def _rank_within_group(ids: np.ndarray) -> np.ndarray:
    """For each entry of each row: how many earlier entries of that row have the same value."""
    order = np.argsort(ids, axis=1, kind="stable")
    grouped = np.take_along_axis(ids, order, 1)
    position = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    first = np.ones(ids.shape, dtype=bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    rank_sorted = position - np.maximum.accumulate(np.where(first, position, 0), axis=1)
    rank = np.empty_like(rank_sorted)
    np.put_along_axis(rank, order, rank_sorted, 1)
    return rank


TASKS = {"palindrome": Palindrome, "mqar": MQAR, "stack": Stack}


def make_task(name: str, **params):
    """A task by name; ``params`` override its fields (e.g. ``symbols=16``), values given as text are
    converted to the field's type."""
    if name not in TASKS:
        raise ConfigError(f"--task {name!r}: unknown task; choose one of {sorted(TASKS)}")
    cls = TASKS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in params.items():
        if key not in fields:
            raise ConfigError(f"--task-arg {key}: {name} has no such setting; known: {sorted(fields)}")
        kind = type(fields[key].default)
        try:
            values[key] = kind(value)
        except ValueError:
            raise ConfigError(f"--task-arg {key}={value!r}: expected a {kind.__name__}") from None
    task = cls(**values)
    for key in fields:
        value = getattr(task, key)
        if isinstance(value, str):
            continue  # checked by the task (check_length)
        if value < 0 or (key != "kv_pairs" and value == 0) or (key == "push_probability" and value > 1):
            raise ConfigError(f"--task-arg {key}={value}: must be positive"
                              + (" and at most 1" if key == "push_probability" else ""))
    return task


def describe(task) -> dict:
    """The task's name, settings and vocabulary size (stored with a run, shown in reports)."""
    return {"name": task.name, **dataclasses.asdict(task), "vocab_size": task.vocab_size}


def check_length(task, length: int) -> None:
    if length < task.min_length():
        raise ConfigError(f"--length {length}: {task.name} needs at least {task.min_length()} tokens")
    if hasattr(task, "check"):
        task.check(length)


class SyntheticSamples:
    """Sample ``i`` of one split: ``(stream [L+1], answer mask [L+1])``. Samples are made in blocks
    of ``BLOCK`` (vectorised), block ``b`` from a generator seeded by (seed, task, split, b) alone,
    so a sample never depends on the batch size or the data-parallel layout that asks for it."""

    BLOCK = 64

    def __init__(self, task, seq_length: int, seed: int, split: str):
        check_length(task, seq_length)
        self.task, self.seq_length, self.seed, self.split = task, seq_length, seed, split
        self._salt = [zlib.crc32(task.name.encode()), zlib.crc32(split.encode())]
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self._blocks:
            rng = np.random.default_rng([self.seed, *self._salt, index])
            self._blocks[index] = self.task.generate(rng, self.BLOCK, self.seq_length)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[index]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        block, row = divmod(int(index), self.BLOCK)
        streams, answers = self.block(block)
        return streams[row], answers[row]

    def fingerprint(self) -> dict:
        return {"task": describe(self.task), "split": self.split, "seq_length": self.seq_length,
                "seed": self.seed, "block": self.BLOCK}


def collate_answers(samples: list[tuple[np.ndarray, np.ndarray]], seq_length: int) -> dict:
    """The pretraining batch format; every sample is one document, the loss mask marks the answers."""
    streams = np.stack([stream for stream, _ in samples])
    answers = np.stack([answer for _, answer in samples])
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(streams[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(streams[:, 1:])),
        "loss_mask": torch.from_numpy(answers[:, 1:].astype(np.float32)),
        "cu_seqlens": torch.arange(0, (len(samples) + 1) * seq_length, seq_length, dtype=torch.int32),
    }


class SyntheticLoader(PretrainingLoader):
    """The pretraining loader's order, resume and data-parallel split over synthetic samples."""

    def collate(self, samples: list) -> dict:
        return collate_answers(samples, self.seq_length)


def build_synthetic_loaders(task, *, seq_length: int, micro_batch_size: int, global_batch_size: int,
                            heldout_samples: int, dp_rank: int = 0, dp_size: int = 1,
                            seed: int = 1234) -> tuple[SyntheticLoader, SyntheticLoader]:
    """Train loader (split "train") and the held-out loader (split "heldout"): its first
    ``heldout_samples`` samples, as micro-batches of ``micro_batch_size`` per rank, from ``.reset()``."""
    per_step = micro_batch_size * dp_size
    if heldout_samples % per_step:
        raise ConfigError(f"--eval-samples {heldout_samples} must be a multiple of micro-batch size x data-parallel "
                          f"size = {per_step}")
    common = dict(seq_length=seq_length, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    train = SyntheticLoader(SyntheticSamples(task, seq_length, seed, "train"), global_batch_size=global_batch_size,
                            **common)
    heldout = SyntheticLoader(SyntheticSamples(task, seq_length, seed, "heldout"), global_batch_size=per_step,
                              **common)
    return train, heldout


def heldout_batches(task, seq_length: int, num_samples: int, batch_size: int, seed: int = 1234) -> list[dict]:
    """The first ``num_samples`` held-out samples (the same as the held-out loader's) in batches."""
    samples = SyntheticSamples(task, seq_length, seed, "heldout")
    return [collate_answers([samples[i] for i in range(start, min(start + batch_size, num_samples))], seq_length)
            for start in range(0, num_samples, batch_size)]
