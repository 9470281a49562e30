"""Checkpoint bookkeeping never sends auto-resume to the wrong timeline: keep-last never deletes the
checkpoint just written, ``latest`` never points at nothing, starting before checkpoints already in
--save is refused (or branches explicitly), garbage in ``latest`` is one clear line,
convert_from_hf never overwrites a run, and metrics.jsonl has every step once after a resume."""

from __future__ import annotations

import json

import pytest

from tests.reliability.conftest import TINY, tiny_run
from train import checkpoint as ckpt


def _fake_checkpoints(root, steps):
    for step in steps:
        folder = ckpt.iteration_dir(root, step)
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text("{}")


def test_keep_last_keeps_the_new_checkpoint_and_leaves_newer_ones(tmp_path):
    """Deleting the oldest of *all* checkpoints removed the one just written when newer ones
    existed, leaving ``latest`` pointing at nothing."""
    _fake_checkpoints(tmp_path, [1, 2, 3, 5, 6])
    (tmp_path / "iter_0000002.tmp").mkdir()
    ckpt._remove_old(tmp_path, 3, keep_last=1)
    assert ckpt.complete_steps(tmp_path) == [3, 5, 6]
    assert not (tmp_path / "iter_0000002.tmp").exists()


def test_starting_before_newer_checkpoints_refuses_or_branches(tmp_path):
    from train.loop import train

    save = tmp_path / "run"
    train(tiny_run(save, train_iters=4, save_interval=1, keep_last=3))  # keeps 2, 3, 4
    older = str(ckpt.iteration_dir(save, 2))
    with pytest.raises(ckpt.CheckpointError, match=r"newer than the starting step 2 \(iter_0000003, iter_0000004\)"):
        train(tiny_run(save, train_iters=4, save_interval=1, keep_last=1, load=older))
    assert ckpt.complete_steps(save) == [2, 3, 4] and ckpt.latest_step(save) == 4  # untouched

    train(tiny_run(save, train_iters=3, save_interval=1, keep_last=1, load=older, discard_newer_checkpoints=True))
    assert ckpt.complete_steps(save) == [3] and ckpt.latest_step(save) == 3
    assert sorted(p.name for p in (save / "discarded").iterdir()) == ["iter_0000003", "iter_0000004"]
    assert ckpt.resolve(save) == ckpt.iteration_dir(save, 3)


def test_garbage_in_latest_is_one_line(tmp_path, capfd):
    from launch.pretrain import main

    _fake_checkpoints(tmp_path, [1])
    (tmp_path / "latest").write_bytes(b"\x00\xff\x13garbage\x80")
    assert main([*TINY, "--train-iters", "2", "--save", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path / 'latest'} is corrupt") and "iter_0000001" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_resume_drops_metrics_past_the_checkpoint(tmp_path):
    """A run killed after step 3 but saved at 2 logged step 3 twice (before and after the resume)."""
    from train.loop import train

    save = tmp_path / "run"
    train(tiny_run(save, train_iters=2, save_interval=2))
    with (save / "metrics.jsonl").open("a") as f:  # what the killed run wrote after its last save
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    train(tiny_run(save, train_iters=4, save_interval=2))
    steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_convert_from_hf_never_overwrites_a_run(tmp_path, capfd):
    from launch.convert_from_hf import main

    _fake_checkpoints(tmp_path / "run", [100])
    (tmp_path / "run" / "latest").write_text("100\n")
    assert main(["--hf", str(tmp_path / "no-such-hf-folder"), "--save", str(tmp_path / "run")]) == 2
    assert "already holds a run (iter_0000100, latest)" in capfd.readouterr().err
    assert (tmp_path / "run" / "latest").read_text() == "100\n"


def test_convert_from_hf_names_a_missing_config_key(tmp_path, capfd):
    import torch
    from safetensors.torch import save_file

    from launch.convert_from_hf import main
    from tests.model.hf_fixtures import hf_small_config

    hf = tmp_path / "hf"
    hf.mkdir()
    config = hf_small_config().to_dict()
    del config["vocab_size"]
    (hf / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(hf / "model.safetensors"))
    assert main(["--hf", str(hf), "--save", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == "error: config.json has no 'vocab_size', which every kimi_linear config needs"
