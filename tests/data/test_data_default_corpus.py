"""The embedded default corpus and tokenizer: build once, reuse, round-trip real text."""

import json
import os
import shutil

import numpy as np

from data.default_corpus import (collect_default_documents, default_corpus_key,
                                 ensure_default_dataset, is_validation_document)
from data.indexed import TokenShard
from data.tokenizer import load_tokenizer


def test_tokenizer_fits_the_tiny_preset_and_loads_offline(default_dataset):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_dataset.tokenizer_dir)
    assert len(tokenizer) <= 8192 and default_dataset.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == default_dataset.eos_token_id
    assert sorted(os.listdir(default_dataset.tokenizer_dir))[:2] == ["tokenizer.json",
                                                                      "tokenizer_config.json"]


def test_round_trip_text_tokens_text(default_dataset):
    documents = collect_default_documents()
    train_texts = [t for i, (_, t) in enumerate(documents) if not is_validation_document(i)]
    shard = TokenShard(default_dataset.train_prefixes[0])
    tokenizer = load_tokenizer(default_dataset.tokenizer_dir)
    eos = default_dataset.eos_token_id
    for doc in (0, 1, shard.num_documents // 2, shard.num_documents - 1):
        ids = shard.document(doc)
        assert ids[-1] == eos and eos not in ids[:-1]  # exactly one EOS, at the end
        assert tokenizer.decode(ids[:-1].tolist()) == train_texts[doc]
    text = "Unicode ✓ — naïve café, 日本語, tabs\tand\nnewlines; <|endoftext|> stays text"
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.decode(ids) == text and eos not in ids


def test_corpus_size_and_split(default_dataset):
    stats = default_dataset.stats
    assert stats["tokens"]["train"] > 300_000 and stats["tokens"]["valid"] > 10_000
    assert stats["documents"]["valid"] > 10
    folder = os.path.dirname(default_dataset.train_prefixes[0])
    with open(os.path.join(folder, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["complete"] and manifest["shards"][0]["bin_sha256"]
    assert manifest["tokenizer"]["path"] == default_dataset.tokenizer_dir


def test_cache_is_reused_and_keyed(default_dataset, monkeypatch):
    root = default_dataset.root
    cache = os.path.dirname(root)
    stamp = os.stat(default_dataset.train_prefixes[0] + ".bin").st_mtime_ns
    again = ensure_default_dataset(cache)
    assert again.root == root and again.train_prefixes == default_dataset.train_prefixes
    assert os.stat(again.train_prefixes[0] + ".bin").st_mtime_ns == stamp  # not rebuilt
    key = default_corpus_key()
    assert default_corpus_key(vocab_size=4096) != key
    monkeypatch.setattr("data.default_corpus.BUILD_VERSION", 99)
    assert default_corpus_key() != key  # a changed recipe never reuses a stale cache


def test_damaged_cache_is_rebuilt(default_dataset, tmp_path):
    copy = tmp_path / os.path.basename(default_dataset.root)
    shutil.copytree(default_dataset.root, copy)  # a cache that moved still resolves
    moved = ensure_default_dataset(tmp_path)
    assert moved.root == str(copy) and moved.tokenizer_dir.startswith(str(copy))
    os.remove(moved.valid_prefixes[0] + ".idx")
    rebuilt = ensure_default_dataset(tmp_path)
    assert os.path.exists(rebuilt.valid_prefixes[0] + ".idx")
    np.testing.assert_array_equal(TokenShard(rebuilt.valid_prefixes[0]).tokens,
                                  TokenShard(default_dataset.valid_prefixes[0]).tokens)
