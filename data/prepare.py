"""Corpus preparation: raw records -> tokens (parallel workers) -> sharded .bin/.idx + manifest.

Layout of an output folder (a "prepared corpus"; pass the folder itself as a data prefix):

    out/manifest.json        sources, tokenizer, config, per-shard counts and sha256, malformed log
    out/tokens_00000.bin/.idx  shard 0 (Megatron indexed format, one document per sequence)
    out/tokens_00001.bin/.idx  ...

Resumability: records are read in a fixed order and a shard closes right after the document that
makes it reach `shard_tokens`, so shard contents depend only on the input. Each finished shard is
written under temporary names, renamed into place, and only then recorded in the manifest together
with the index of the first record it did not consume. A rerun with the same arguments checks the
recorded shards, deletes leftovers (temporary files, shards the manifest does not list), skips the
records already consumed (reading them, not tokenizing them) and continues. The result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from data.indexed import (AtomicShardWriter, bin_path, idx_path, megatron_indexed_dataset,
                          token_dtype_for_vocab)
from data.readers import Record, describe_sources, expand_inputs, iter_records
from data.tokenizer import BatchEncoder, eos_token_id, load_tokenizer, tokenizer_summary

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "kimi-linear-prepared-corpus/1"
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens: 512 MB uint16 shards
MAX_REPORTED_MALFORMED = 20  # printed; the manifest keeps up to 100 examples


class MalformedRecordError(ValueError):
    """A malformed input record under --strict."""


class PrepareInterrupted(RuntimeError):
    """Raised by `stop_after_shards` (tests and chunked runs): the run stopped cleanly."""


class ResumeMismatchError(ValueError):
    """The output folder holds a run with other inputs/tokenizer/config."""


class EmptyCorpusError(ValueError):
    """The inputs gave no document at all; nothing is marked complete."""


def _why_empty(records: int, malformed: _MalformedLog, sources: list[dict], text_field: str) -> str:
    names = ", ".join(str(s.get("location")) for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
    if records == 0:
        return f"no documents written: the inputs ({names}) hold no records (empty files?)"
    reasons = ", ".join(f"{count} {reason}" for reason, count in malformed.by_reason.most_common())
    hints = []
    if any(r.startswith(("missing field", "not a JSON object")) for r in malformed.by_reason):
        hints.append(f"give the field that holds the text with --text-field (now {text_field!r})")
    if any(r.startswith(("not UTF-8", "bad JSON")) for r in malformed.by_reason):
        hints.append("check that the inputs are UTF-8 text or JSON lines, not binary files")
    example = f"; first: {malformed.examples[0]}" if malformed.examples else ""
    return (f"no documents written: all {records} records of {names} were malformed ({reasons}{example})"
            + (f"; {' and '.join(hints)}" if hints else ""))


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    """Atomic (temp + rename) so a crash never leaves half a manifest."""
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)


# --- worker side -------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, trust_remote_code: bool, eos_id: int, dtype: str,
                 in_pool: bool = True) -> None:
    if in_pool:  # parallelism comes from the processes; in-process, the Rust threads provide it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(encoder=BatchEncoder(tokenizer_dir, trust_remote_code), eos=eos_id,
                   dtype=np.dtype(dtype))


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text with EOS appended (every document ends with exactly one EOS)."""
    out = []
    for ids in _WORKER["encoder"].encode(texts):
        array = np.empty(len(ids) + 1, dtype=_WORKER["dtype"])
        array[:-1] = ids
        array[-1] = _WORKER["eos"]
        out.append(array)
    return out


# --- main side ---------------------------------------------------------------------------------
class _MalformedLog:
    def __init__(self, strict: bool, echo: bool):
        self.strict, self.echo = strict, echo
        self.count = 0
        self.by_reason: Counter = Counter()
        self.examples: list[str] = []

    def add(self, record: Record) -> None:
        message = f"{record.where}: {record.error}"
        if self.strict:
            raise MalformedRecordError(
                f"malformed record {message} (--strict: fix or remove the record, or drop "
                "--strict to skip malformed records and count them in the manifest)"
            )
        self.count += 1
        self.by_reason[record.error.split(":")[0].split(" (")[0]] += 1
        if len(self.examples) < 100:
            self.examples.append(message)
        if self.echo and self.count <= MAX_REPORTED_MALFORMED:
            print(f"skipped malformed record {message}", file=sys.stderr)

    def summary(self) -> dict:
        return {"count": self.count, "by_reason": dict(self.by_reason), "examples": self.examples}


def _batches(records: Iterator[tuple[int, Record]], batch_docs: int, batch_chars: int):
    texts: list[str] = []
    indices: list[int] = []
    chars = 0
    for index, record in records:
        texts.append(record.text)
        indices.append(index)
        chars += len(record.text)
        if len(texts) >= batch_docs or chars >= batch_chars:
            yield texts, indices
            texts, indices, chars = [], [], 0
    if texts:
        yield texts, indices


def _check_resume(out: Path, manifest: dict, config: dict) -> list[dict]:
    """Completed shards that are still intact; raises when the folder belongs to another run."""
    if manifest.get("config") != config:
        old = manifest.get("config", {})
        differing = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise ResumeMismatchError(
            f"{out} already holds a prepared corpus made with different settings "
            f"({', '.join(differing)} differ); choose a new --out folder, or delete {out} to "
            "start over (inputs that changed on disk also count as different)."
        )
    intact = []
    for shard in manifest.get("shards", []):
        prefix = out / shard["prefix"]
        if (bin_path(prefix).exists() and idx_path(prefix).exists()
                and bin_path(prefix).stat().st_size == shard["bin_bytes"]
                and idx_path(prefix).stat().st_size == shard["idx_bytes"]):
            intact.append(shard)
        else:
            break  # this shard and all later ones are rebuilt
    return intact


def _remove_leftovers(out: Path, name: str, keep: set[str]) -> None:
    for path in out.glob(f"{name}_*"):
        stem = path.name.split(".")[0]
        if path.name.endswith(".tmp") or stem not in keep:
            path.unlink()


def tokenize_to_shards(
    records: Iterable[Record],
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    sources: list[dict],
    *,
    text_field: str = "text",
    text_unit: str = "document",
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    name: str = "tokens",
    strict: bool = False,
    eos_token: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    batch_docs: int = 256,
    batch_chars: int = 1 << 22,
    stop_after_shards: int | None = None,
) -> dict:
    """Tokenize `records` into shards under `out_dir`, resuming a previous run there. Returns the
    manifest (also written to out_dir/manifest.json)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    eos_id = eos_token_id(tokenizer, eos_token)
    tokenizer_info = tokenizer_summary(tokenizer_dir, tokenizer, eos_id)
    dtype = np.dtype(token_dtype_for_vocab(tokenizer_info["vocab_size"]))
    config = {
        "sources": sources, "text_field": text_field, "text_unit": text_unit,
        "tokenizer_sha256": tokenizer_info["sha256"], "eos_token_id": eos_id,
        "dtype": dtype.name, "shard_tokens": int(shard_tokens), "name": name,
    }
    manifest = read_manifest(out)
    shards = _check_resume(out, manifest, config) if manifest else []
    if manifest and manifest.get("complete") and len(shards) == len(manifest["shards"]):
        return manifest
    _remove_leftovers(out, name, {s["prefix"] for s in shards})
    skip = shards[-1]["records_end"] if shards else 0
    manifest = {"format": MANIFEST_FORMAT, "config": config, "tokenizer": tokenizer_info,
                "shards": shards, "complete": False}
    write_manifest(out, manifest)

    malformed = _MalformedLog(strict, echo=progress)
    counter = {"records": 0}

    def good_records() -> Iterator[tuple[int, Record]]:
        for index, record in enumerate(records):
            counter["records"] = index + 1
            if record.error is not None or record.text is None:
                malformed.add(record)
            elif index >= skip:
                yield index, record

    megatron_indexed_dataset()  # import before the progress bar starts (a few seconds)
    workers = (os.cpu_count() or 1) if workers is None else workers
    pool = None
    if workers > 1:
        # spawn: workers import only data.prepare (numpy, tokenizers), never the parent's state
        pool = multiprocessing.get_context("spawn").Pool(
            workers, _init_worker, (str(tokenizer_dir), trust_remote_code, eos_id, dtype.name))
    else:
        _init_worker(str(tokenizer_dir), trust_remote_code, eos_id, dtype.name, in_pool=False)

    bar = tqdm(desc=f"tokenize {out.name}", unit="doc", disable=not progress, dynamic_ncols=True)
    writer: AtomicShardWriter | None = None
    session_tokens = 0
    try:
        pending: deque = deque()
        batch_iter = _batches(good_records(), batch_docs, batch_chars)
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * max(workers, 1):
                batch = next(batch_iter, None)
                if batch is None:
                    exhausted = True
                    break
                texts, indices = batch
                work = pool.apply_async(_encode_batch, (texts,)) if pool else _encode_batch(texts)
                pending.append((work, indices))
            if not pending:
                break
            work, indices = pending.popleft()
            arrays = work.get() if pool else work
            for index, array in zip(indices, arrays):
                if writer is None:
                    writer = AtomicShardWriter(out / f"{name}_{len(shards):05d}", dtype)
                    shard_start = index
                writer.add_document(array)
                session_tokens += array.size
                if writer.tokens >= shard_tokens:
                    shards.append({**writer.commit(), "records_start": shard_start,
                                   "records_end": index + 1})
                    writer = None
                    write_manifest(out, manifest)
                    if stop_after_shards is not None and len(shards) >= stop_after_shards:
                        raise PrepareInterrupted(f"stopped after {len(shards)} shards")
            bar.update(len(arrays))
            bar.set_postfix(tokens=f"{session_tokens:,}", shards=len(shards), bad=malformed.count)
        if writer is not None:
            shards.append({**writer.commit(), "records_start": shard_start,
                           "records_end": counter["records"]})
            writer = None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()
            pool.join()

    if not shards:
        raise EmptyCorpusError(_why_empty(counter["records"], malformed, sources, text_field))
    elapsed = time.perf_counter() - started
    manifest.update(
        complete=True,
        totals={
            "records": counter["records"],
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "max_token_id": max((s["max_token_id"] for s in shards), default=-1),
        },
        malformed=malformed.summary(),
        last_session={"seconds": round(elapsed, 3), "tokens": int(session_tokens),
                      "tokens_per_second": round(session_tokens / max(elapsed, 1e-9)),
                      "workers": workers},
    )
    write_manifest(out, manifest)
    if progress and malformed.count:
        print(f"{malformed.count} malformed records skipped ({dict(malformed.by_reason)}); "
              f"see {out / MANIFEST_NAME}", file=sys.stderr)
    return manifest


def prepare_corpus(
    inputs: list[str],
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    text_unit: str = "document",
    input_format: str | None = None,
    hub_split: str = "train",
    **kwargs,
) -> dict:
    """Prepare files/folders/globs/hub names into `out_dir` (see `tokenize_to_shards`)."""
    sources = expand_inputs(list(inputs), input_format)
    records = iter_records(sources, text_field=text_field, text_unit=text_unit, hub_split=hub_split)
    return tokenize_to_shards(records, out_dir, tokenizer_dir, describe_sources(sources),
                              text_field=text_field, text_unit=text_unit, **kwargs)


def shard_prefixes(folder: str | os.PathLike) -> list[str]:
    """The shard prefixes of a prepared folder, refusing an unfinished preparation."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} has no {MANIFEST_NAME}: not a prepared corpus folder "
                                "(run launch/prepare_data.py --out there, or pass shard prefixes)")
    if not manifest.get("complete"):
        raise ValueError(f"{folder} is an unfinished preparation (manifest says complete=false): "
                         "re-run the same launch/prepare_data.py command to finish it")
    return [str(Path(folder) / shard["prefix"]) for shard in manifest["shards"]]
