"""Raw corpus readers: one stream of (source, line, text | error) records from many inputs.

Formats: jsonl/json (optionally .xz/.gz/.bz2), plain text files or folders, parquet, arrow, and
Hugging Face hub dataset names (when a hub is reachable). Parquet, arrow and hub datasets are read
with `datasets` in streaming mode (no arrow cache is written). JSON lines and text use our own
line readers because `datasets` cannot say which line of which file is broken; every malformed
record (bad JSON, missing or non-string field, non-UTF-8 bytes, empty text) is yielded as an
error record carrying its file and line, so the caller can count, report or refuse it.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

COMPRESSIONS = {".xz": lzma.open, ".lzma": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
TEXT_UNITS = ("document", "paragraph", "line")


@dataclass(frozen=True)
class InputSource:
    location: str  # a file path or a hub dataset name
    format: str  # "json", "text", "parquet", "arrow" or "hub"


@dataclass(frozen=True)
class Record:
    source: str
    line: int  # 1-based line (json, text) or row (parquet, arrow, hub); 0 = whole file
    text: str | None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _suffixes(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix) of e.g. train.jsonl.xz -> (.jsonl, .xz)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    if compression:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compression


def detect_format(path: Path) -> str:
    suffix, _ = _suffixes(path)
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    return "text"


def _looks_like_hub_name(item: str) -> bool:
    """owner/name without a file suffix (a missing local file like data/x.jsonl is not one)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", item)) and not Path(item).suffix


def expand_inputs(inputs: list[str], input_format: str | None = None) -> list[InputSource]:
    """Files, folders (recursively, sorted, hidden files skipped), globs, or hub names."""
    sources: list[InputSource] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if (path / "state.json").exists() and any(f.suffix == ".arrow" for f in files):
                files = [f for f in files if f.suffix == ".arrow"]  # a Dataset.save_to_disk folder
        elif path.is_file():
            files = [path]
        elif any(ch in item for ch in "*?["):
            files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not files:
                raise FileNotFoundError(f"input pattern {item!r} matches no files")
        elif input_format == "hub" or (input_format is None and _looks_like_hub_name(item)):
            sources.append(InputSource(item, "hub"))
            continue
        else:
            raise FileNotFoundError(
                f"input {item!r} does not exist (expected a file, a folder, a glob such as "
                "'corpus/*.jsonl.xz', or a hub dataset name like 'owner/name')"
            )
        if not files:
            raise FileNotFoundError(f"input folder {item!r} contains no files")
        sources.extend(InputSource(str(f), input_format or detect_format(f)) for f in files)
    return sources


def _open_binary(path: Path):
    _, compression = _suffixes(path)
    return COMPRESSIONS[compression](path, "rb") if compression else open(path, "rb")


def _text_of(obj, field: str) -> tuple[str | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"not a JSON object ({type(obj).__name__})"
    if field not in obj:
        return None, f"missing field {field!r} (fields: {', '.join(sorted(map(str, obj))[:8])})"
    value = obj[field]
    if not isinstance(value, str):
        return None, f"field {field!r} is {type(value).__name__}, not a string"
    if not value.strip():
        return None, f"field {field!r} is empty"
    return value, None


def read_json(path: Path, text_field: str) -> Iterator[Record]:
    """JSON lines (or one JSON array) with the record's line number for every error."""
    source = str(path)
    with _open_binary(path) as handle:
        head = handle.read(4096)
        if head.lstrip()[:1] == b"[":  # a JSON array, not lines: parse whole, number by element
            try:
                array = json.loads((head + handle.read()).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                yield Record(source, 1, None, f"bad JSON array: {error}")
                return
            for number, obj in enumerate(array, start=1):
                text, error = _text_of(obj, text_field)
                yield Record(source, number, text, error)
            return
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield Record(source, number, None, f"not UTF-8 (byte {error.start} of the line)")
                continue
            try:
                obj = json.loads(line)
            except ValueError as error:
                yield Record(source, number, None, f"bad JSON: {error.msg} (column {error.colno})")
                continue
            text, problem = _text_of(obj, text_field)
            yield Record(source, number, text, problem)


def read_text(path: Path, unit: str) -> Iterator[Record]:
    """A text file as one document, one document per paragraph, or one per line."""
    source = str(path)
    with _open_binary(path) as handle:
        data = handle.read()
    if unit == "document":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            yield Record(source, line, None, f"not UTF-8 (byte {error.start} of the file)")
            return
        yield Record(source, 1, text if text.strip() else None,
                     None if text.strip() else "empty file")
        return
    paragraph: list[str] = []
    start_line = 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield Record(source, number, None, f"not UTF-8 (byte {error.start} of the line)")
            continue
        if unit == "line":
            if line.strip():
                yield Record(source, number, line.rstrip("\r\n"))
        elif line.strip():
            if not paragraph:
                start_line = number
            paragraph.append(line)
        elif paragraph:
            yield Record(source, start_line, "".join(paragraph).rstrip("\r\n"))
            paragraph = []
    if paragraph:
        yield Record(source, start_line, "".join(paragraph).rstrip("\r\n"))


def read_with_datasets(source: InputSource, text_field: str, hub_split: str) -> Iterator[Record]:
    """parquet / arrow files and hub datasets through `datasets`, streaming, numbered by row."""
    import datasets

    try:
        if source.format == "hub":
            dataset = datasets.load_dataset(source.location, split=hub_split, streaming=True)
        else:
            dataset = datasets.load_dataset(source.format, data_files=[source.location],
                                            split="train", streaming=True)
    except Exception as error:  # network, missing dataset, bad file: all need the same fix
        hint = ("the hub is unreachable or the name is wrong; download it elsewhere and pass "
                "the files" if source.format == "hub" else "the file is not valid " + source.format)
        raise ValueError(f"could not read {source.location} with datasets ({hint}): {error}") from error
    for number, row in enumerate(dataset, start=1):
        text, problem = _text_of(row, text_field)
        yield Record(source.location, number, text, problem)


def iter_records(sources: list[InputSource], text_field: str = "text", text_unit: str = "document",
                 hub_split: str = "train") -> Iterator[Record]:
    """All records of all sources, in order (the order fixes shard contents and resume points)."""
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    for source in sources:
        if source.format == "json":
            yield from read_json(Path(source.location), text_field)
        elif source.format == "text":
            yield from read_text(Path(source.location), text_unit)
        elif source.format in ("parquet", "arrow", "hub"):
            yield from read_with_datasets(source, text_field, hub_split)
        else:
            raise ValueError(f"unknown input format {source.format!r} for {source.location}")


def describe_sources(sources: list[InputSource]) -> list[dict]:
    """Manifest entries: identity of each input (size and mtime catch a changed file on resume)."""
    described = []
    for source in sources:
        entry = {"location": source.location, "format": source.format}
        if source.format != "hub":
            stat = os.stat(source.location)
            entry.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
        described.append(entry)
    return described
