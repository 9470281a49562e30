"""Problems with the command or its inputs end in one line and exit 2 instead of a traceback wall,
also under torchrun, where only one rank prints and the launcher adds no failure report (data-loader
errors, unwritable output folders and torchrun's ~25-line report used to bury the message)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.reliability.conftest import ROOT, TINY, pretrain_cmd, run_cmd, tiny_run
from train import checkpoint as ckpt


def _one_line(capfd) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), "\n".join(err)[-3000:]
    return err[-1]


def test_data_loader_errors(tmp_path, capfd):
    from launch.pretrain import main

    assert main([*TINY, "--train-iters", "1", "--data-path", str(tmp_path / "missing")]) == 2
    assert _one_line(capfd).startswith("error: training data: ")
    assert main([*TINY, "--train-iters", "1", "--seq-length", "100000000"]) == 2
    assert "cannot fill one sample" in _one_line(capfd)


def test_save_under_a_file(tmp_path, capfd):
    from launch.pretrain import main

    (tmp_path / "file").write_text("x")
    assert main([*TINY, "--train-iters", "1", "--save", str(tmp_path / "file" / "run")]) == 2
    assert _one_line(capfd).startswith(f"error: cannot create --save {tmp_path / 'file' / 'run'}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_save_in_a_read_only_folder(tmp_path, capfd):
    from launch.pretrain import main

    tmp_path.chmod(0o500)
    try:
        assert main([*TINY, "--train-iters", "1", "--save", str(tmp_path / "run")]) == 2
    finally:
        tmp_path.chmod(0o700)
    assert "--save" in _one_line(capfd)


def test_output_folders_of_the_tools(tmp_path, capfd):
    """convert_to_hf --out and prepare_data --out under a file, before any work."""
    from launch.convert_to_hf import main as to_hf
    from launch.prepare_data import main as prepare
    from train.loop import train

    (tmp_path / "file").write_text("x")
    train(tiny_run(tmp_path / "run", train_iters=1))
    assert to_hf(["--load", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "hf"), "--no-progress"]) == 2
    assert _one_line(capfd).startswith("error: cannot create --out")
    assert prepare(["--default-corpus", "--out", str(tmp_path / "file" / "data"), "--no-progress"]) == 2
    assert _one_line(capfd).startswith("error: cannot create --out")


@pytest.mark.distributed
def test_config_error_under_the_launcher_is_one_line_and_exit_2(tmp_path):
    result = run_cmd(pretrain_cmd("--min-lr=-1", "--save", tmp_path / "run", launcher="wrapper", nproc=2))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["error: --min-lr=-1.0: must be >= 0"], result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # the last line, no failure report after it
    assert "Traceback" not in result.stderr and "exitcode" not in result.stderr


@pytest.mark.distributed
def test_an_error_one_rank_sees_stops_every_rank(tmp_path):
    """Rank 1's RNG file is truncated: every rank stops at once (none waits in a collective), the
    rank that saw it prints the line, the launcher exits 2."""
    from train.loop import train

    save = tmp_path / "run"
    train(tiny_run(save, train_iters=1))
    folder = ckpt.iteration_dir(save, 1)
    (folder / "checksums.json").unlink()  # the RNG reader's own check
    shutil.copy(folder / "rng" / "rank_00000.pt", folder / "rng" / "rank_00001.pt")
    (folder / "rng" / "rank_00001.pt").write_bytes((folder / "rng" / "rank_00000.pt").read_bytes()[:40])
    result = run_cmd(pretrain_cmd("--train-iters", "2", "--save", save, launcher="wrapper", nproc=2))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error (rank 1): could not read the RNG state")
    assert "Traceback" not in result.stderr


def test_single_document_split_suggests_a_flag_that_works(tmp_path, capfd, tokenizer_dir):
    import json

    from launch.prepare_data import main as prepare
    from launch.pretrain import main

    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps({"text": " ".join(f"word{i} and more words" for i in range(100))}) + "\n")
    corpus = tmp_path / "corpus"
    assert prepare(["--input", str(source), "--tokenizer", tokenizer_dir, "--out", str(corpus), "--workers", "1",
                    "--no-progress"]) == 0
    capfd.readouterr()
    assert main([*TINY, "--train-iters", "1", "--data-path", str(corpus)]) == 2
    line = _one_line(capfd)
    assert "1 document(s) cannot be split" in line and "--set train.valid_prefixes=PREFIX" in line
    assert main([*TINY, "--train-iters", "1", "--data-path", str(corpus), "--set",
                 f"train.valid_prefixes={corpus}"]) == 0


@pytest.mark.distributed
def test_errors_agree_across_ranks():
    """A clean error one rank raises reaches every rank with its origin; a crash on one rank makes
    the others stop quietly instead of waiting in the next collective (a 10-minute hang)."""
    from tests.helpers.distributed import torchrun

    result = torchrun(ROOT / "tests" / "reliability" / "agree_worker.py", 2, timeout=240)
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
