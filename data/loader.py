"""The pretraining loader: micro-batches of packed samples for one data-parallel rank, resumable.

Order: global batch g is samples [g*G, (g+1)*G) of the (blended, shuffled) sample sequence; DP rank
r of n takes [g*G + r*G/n, g*G + (r+1)*G/n) as G/(n*b) micro-batches of b samples. The union over
ranks and micro-batches is the same for every n, so changing the DP size changes who computes a
sample, never which samples a step sees.

Position (`state_dict`) is (global batch, micro-batch), plain ints plus a fingerprint of the data
and settings; loading it reproduces exactly the batches an uninterrupted run would have produced.
At a step boundary (micro_batch == 0) the DP size and micro-batch size may change on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data.blending import BlendedSamples
from data.packing import DocumentCorpus, PackedSamples, recorded_tokenizers
from data.tokenizer import check_vocab_fits, load_tokenizer, tokenizer_fingerprint, tokenizer_vocab_size

STATE_VERSION = 1


def collate(samples: list[tuple[np.ndarray, list[int]]], seq_length: int,
            reset_at_document_boundaries: bool, mask_cross_document_loss: bool) -> dict:
    """Stack samples into a micro-batch; cu_seqlens from the document ends of each sample."""
    spans = np.stack([span for span, _ in samples])
    loss_mask = np.ones((len(samples), seq_length), dtype=np.float32)
    cu_seqlens = [0]
    for i, (_, ends) in enumerate(samples):
        if mask_cross_document_loss:  # no loss for predicting a document's first token
            for end in ends:
                if 1 <= end <= seq_length:
                    loss_mask[i, end - 1] = 0.0
        if reset_at_document_boundaries:
            # a document ending at span offset e (its EOS is input e-1) makes input e a start
            cu_seqlens.extend(i * seq_length + e for e in ends if 0 < e < seq_length)
        cu_seqlens.append((i + 1) * seq_length)
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(spans[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(spans[:, 1:])),
        "loss_mask": torch.from_numpy(loss_mask),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
    }


class PretrainingLoader:
    """Endless iterator of micro-batches for one DP rank; see the module docstring."""

    def __init__(self, samples: BlendedSamples, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 reset_at_document_boundaries: bool = True, mask_cross_document_loss: bool = False):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"micro_batch_size * dp_size = {micro_batch_size} * {dp_size}: change one of them"
            )
        self.samples = samples
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.reset_at_document_boundaries = reset_at_document_boundaries
        self.mask_cross_document_loss = mask_cross_document_loss
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
        self.global_batch = 0
        self.micro_batch = 0

    def __iter__(self) -> "PretrainingLoader":
        return self

    def sample_indices(self, global_batch: int, micro_batch: int) -> range:
        """Indices (in the sample sequence) of one micro-batch of this rank."""
        per_rank = self.global_batch_size // self.dp_size
        start = (global_batch * self.global_batch_size + self.dp_rank * per_rank
                 + micro_batch * self.micro_batch_size)
        return range(start, start + self.micro_batch_size)

    def collate(self, samples: list) -> dict:
        """One micro-batch from its samples (a subclass with other samples overrides this)."""
        return collate(samples, self.seq_length, self.reset_at_document_boundaries,
                       self.mask_cross_document_loss)

    def __next__(self) -> dict:
        indices = self.sample_indices(self.global_batch, self.micro_batch)
        batch = self.collate([self.samples[i] for i in indices])
        self.micro_batch += 1
        if self.micro_batch == self.num_micro_batches:
            self.micro_batch = 0
            self.global_batch += 1
        return batch

    def reset(self) -> None:
        """Back to the first batch (e.g. to evaluate on the same validation batches each time)."""
        self.global_batch = self.micro_batch = 0

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks together (Megatron's counter), at step granularity."""
        return self.global_batch * self.global_batch_size

    def source_shares(self) -> dict[str, float]:
        """Share of the samples consumed so far (all DP ranks, whole steps) that each blended
        source gave, as ``{"data/source{i}_share": share}`` in the order of the blend; empty for a
        single source (or samples that are not a blend)."""
        if not isinstance(self.samples, BlendedSamples) or len(self.samples.sources) < 2 or not self.consumed_samples:
            return {}
        counts = self.samples.counts(self.consumed_samples)
        return {f"data/source{i}_share": float(c) / self.consumed_samples for i, c in enumerate(counts)}

    def _fingerprint(self) -> str:
        settings = {"data": self.samples.fingerprint(), "seq_length": self.seq_length,
                    "global_batch_size": self.global_batch_size,
                    "reset": self.reset_at_document_boundaries,
                    "mask_cross_document_loss": self.mask_cross_document_loss}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "global_batch": self.global_batch,
            "micro_batch": self.micro_batch, "consumed_samples": self.consumed_samples,
            "seq_length": self.seq_length, "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size,
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at the saved position. strict=False accepts other data/settings (a deliberate
        change of data mix mid-run) and only restores the position."""
        for key in ("seq_length", "global_batch_size"):
            if state[key] != getattr(self, key) and strict:
                raise ValueError(
                    f"loader checkpoint has {key}={state[key]} but this run uses "
                    f"{getattr(self, key)}: resume with the same value, or pass strict=False to "
                    "keep only the position (the sample order then differs from the saved run)"
                )
        if strict and state["fingerprint"] != self._fingerprint():
            raise ValueError(
                "loader checkpoint was made with other data or settings (corpora, weights, split, "
                "seed, seq_length, document reset): resume with the same data, or pass "
                "strict=False to keep only the position"
            )
        same_layout = (state["dp_size"] == self.dp_size
                       and state["micro_batch_size"] == self.micro_batch_size)
        if state["micro_batch"] and not same_layout:
            raise ValueError(
                f"loader checkpoint stopped inside global batch {state['global_batch']} "
                f"(micro-batch {state['micro_batch']}) with dp_size={state['dp_size']}, "
                f"micro_batch_size={state['micro_batch_size']}; only a step-boundary checkpoint "
                "can resume with a different dp_size or micro_batch_size"
            )
        self.global_batch = int(state["global_batch"])
        self.micro_batch = int(state["micro_batch"])


def _packed(corpus: DocumentCorpus, doc_ids, seq_length: int, seed: int, stream: str):
    return PackedSamples(corpus, doc_ids, seq_length, seed, stream)


def _check_vocab(corpora: Sequence[DocumentCorpus], vocab_size: int | None,
                 tokenizer_dir: str | None) -> None:
    if vocab_size is None:
        return
    if tokenizer_dir is not None:
        check_vocab_fits(tokenizer_vocab_size(load_tokenizer(tokenizer_dir)), vocab_size,
                         f"the tokenizer in {tokenizer_dir}")
    for corpus in corpora:
        for prefix, size in corpus.tokenizer_vocab_sizes().items():
            check_vocab_fits(size, vocab_size, f"the tokenizer that prepared {prefix}")
        largest = corpus.max_token_id()
        if largest >= vocab_size:
            raise ValueError(
                f"data {corpus.name} contains token id {largest} but the model's vocab_size is "
                f"{vocab_size}: the data was tokenized with a larger vocabulary; raise vocab_size "
                f"to at least {largest + 1} or prepare the data with a tokenizer that fits"
            )


def tokenizer_of_data(prefixes: Sequence[str], tokenizer_dir: str = "") -> str:
    """The tokenizer folder of a run: ``tokenizer_dir`` when given (it must be the one the data's
    manifests record, compared by content), else the one the manifests record where it still
    exists, else "" (raw .bin/.idx files record none). Raises ValueError when the data's sources
    were prepared with different tokenizers or ``tokenizer_dir`` is not theirs."""
    records = recorded_tokenizers(list(prefixes)) if prefixes else {}
    by_hash = {record["sha256"]: record["path"] for record in records.values()}
    if len(by_hash) > 1:
        raise ValueError(
            f"the data was prepared with {len(by_hash)} different tokenizers ({sorted(by_hash.values())}); "
            "token ids of different tokenizers cannot be mixed: prepare every source with one tokenizer"
        )
    if tokenizer_dir:
        if not Path(tokenizer_dir).is_dir():
            raise ValueError(f"train.tokenizer_dir={tokenizer_dir} does not exist: pass the Hugging Face "
                             "tokenizer folder the data was prepared with")
        if by_hash and tokenizer_fingerprint(tokenizer_dir) not in by_hash:
            raise ValueError(
                f"train.tokenizer_dir={tokenizer_dir} is not the tokenizer that prepared the data "
                f"({next(iter(by_hash.values()))}, per its manifest): pass that folder, or leave "
                "--tokenizer-dir out to use it"
            )
        return str(Path(tokenizer_dir).resolve())
    path = next(iter(by_hash.values()), "")
    return path if path and Path(path).is_dir() else ""


DEFAULT_SPLIT = (0.98, 0.02)


def _corpora(data_prefixes, blend) -> tuple[list[float], list[DocumentCorpus]]:
    """(weights, corpora) of ``data_prefixes`` (one pooled corpus) or ``blend``."""
    if (data_prefixes is None) == (blend is None):
        raise ValueError("pass exactly one of data_prefixes=[...] or blend=[(weight, prefix), ...]")
    if blend is None:
        blend = [(1.0, data_prefixes)]
    weights = [float(w) for w, _ in blend]
    return weights, [DocumentCorpus(list(p) if not isinstance(p, str) else p) for _, p in blend]


def validation_documents(
    data_prefixes: Sequence[str] | str | None = None,
    *,
    blend: Sequence[tuple[float, str | Sequence[str]]] | None = None,
    valid_prefixes: Sequence[str] | str | None = None,
    split: tuple[float, float] = DEFAULT_SPLIT,
    vocab_size: int | None = None,
    tokenizer_dir: str | None = None,
) -> list[tuple[DocumentCorpus, np.ndarray]]:
    """The documents the validation loader of ``build_pretraining_loaders`` (same arguments) reads,
    as [(corpus, document ids)]: every document of ``valid_prefixes``, else the validation split
    of each training corpus ([] when ``split[1] == 0``). Checked against ``vocab_size`` alike."""
    if valid_prefixes is not None:
        corpus = DocumentCorpus(valid_prefixes)
        _check_vocab([corpus], vocab_size, tokenizer_dir)
        return [(corpus, np.arange(corpus.num_documents))]
    _, corpora = _corpora(data_prefixes, blend)
    _check_vocab(corpora, vocab_size, tokenizer_dir)
    return [(corpus, corpus.split_documents(split)[1]) for corpus in corpora] if split[1] > 0 else []


def build_pretraining_loaders(
    data_prefixes: Sequence[str] | str | None = None,
    *,
    blend: Sequence[tuple[float, str | Sequence[str]]] | None = None,
    valid_prefixes: Sequence[str] | str | None = None,
    split: tuple[float, float] = DEFAULT_SPLIT,
    seq_length: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 1234,
    reset_at_document_boundaries: bool = True,
    vocab_size: int | None = None,
    tokenizer_dir: str | None = None,
    mask_cross_document_loss: bool = False,
) -> tuple[PretrainingLoader, PretrainingLoader | None]:
    """Train and validation loaders over prepared token files (see data/__init__.py).

    data_prefixes: prefixes/folders pooled into one corpus. blend: [(weight, prefix or list of
    prefixes)], separate corpora mixed by weight. valid_prefixes: a separate validation corpus;
    without it each corpus is split by `split` (contiguous documents; split[1] == 0: no valid
    loader). vocab_size: the model's; checked against the tokenizer(s) that made the data and the
    largest token id in it. The validation loader has the same batch layout; call .reset() before
    each evaluation to see the same batches.
    """
    weights, corpora = _corpora(data_prefixes, blend)
    valid_corpus = DocumentCorpus(valid_prefixes) if valid_prefixes is not None else None
    _check_vocab(corpora + ([valid_corpus] if valid_corpus else []), vocab_size, tokenizer_dir)

    train_sources, valid_sources = [], []
    for i, corpus in enumerate(corpora):
        if valid_corpus is None and split[1] > 0:
            train_ids, valid_ids = corpus.split_documents(split)
            valid_sources.append(_packed(corpus, valid_ids, seq_length, seed, f"corpus{i}/valid"))
        else:
            train_ids = np.arange(corpus.num_documents)
        train_sources.append(_packed(corpus, train_ids, seq_length, seed, f"corpus{i}/train"))

    common = dict(seq_length=seq_length, micro_batch_size=micro_batch_size,
                  global_batch_size=global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                  reset_at_document_boundaries=reset_at_document_boundaries,
                  mask_cross_document_loss=mask_cross_document_loss)
    train = PretrainingLoader(BlendedSamples(train_sources, weights), **common)
    valid = None
    if valid_corpus is not None:
        source = _packed(valid_corpus, np.arange(valid_corpus.num_documents), seq_length, seed,
                         "valid")
        valid = PretrainingLoader(BlendedSamples([source], [1.0]), **common)
    elif valid_sources:
        valid = PretrainingLoader(BlendedSamples(valid_sources, weights), **common)
    return train, valid
