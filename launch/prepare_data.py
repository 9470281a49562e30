"""Prepare pretraining data: raw text -> Megatron .bin/.idx token shards + manifest.json.

Examples:
    # the embedded default corpus + its 8192-token tokenizer (what the quick start uses)
    python launch/prepare_data.py --default-corpus --out cache/data

    # your corpus with an existing Hugging Face tokenizer folder, 16 worker processes
    python launch/prepare_data.py --input corpus/*.jsonl.xz --text-field text \
        --tokenizer path/to/tokenizer --out cache/mycorpus/train --workers 16

    # train a byte-level BPE on the inputs first, then tokenize with it
    python launch/prepare_data.py --input books/ --train-tokenizer --vocab-size 32768 \
        --tokenizer cache/tok32k --out cache/books/train

An interrupted run resumes when the same command is run again. See docs/data.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from data.prepare import DEFAULT_SHARD_TOKENS, MalformedRecordError
from data.readers import TEXT_UNITS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--input", nargs="+", action="extend", default=[],
                        help="files, folders, globs or hub dataset names (repeatable)")
    parser.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    parser.add_argument("--default-corpus", action="store_true",
                        help="build the embedded default corpus and tokenizer under --out")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer folder")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train a byte-level BPE on the inputs into --tokenizer first")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="total vocabulary of --train-tokenizer / --default-corpus "
                             "(default 32768; the default corpus uses 8192)")
    parser.add_argument("--tokenizer-train-docs", type=int, default=None,
                        help="train the tokenizer on at most this many documents")
    parser.add_argument("--max-vocab-size", type=int, default=None,
                        help="refuse a tokenizer with more ids than this (your model's vocab_size)")
    parser.add_argument("--text-field", default="text", help="JSON/parquet/arrow field with text")
    parser.add_argument("--text-unit", choices=TEXT_UNITS, default="document",
                        help="plain text files: one document per file, paragraph or line")
    parser.add_argument("--format", choices=("json", "text", "parquet", "arrow", "hub"),
                        help="force the input format (default: from the file extension)")
    parser.add_argument("--hub-split", default="train", help="split of a hub dataset")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: "
                        "all cores; 1 = in-process)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"close a shard after this many tokens (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--name", default="tokens", help="shard file name prefix")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first malformed record instead of skipping and counting")
    parser.add_argument("--eos-token", help="document separator token (default: the tokenizer's eos)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow tokenizer folders with custom code (e.g. Kimi's tiktoken one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.default_corpus:
        if not args.input:
            parser.error("give --input (files, folders, globs, hub names) or --default-corpus")
        if not args.tokenizer:
            parser.error("give --tokenizer FOLDER (with --train-tokenizer to create it)")
    return args


def train_tokenizer_on_inputs(args: argparse.Namespace) -> None:
    from data.readers import expand_inputs, iter_records
    from data.tokenizer import train_byte_level_bpe

    target = Path(args.tokenizer)
    if (target / "tokenizer.json").exists():  # a rerun (e.g. resuming) reuses the trained one
        print(f"using the tokenizer already trained in {target} (delete it to train again)",
              file=sys.stderr)
        return
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"--tokenizer {target} holds other files; --train-tokenizer needs an "
                         "empty or new folder")
    sources = expand_inputs(args.input, args.format)
    records = iter_records(sources, args.text_field, args.text_unit, args.hub_split)
    texts = (r.text for r in records if r.error is None and r.text is not None)
    started = time.perf_counter()
    vocab_size = args.vocab_size or 32768
    train_byte_level_bpe(itertools.islice(texts, args.tokenizer_train_docs), vocab_size, target)
    print(f"trained a {vocab_size}-token byte-level BPE in "
          f"{time.perf_counter() - started:.1f} s -> {target}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from train.folders import writable_folder

        writable_folder(args.out, "--out")
        if args.default_corpus:
            from data.default_corpus import ensure_default_dataset

            dataset = ensure_default_dataset(args.out, vocab_size=args.vocab_size or 8192,
                                             progress=not args.no_progress)
            print(json.dumps(dataset.__dict__, indent=1))
            return 0
        if args.train_tokenizer:
            train_tokenizer_on_inputs(args)
        if args.max_vocab_size is not None:
            from data.tokenizer import check_vocab_fits, load_tokenizer

            check_vocab_fits(len(load_tokenizer(args.tokenizer, args.trust_remote_code)),
                             args.max_vocab_size, f"the tokenizer in {args.tokenizer}")
        from data.prepare import prepare_corpus

        manifest = prepare_corpus(
            args.input, args.out, args.tokenizer, text_field=args.text_field,
            text_unit=args.text_unit, input_format=args.format, hub_split=args.hub_split,
            workers=args.workers, shard_tokens=args.shard_tokens, name=args.name,
            strict=args.strict, eos_token=args.eos_token,
            trust_remote_code=args.trust_remote_code, progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, MalformedRecordError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished shards are kept in {args.out}; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    totals, session = manifest["totals"], manifest.get("last_session", {})
    print(f"{args.out}: {len(manifest['shards'])} shards, {totals['documents']:,} documents, "
          f"{totals['tokens']:,} tokens, {manifest['malformed']['count']} malformed records "
          f"skipped; this session {session.get('seconds', 0):.1f} s, "
          f"{session.get('tokens_per_second', 0):,} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
