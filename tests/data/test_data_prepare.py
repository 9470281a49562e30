"""prepare_data: jsonl(.xz)/parquet/text folders -> shards; malformed records; resume; CLI."""

import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.indexed import TokenShard
from data.prepare import (MalformedRecordError, PrepareInterrupted, ResumeMismatchError,
                          prepare_corpus)
from data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1)
         for i in range(60)]


def _tokens_of(out):
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    docs = []
    for shard in manifest["shards"]:
        reader = TokenShard(Path(out) / shard["prefix"])
        docs.extend(reader.document(i).tolist() for i in range(reader.num_documents))
    return manifest, docs


def _write_jsonl(path, rows, compress=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if compress:
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


def test_jsonl_xz_with_malformed_records(tmp_path, default_dataset):
    good = _write_jsonl(tmp_path / "a.jsonl.xz", [{"text": t} for t in TEXTS[:5]], compress=True)
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "broken\n{"title": "no text"}\n'
                    b'{"text": "bad \xff byte"}\n\n{"text": 7}\n{"text": "last"}\n')
    manifest = prepare_corpus([str(good), str(bad)], tmp_path / "out",
                              default_dataset.tokenizer_dir, workers=1, progress=False)
    examples = manifest["malformed"]["examples"]
    assert manifest["malformed"]["count"] == 4
    assert examples[0].startswith(f"{bad}:2: bad JSON")
    assert examples[1].startswith(f"{bad}:3: missing field 'text'")
    assert examples[2].startswith(f"{bad}:4: not UTF-8")
    assert examples[3].startswith(f"{bad}:6: field 'text' is int")
    manifest, docs = _tokens_of(tmp_path / "out")
    assert manifest["totals"]["documents"] == 7 and len(docs) == 7
    tokenizer = load_tokenizer(default_dataset.tokenizer_dir)
    assert tokenizer.decode(docs[0][:-1]) == TEXTS[0] and docs[0][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(docs[-1][:-1]) == "last"
    with pytest.raises(MalformedRecordError, match=rf"{bad}:2: bad JSON.*--strict"):
        prepare_corpus([str(bad)], tmp_path / "strict", default_dataset.tokenizer_dir,
                       workers=1, progress=False, strict=True)


def test_parquet_arrow_and_text_folder(tmp_path, default_dataset):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": TEXTS[:10], "id": list(range(10))}),
                   tmp_path / "part.parquet")
    manifest = prepare_corpus([str(tmp_path / "part.parquet")], tmp_path / "pq",
                              default_dataset.tokenizer_dir, text_field="content", workers=1,
                              progress=False)
    assert manifest["totals"]["documents"] == 10
    tokenizer = load_tokenizer(default_dataset.tokenizer_dir)
    _, docs = _tokens_of(tmp_path / "pq")
    assert [tokenizer.decode(d[:-1]) for d in docs] == TEXTS[:10]

    import datasets

    datasets.Dataset.from_dict({"text": TEXTS[10:13]}).save_to_disk(str(tmp_path / "saved"))
    manifest = prepare_corpus([str(tmp_path / "saved")], tmp_path / "arrow",
                              default_dataset.tokenizer_dir, workers=1, progress=False)
    _, docs = _tokens_of(tmp_path / "arrow")
    assert manifest["config"]["sources"][0]["format"] == "arrow"
    assert [tokenizer.decode(d[:-1]) for d in docs] == TEXTS[10:13]

    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First book.\n\nSecond paragraph.\n")
    (folder / "sub" / "b.md").write_text("Another book.\n")
    (folder / ".hidden").write_text("skipped")
    manifest = prepare_corpus([str(folder)], tmp_path / "txt", default_dataset.tokenizer_dir,
                              workers=1, progress=False)
    _, docs = _tokens_of(tmp_path / "txt")
    assert [tokenizer.decode(d[:-1]) for d in docs] == ["First book.\n\nSecond paragraph.\n",
                                                         "Another book.\n"]
    prepare_corpus([str(folder)], tmp_path / "para", default_dataset.tokenizer_dir,
                   text_unit="paragraph", workers=1, progress=False)
    _, docs = _tokens_of(tmp_path / "para")
    assert [tokenizer.decode(d[:-1]) for d in docs] == ["First book.", "Second paragraph.",
                                                         "Another book."]


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, default_dataset):
    source = _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    common = dict(workers=1, progress=False, shard_tokens=300, batch_docs=7)
    full = prepare_corpus([str(source)], tmp_path / "full", default_dataset.tokenizer_dir,
                          **common)
    assert len(full["shards"]) >= 4
    out = tmp_path / "resumed"
    with pytest.raises(PrepareInterrupted):
        prepare_corpus([str(source)], out, default_dataset.tokenizer_dir, stop_after_shards=2,
                       **common)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    # a crash mid-shard leaves temporary files and maybe a renamed .bin without its .idx
    (out / "tokens_00002.bin.tmp").write_bytes(b"half a shard")
    (out / "tokens_00002.bin").write_bytes(b"orphan")
    resumed = prepare_corpus([str(source)], out, default_dataset.tokenizer_dir, **common)
    assert resumed["complete"]
    assert [s["bin_sha256"] for s in resumed["shards"]] == [s["bin_sha256"] for s in full["shards"]]
    assert [s["idx_sha256"] for s in resumed["shards"]] == [s["idx_sha256"] for s in full["shards"]]
    assert not list(out.glob("*.tmp"))
    # finished: a rerun is a no-op; other settings in the same folder are refused
    assert prepare_corpus([str(source)], out, default_dataset.tokenizer_dir, **common) == resumed
    with pytest.raises(ResumeMismatchError, match="text_field"):
        prepare_corpus([str(source)], out, default_dataset.tokenizer_dir, text_field="body",
                       **common)


def test_cli_parallel_workers_and_loader(tmp_path, default_dataset):
    source = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_data.py"), "--input", str(source),
         "--tokenizer", default_dataset.tokenizer_dir, "--out", str(out), "--workers", "2",
         "--shard-tokens", "500", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "60 documents" in run.stdout
    serial = prepare_corpus([str(source)], tmp_path / "serial", default_dataset.tokenizer_dir,
                            workers=1, progress=False, shard_tokens=500)
    _, parallel_docs = _tokens_of(out)
    _, serial_docs = _tokens_of(tmp_path / "serial")
    assert parallel_docs == serial_docs and len(serial["shards"]) > 1

    from data import build_pretraining_loaders

    train, _ = build_pretraining_loaders([str(out)], split=(1, 0), seq_length=64,
                                         micro_batch_size=2, global_batch_size=2, vocab_size=8192)
    batch = next(train)
    assert batch["tokens"].shape == (2, 64)
    assert int(np.max(batch["tokens"].numpy())) < 8192


def test_cli_reports_missing_input(tmp_path, default_dataset):
    run = subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_data.py"), "--input",
         str(tmp_path / "nope.jsonl"), "--tokenizer", default_dataset.tokenizer_dir, "--out",
         str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "nope.jsonl" in run.stderr and "does not exist" in run.stderr


def test_killed_cli_run_resumes_to_the_same_shards(tmp_path, default_dataset):
    """A real SIGKILL mid-run: the rerun of the same command finishes byte-identically."""
    import os
    import signal
    import time

    rng = np.random.default_rng(0)
    words = TEXTS[5].split()
    rows = [{"text": " ".join(rng.choice(words, size=300))} for _ in range(2000)]
    source = _write_jsonl(tmp_path / "big.jsonl", rows)
    reference = prepare_corpus([str(source)], tmp_path / "ref", default_dataset.tokenizer_dir,
                               workers=1, progress=False, shard_tokens=20_000)
    out = tmp_path / "killed"
    command = [sys.executable, str(REPO / "launch" / "prepare_data.py"), "--input", str(source),
               "--tokenizer", default_dataset.tokenizer_dir, "--out", str(out), "--workers", "1",
               "--shard-tokens", "20000", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_mid_run = False
    while process.poll() is None and time.time() < deadline:
        manifest_path = out / "manifest.json"
        if manifest_path.exists():
            try:
                shards = json.loads(manifest_path.read_text())["shards"]
            except ValueError:
                shards = []
            if len(shards) >= 2:
                os.kill(process.pid, signal.SIGKILL)
                killed_mid_run = True
                break
        time.sleep(0.02)
    process.wait()
    if killed_mid_run:
        assert not json.loads((out / "manifest.json").read_text())["complete"]
    # the rerun, in-process here to save a start-up (same arguments as the command line)
    resumed = prepare_corpus([str(source)], out, default_dataset.tokenizer_dir, workers=1,
                             progress=False, shard_tokens=20_000)
    assert [s["bin_sha256"] for s in resumed["shards"]] == [
        s["bin_sha256"] for s in reference["shards"]]
    assert len(reference["shards"]) > 5 and not list(out.glob("*.tmp"))
