"""Tokenizers: train a byte-level BPE, save/load Hugging Face tokenizer folders, check vocab fit.

Every tokenizer goes through one path: a local Hugging Face folder loaded with
`AutoTokenizer.from_pretrained(folder)`. Our own tokenizer is a byte-level BPE trained with the
`tokenizers` library (lossless round trip for any UTF-8 text) and saved as tokenizer.json +
tokenizer_config.json, so a user's own folder (for example the real Kimi Linear tokenizer) is a
drop-in replacement.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

EOS_TOKEN = "<|endoftext|>"


def train_byte_level_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    special_tokens: Sequence[str] = (EOS_TOKEN,),
    min_frequency: int = 2,
    model_max_length: int = 1 << 20,
) -> Path:
    """Train a byte-level BPE whose TOTAL vocabulary (special tokens included) is <= vocab_size,
    and save it as a Hugging Face tokenizer folder. The first special token is the EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                         f"(needs >= 256 byte tokens + {len(special_tokens)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=special_tokens[0],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out))
    if len(hf_tokenizer) > vocab_size:  # the trainer's contract; checked because the model relies on it
        raise RuntimeError(f"trained tokenizer has {len(hf_tokenizer)} tokens > {vocab_size}")
    return out


def load_tokenizer(tokenizer_dir: str | os.PathLike, trust_remote_code: bool = False):
    """Load a tokenizer from a local Hugging Face folder, offline. Raises with the fix if absent."""
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {folder} does not exist: pass a local Hugging Face tokenizer folder "
            "(tokenizer.json + tokenizer_config.json), e.g. the one ensure_default_dataset() or "
            "`launch/prepare_data.py --default-corpus` builds, or train one with "
            "`launch/prepare_data.py --train-tokenizer`."
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises many types; name the folder and the fix
        raise ValueError(
            f"could not load a tokenizer from {folder}: {error}. The folder needs tokenizer.json "
            "(fast tokenizers) or the files its tokenizer_config.json names; custom tokenizers "
            "(e.g. Kimi's tiktoken-based one) need trust_remote_code=True / --trust-remote-code."
        ) from error


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can emit (base vocabulary plus added tokens)."""
    return len(tokenizer)


def eos_token_id(tokenizer, eos_token: str | None = None) -> int:
    """The id appended after every document; `eos_token` overrides the tokenizer's own."""
    if eos_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(eos_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"--eos-token {eos_token!r} is not in the tokenizer's vocabulary")
        return int(token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer defines no eos_token; pass --eos-token <token> (a token of its "
            "vocabulary that separates documents, e.g. <|endoftext|>)"
        )
    return int(tokenizer.eos_token_id)


def check_vocab_fits(vocab: int, model_vocab_size: int, what: str) -> None:
    """The model's embedding must cover every id the data can contain."""
    if vocab > model_vocab_size:
        raise ValueError(
            f"{what} needs vocab_size >= {vocab} but the model's vocab_size is {model_vocab_size}:"
            " raise the model's vocab_size (pad it to a multiple of 128 for speed) or prepare the "
            "data with a tokenizer whose vocabulary fits."
        )


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike) -> str:
    """sha256 over the tokenizer folder's files (names and bytes): identifies the exact tokenizer."""
    digest = hashlib.sha256()
    for path in sorted(Path(tokenizer_dir).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def tokenizer_summary(tokenizer_dir: str | os.PathLike, tokenizer, eos_id: int) -> dict:
    """What the manifest records about the tokenizer."""
    return {
        "path": str(Path(tokenizer_dir).resolve()),
        "class": type(tokenizer).__name__,
        "vocab_size": tokenizer_vocab_size(tokenizer),
        "eos_token": tokenizer.convert_ids_to_tokens(eos_id),
        "eos_token_id": eos_id,
        "sha256": tokenizer_fingerprint(tokenizer_dir),
    }


class BatchEncoder:
    """Encodes lists of texts to id lists without special tokens; picklable by folder path.

    Special-token strings inside a document (a literal "<|endoftext|>") are encoded as plain text,
    so EOS ids appear only where the pipeline appends them: at document ends.

    Uses the Rust `tokenizers` object directly when the folder has tokenizer.json (the same ids
    as PreTrainedTokenizerFast with add_special_tokens=False, without the transformers import in
    every worker); otherwise the AutoTokenizer.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike, trust_remote_code: bool = False):
        self.tokenizer_dir = str(tokenizer_dir)
        self.trust_remote_code = trust_remote_code
        self._fast = None
        self._hf = None

    def _load(self) -> None:
        tokenizer_json = Path(self.tokenizer_dir) / "tokenizer.json"
        if tokenizer_json.exists() and _added_tokens_consistent(tokenizer_json):
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(tokenizer_json))
            self._fast.encode_special_tokens = True
        else:
            self._hf = load_tokenizer(self.tokenizer_dir, self.trust_remote_code)

    def encode(self, texts: list[str]) -> list:
        """Token ids of each text: a list, or a numpy array for a text encoded in pieces."""
        if self._fast is None and self._hf is None:
            self._load()
        if self._fast is None:
            return self._hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out: list = [None] * len(texts)
        short = [i for i, text in enumerate(texts) if len(text) <= LONG_TEXT_CHARS]
        for i, encoding in zip(short, self._fast.encode_batch([texts[i] for i in short], add_special_tokens=False)):
            out[i] = encoding.ids
        for i, text in enumerate(texts):
            if out[i] is None:  # one piece at a time: the Rust encoder needs ~100 bytes per character
                out[i] = np.concatenate([
                    np.asarray(self._fast.encode(piece, add_special_tokens=False).ids, dtype=np.int32)
                    for piece in split_long_text(text)
                ])
        return out


# Longer texts are encoded in pieces of about this many characters (a 50 MB record would otherwise
# need ~7 GB in the encoder).
LONG_TEXT_CHARS = 1 << 20


def split_long_text(text: str, piece: int = LONG_TEXT_CHARS) -> list[str]:
    """``text`` in pieces of about ``piece`` characters, each cut just before a space that follows a
    non-space. Pre-tokenizers never join across such a point (byte-level BPE with the GPT-2, Llama 3
    or tiktoken patterns; SentencePiece's Metaspace), so the pieces' ids joined are the text's ids.
    A text without such a point stays whole."""
    pieces, start = [], 0
    while len(text) - start > piece:
        cut = text.find(" ", start + piece)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _added_tokens_consistent(tokenizer_json: Path) -> bool:
    """True when tokenizer.json alone defines the vocabulary (no extra added_tokens.json)."""
    if (tokenizer_json.parent / "added_tokens.json").exists():
        return False
    try:
        json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True
