"""Data pipeline: tokenizer, corpus preparation, packed pretraining loaders.

Interface used by the training loop::

    from data import build_pretraining_loaders, ensure_default_dataset, cp_slice

    paths = ensure_default_dataset(cache_dir)   # DefaultDataset: .tokenizer_dir, .train_prefixes,
                                                # .valid_prefixes, .vocab_size, .eos_token_id
    train_loader, valid_loader = build_pretraining_loaders(
        data_prefixes=paths.train_prefixes,      # or blend=[(weight, prefix), ...]
        valid_prefixes=paths.valid_prefixes,     # None: split each corpus by `split`
        seq_length=S, micro_batch_size=b, global_batch_size=G, dp_rank=r, dp_size=n,
        seed=1234, reset_at_document_boundaries=True, vocab_size=V)
    batch = next(train_loader)                   # one micro-batch for this DP rank
    # batch["tokens"]  int64 [b, S]   inputs  (stream tokens[:-1] of each sample)
    # batch["labels"]  int64 [b, S]   targets (stream tokens[1:])
    # batch["loss_mask"] float32 [b, S]
    # batch["cu_seqlens"] int32 [N+1] document starts over the flattened b*S stream: sample i's
    #     boundaries offset by i*S, every sample start is a boundary, the last entry is b*S
    state = train_loader.state_dict(); train_loader.load_state_dict(state)   # exact resume
    local = cp_slice(batch, cp_rank, cp_size)    # this CP rank's contiguous slice of each sample

A prefix is a Megatron .bin/.idx prefix or a folder made by launch/prepare_data.py (all its
shards). `data_prefixes` are pooled into one corpus; `blend` entries are separate corpora mixed by
weight. Order of samples: global batch g holds samples [g*G, (g+1)*G) of a seeded shuffled sample
sequence; DP rank r takes [g*G + r*G/n, g*G + (r+1)*G/n) in G/(n*b) micro-batches, so the union
over ranks does not depend on n. See docs/data.md.

Names are imported lazily so that `import data.prepare` (tokenizer worker processes) stays light.
"""

from importlib import import_module

_EXPORTS = {
    "build_pretraining_loaders": "data.loader",
    "PretrainingLoader": "data.loader",
    "tokenizer_of_data": "data.loader",
    "validation_documents": "data.loader",
    "DocumentWindows": "data.evaluation",
    "EvaluationLoader": "data.evaluation",
    "cp_slice": "data.context_parallel",
    "ensure_default_dataset": "data.default_corpus",
    "build_default_dataset": "data.default_corpus",
    "DefaultDataset": "data.default_corpus",
    "prepare_corpus": "data.prepare",
    "load_tokenizer": "data.tokenizer",
    "train_byte_level_bpe": "data.tokenizer",
    "CorruptIndexedFileError": "data.indexed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
