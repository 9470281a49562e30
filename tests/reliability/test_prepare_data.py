"""prepare_data refuses to call an empty result complete, and a huge single record is tokenized in
pieces (a 50 MB record needed 6.9 GB; an empty file, random bytes or records without the text field
gave exit 0 and an empty "complete" corpus that training then rejected with an unrelated message)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.reliability.conftest import ROOT



@pytest.mark.parametrize("name,content,reason", [
    ("empty.jsonl", b"", "hold no records"),
    ("random.bin", os.urandom(4096), "not UTF-8"),
    ("records.jsonl", b'{"body": "a"}\n{"body": "b"}\n', "missing field 'text'"),
])
def test_zero_documents_is_an_error_naming_the_reason(tmp_path, capfd, tokenizer_dir, name, content, reason):
    from data.prepare import read_manifest
    from launch.prepare_data import main

    source = tmp_path / name
    source.write_bytes(content)
    out = tmp_path / "out"
    assert main(["--input", str(source), "--tokenizer", tokenizer_dir, "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 2
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: no documents written") and reason in line, line
    if reason.startswith("missing field"):
        assert "--text-field" in line
    assert not read_manifest(out)["complete"]


def test_long_text_is_encoded_in_pieces_with_the_same_ids(tokenizer_dir):
    """Cut points (a space after a non-space) never change the ids, whatever the whitespace."""
    import random

    from data.tokenizer import BatchEncoder, split_long_text

    rng = random.Random(0)
    words = ["the", "Hello,", "world!", "über", "日本語", "it's", "x=1;", "123456", "end.", "\t", "  "]
    text = "".join(rng.choice(words) + rng.choice([" ", "", "  ", "\n", " \n ", "\r\n"]) for _ in range(6000))
    pieces = split_long_text(text, 300)
    assert len(pieces) > 20 and "".join(pieces) == text
    encoder = BatchEncoder(tokenizer_dir)
    whole = encoder.encode([text])[0]
    joined = [i for piece in pieces for i in encoder.encode([piece])[0]]
    assert joined == list(whole)


def test_a_huge_record_needs_little_memory(tmp_path, tokenizer_dir):
    """An 8 MB record: the encoder's peak is a fraction of the ~1.4 GB it needed whole (measured in a
    process that imports only the tokenizer code, so the number is the encoder's; VmHWM, because
    ru_maxrss also counts the parent's pages from before the exec)."""
    script = (
        "import re, sys\n"
        "from data.tokenizer import BatchEncoder\n"
        "words = open(sys.argv[2]).read().split()\n"
        "text = ' '.join(words[i % len(words)] for i in range(1_300_000))[:8_000_000]\n"
        "ids = BatchEncoder(sys.argv[1]).encode([text])[0]\n"
        "assert len(ids) > 1_000_000\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, tokenizer_dir, str(ROOT / "README.md")], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mb = int(result.stdout.split()[-1])
    assert peak_mb < 600, f"peak {peak_mb} MB"
