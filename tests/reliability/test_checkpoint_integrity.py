"""Damaged checkpoints are found before they are used: checksums written at save and verified at
load, a missing optimizer/ folder or a flipped byte makes auto-resume fall back to the previous
complete checkpoint with a message (an explicit --load of the damaged one is refused), and a
truncated RNG file is one clear line (all of these used to load silently or end in a traceback)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from tests.reliability.conftest import tiny_run
from train import checkpoint as ckpt


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A 3-step run with checkpoints 1, 2, 3, and its losses (the reference for resumes)."""
    from train.loop import train

    save = tmp_path_factory.mktemp("integrity") / "run"
    losses = train(tiny_run(save, train_iters=3, save_interval=1))
    return save, losses


@pytest.fixture
def run_copy(pristine, tmp_path):
    save, losses = pristine
    copy = tmp_path / "run"
    shutil.copytree(save, copy)
    (copy / ".lock").unlink(missing_ok=True)
    return copy, losses


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_checksums_cover_every_file(pristine):
    save, _ = pristine
    folder = ckpt.iteration_dir(save, 3)
    table = json.loads((folder / "checksums.json").read_text())["files"]
    expected = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if p.is_file() and p.name not in ("meta.json", "checksums.json"))
    assert sorted(table) == expected and any(n.startswith("optimizer/") for n in expected)
    for name, entry in table.items():
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert json.loads((folder / "meta.json").read_text())["has_optimizer"] is True


@pytest.mark.parametrize("damage", ["missing optimizer", "flipped byte"])
def test_auto_resume_falls_back_past_a_damaged_checkpoint(run_copy, capsys, damage):
    """The newest checkpoint (3) is damaged: the run resumes from 2, says why, moves 3 to
    damaged/, and continues exactly like the undamaged run did."""
    from train.loop import train

    save, straight = run_copy
    newest = ckpt.iteration_dir(save, 3)
    if damage == "missing optimizer":
        shutil.rmtree(newest / "optimizer")
    else:
        _flip_a_byte(next((newest / "model").glob("*.distcp")))
    resumed = train(tiny_run(save, train_iters=3, save_interval=1))
    out = capsys.readouterr().out
    assert "corrupt or incomplete" in out and "falling back to" in out and "resumed from" in out
    assert ("optimizer/ is missing" if damage == "missing optimizer" else "does not match its checksum") in out
    assert resumed == straight[2:]  # step 3 again, bitwise
    assert (save / "damaged" / "iter_0000003").exists() and ckpt.latest_step(save) == 3


def test_explicit_load_of_a_damaged_checkpoint_is_refused(run_copy, tmp_path):
    from train.loop import train

    save, _ = run_copy
    _flip_a_byte(next((ckpt.iteration_dir(save, 2) / "optimizer").glob("*.distcp")))
    run = tiny_run(tmp_path / "branch", train_iters=3, load=str(ckpt.iteration_dir(save, 2)))
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000002 is corrupt or incomplete: optimizer/.* checksum"):
        train(run)


def test_missing_optimizer_without_checksums_is_refused(run_copy, tmp_path):
    """Checkpoints written before checksums existed still may not start with a fresh optimizer."""
    from train.loop import train

    save, _ = run_copy
    folder = ckpt.iteration_dir(save, 2)
    (folder / "checksums.json").unlink()
    shutil.rmtree(folder / "optimizer")
    with pytest.raises(ckpt.CheckpointError, match="optimizer is missing or empty"):
        train(tiny_run(tmp_path / "b", train_iters=3, load=str(folder)))


def test_truncated_rng_file_is_one_line(run_copy, tmp_path, capfd):
    from launch.pretrain import main
    from tests.reliability.conftest import TINY

    save, _ = run_copy
    folder = ckpt.iteration_dir(save, 2)
    (folder / "checksums.json").unlink()  # the RNG reader's own check, not the checksums
    rng = folder / "rng" / "rank_00000.pt"
    rng.write_bytes(rng.read_bytes()[:50])
    assert main([*TINY, "--train-iters", "3", "--load", str(folder), "--save", str(tmp_path / "b")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not read the RNG state") and "Traceback" not in "\n".join(err)


def test_inference_load_verifies_checksums(run_copy):
    from train import load_model

    save, _ = run_copy
    _flip_a_byte(next((ckpt.iteration_dir(save, 3) / "model").glob("*.distcp")))
    with pytest.raises(ckpt.CheckpointError, match="does not match its checksum"):
        load_model(str(save))
