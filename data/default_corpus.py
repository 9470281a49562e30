"""The embedded default corpus: English prose every CPython installation carries.

Text: the Python language reference topics (`pydoc_data.topics.topics`, one document per topic)
and the standard library's docstrings longer than 80 characters (one document per module: its
docstrings in source order). Both are under the PSF licence. About 2 MB of text.

`ensure_default_dataset(cache_dir)` trains a byte-level BPE (8192 ids including <|endoftext|>,
the tiny preset's vocab_size) on the training documents, saves it as a Hugging Face folder and
writes train/valid token files, once: the cache folder is named by a hash of everything the
result depends on (builder version, Python version, vocab size, the stdlib files' names, sizes and
mtimes), so a different Python or a changed builder gets a fresh build and a stale cache is never
used. Concurrent callers (e.g. every rank of a torchrun job) wait on a file lock; the build is made
in a temporary folder and renamed into place.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.prepare import shard_prefixes, tokenize_to_shards
from data.readers import Record
from data.tokenizer import EOS_TOKEN, train_byte_level_bpe

BUILD_VERSION = 1  # bump when the corpus, split or tokenizer recipe changes
DEFAULT_VOCAB_SIZE = 8192
MIN_DOCSTRING_CHARS = 80
VALID_EVERY = 20  # document i goes to validation when i % VALID_EVERY == VALID_EVERY // 2
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


@dataclass
class DefaultDataset:
    """Paths of a built default dataset. Prefixes are Megatron .bin/.idx prefixes."""

    root: str
    tokenizer_dir: str
    train_prefixes: list[str]
    valid_prefixes: list[str]
    vocab_size: int  # the tokenizer's total vocabulary (<= the requested size)
    eos_token_id: int
    stats: dict = field(default_factory=dict)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """The stdlib's .py files in a fixed order, without tests and installed packages."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if not _SKIPPED_DIRS.intersection(parts[:-1]):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_docstrings(source: bytes) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are templates or other Pythons' code
        return []
    nodes = [n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # source order, module docstring first
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and len(doc) > MIN_DOCSTRING_CHARS:
            docs.append(doc)
    return docs


def collect_default_documents() -> list[tuple[str, str]]:
    """(source, text) for every document of the default corpus, in a deterministic order."""
    from pydoc_data.topics import topics

    documents = [(f"pydoc_data.topics:{key}", topics[key].strip()) for key in sorted(topics)]
    root = stdlib_root()
    for path in stdlib_source_files():
        docs = _module_docstrings(path.read_bytes())
        if docs:
            documents.append((f"stdlib:{path.relative_to(root).as_posix()}", "\n\n".join(docs)))
    return [(source, text) for source, text in documents if text]


def is_validation_document(index: int) -> bool:
    return index % VALID_EVERY == VALID_EVERY // 2


def default_corpus_key(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """Hash of everything the built dataset depends on; cheap (stat calls only)."""
    import pydoc_data.topics

    root = stdlib_root()
    files = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
             for p in stdlib_source_files()]
    topics_file = Path(pydoc_data.topics.__file__)
    recipe = {
        "version": BUILD_VERSION, "python": sys.version, "vocab_size": vocab_size,
        "valid_every": VALID_EVERY, "min_chars": MIN_DOCSTRING_CHARS, "files": files,
        "topics": [topics_file.stat().st_size, topics_file.stat().st_mtime_ns],
    }
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def build_default_dataset(out_dir: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE,
                          progress: bool = False) -> DefaultDataset:
    """Collect the text, train the tokenizer, write train/valid token files into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()
    documents = collect_default_documents()
    timings["collect_seconds"] = round(time.perf_counter() - started, 3)
    train_docs = [d for i, d in enumerate(documents) if not is_validation_document(i)]
    valid_docs = [d for i, d in enumerate(documents) if is_validation_document(i)]

    started = time.perf_counter()
    tokenizer_dir = train_byte_level_bpe((text for _, text in train_docs), vocab_size,
                                         out / "tokenizer", special_tokens=(EOS_TOKEN,))
    timings["tokenizer_train_seconds"] = round(time.perf_counter() - started, 3)

    manifests = {}
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        started = time.perf_counter()
        records = (Record(source, 1, text) for source, text in docs)
        sources = [{"location": "python-stdlib-docs", "format": "embedded",
                    "python": sys.version.split()[0], "documents": len(docs)}]
        manifests[split] = tokenize_to_shards(records, out / split, tokenizer_dir, sources,
                                              workers=1, progress=progress)
        timings[f"{split}_tokenize_seconds"] = round(time.perf_counter() - started, 3)

    stats = {
        "documents": {split: m["totals"]["documents"] for split, m in manifests.items()},
        "tokens": {split: m["totals"]["tokens"] for split, m in manifests.items()},
        "characters": {"train": sum(len(t) for _, t in train_docs),
                       "valid": sum(len(t) for _, t in valid_docs)},
        **timings,
    }
    tokenizer = manifests["train"]["tokenizer"]
    dataset = DefaultDataset(
        root=str(out), tokenizer_dir=str(tokenizer_dir),
        train_prefixes=shard_prefixes(out / "train"), valid_prefixes=shard_prefixes(out / "valid"),
        vocab_size=tokenizer["vocab_size"], eos_token_id=tokenizer["eos_token_id"], stats=stats,
    )
    return dataset


def _relocate(dataset: DefaultDataset, old_root: Path, new_root: Path) -> DefaultDataset:
    def move(path: str) -> str:
        return str(new_root / Path(path).relative_to(old_root))

    return DefaultDataset(
        root=str(new_root), tokenizer_dir=move(dataset.tokenizer_dir),
        train_prefixes=[move(p) for p in dataset.train_prefixes],
        valid_prefixes=[move(p) for p in dataset.valid_prefixes],
        vocab_size=dataset.vocab_size, eos_token_id=dataset.eos_token_id, stats=dataset.stats,
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("KIMI_LINEAR_DATA_CACHE",
                               Path.home() / ".cache" / "kimi-linear" / "data"))


def ensure_default_dataset(cache_dir: str | os.PathLike | None = None,
                           vocab_size: int = DEFAULT_VOCAB_SIZE,
                           progress: bool = False) -> DefaultDataset:
    """Build the default dataset under cache_dir once (keyed by a hash) and return its paths.

    cache_dir defaults to $KIMI_LINEAR_DATA_CACHE or ~/.cache/kimi-linear/data. progress=True
    adds tokenization progress bars to the one line printed when a build is needed.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"default-v{BUILD_VERSION}-{default_corpus_key(vocab_size)}"
    info_path = final / "dataset.json"
    with open(cache / ".default-corpus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then reuse its result
        if info_path.exists():
            saved = DefaultDataset(**json.loads(info_path.read_text()))
            dataset = _relocate(saved, Path(saved.root), final)  # the cache may have moved
            if all(Path(p + ".bin").exists() and Path(p + ".idx").exists()
                   for p in dataset.train_prefixes + dataset.valid_prefixes):
                return dataset
            shutil.rmtree(final)  # damaged cache: rebuild
        print(f"building the default corpus and tokenizer in {final} (about 10 s, once) ...",
              file=sys.stderr)
        tmp = cache / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        dataset = build_default_dataset(tmp, vocab_size, progress=progress)
        dataset = _relocate(dataset, tmp, final)
        for split in ("train", "valid"):  # manifests name the tokenizer where it will live
            manifest_path = tmp / split / "manifest.json"
            manifest = json.loads(manifest_path.read_text())
            manifest["tokenizer"]["path"] = dataset.tokenizer_dir
            manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "dataset.json").write_text(json.dumps(asdict(dataset), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return dataset
