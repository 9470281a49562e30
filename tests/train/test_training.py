"""Training loop, checkpoints and the README's load-and-run snippet (single process, CPU)."""

from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from tests.helpers.small_models import small_run
from train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def test_resume_is_exact(tmp_path):
    from train.loop import train

    straight = train(small_run(tmp_path, train_iters=6, save=str(tmp_path / "a")))
    first = train(small_run(tmp_path, train_iters=6, exit_interval=3, save=str(tmp_path / "b")))
    assert ckpt.latest_step(tmp_path / "b") == 3
    resumed = train(small_run(tmp_path, train_iters=6, save=str(tmp_path / "b")))  # auto-resumes
    assert len(first) == 3 and len(resumed) == 3
    assert first + resumed == straight  # bitwise on CPU


def test_expert_bias_is_updated_by_training(tmp_path):
    from train.loop import train

    train(small_run(tmp_path, train_iters=3, save=str(tmp_path / "c")))
    model = ckpt.load_model_for_inference(tmp_path / "c")
    bias = model.layers[1].ffn.router.expert_bias
    assert bias.abs().sum() > 0  # aux-loss-free balancing moved it away from its zero init


def test_readme_snippet_and_checkpoint_errors(tmp_path):
    from train.loop import train

    train(small_run(tmp_path, train_iters=2, save=str(tmp_path / "d")))
    # the three lines of the README
    from train import load_model
    model = load_model(str(tmp_path / "d"))
    logits = model([[1, 2, 3, 4]])
    assert logits.shape == (1, 4, 8192) and torch.isfinite(logits).all()

    # a config that does not match the checkpoint names the differing field
    meta = ckpt.read_meta(ckpt.resolve(tmp_path / "d"))
    other = ModelConfig.from_dict(meta["model"]).replace(hidden_size=96)
    with pytest.raises(ckpt.CheckpointError, match="hidden_size: checkpoint 64 vs model 96"):
        ckpt.check_model_config(meta["model"], other, "d")

    # a truncated shard file is reported with the path and a hint
    shard = next((ckpt.resolve(tmp_path / "d") / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or incomplete"):
        load_model(str(tmp_path / "d"))

    # a folder that is not a checkpoint
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        load_model(str(tmp_path))


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    from train.loop import train

    train(small_run(tmp_path, train_iters=2, save_interval=1, save=str(tmp_path / "e")))
    assert ckpt.latest_step(tmp_path / "e") == 2
    # a save killed half-way leaves only a .tmp folder and no updated marker
    (tmp_path / "e" / "iter_0000003.tmp" / "model").mkdir(parents=True)
    (tmp_path / "e" / "latest").write_text("3\n")  # even a marker pointing at it is not trusted
    assert ckpt.latest_step(tmp_path / "e") == 2
    assert ckpt.load_model_for_inference(tmp_path / "e") is not None


def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL while checkpoint 2 is being written: checkpoint 1 stays the newest complete one,
    loads, and a restarted run resumes from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    save = tmp_path / "k"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KIMI_LINEAR_PAUSE_BEFORE_COMMIT": "2:60"}
    cmd = [sys.executable, "launch/pretrain.py", "--config", "tiny", "--train-iters", "3", "--save-interval", "1",
           "--save", str(save), "--set", f"train.data_cache_dir={ROOT / 'cache' / 'data'}",
           "--seq-length", "32"]
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (save / "iter_0000002.tmp" / "model" / ".metadata").exists():
            assert proc.poll() is None and time.time() < deadline, (
                "training ended before the second save:\n" + (tmp_path / "stderr.txt").read_text()[-3000:]
            )
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert ckpt.latest_step(save) == 1
    assert ckpt.load_model_for_inference(save) is not None
    env.pop("KIMI_LINEAR_PAUSE_BEFORE_COMMIT")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and ckpt.latest_step(save) == 3


def test_sigterm_saves_and_exits_zero(tmp_path):
    """SLURM preemption: SIGTERM makes the loop save at the next step boundary and exit 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    save = tmp_path / "s"
    cmd = [sys.executable, "launch/pretrain.py", "--config", "tiny", "--train-iters", "100000", "--save", str(save),
           "--set", f"train.data_cache_dir={ROOT / 'cache' / 'data'}", "--seq-length", "32",
           "--save-interval", "100000", "--log-interval", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step      3/"):
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested (SIGTERM)" in out and "exit interval" not in out
    step = ckpt.latest_step(save)
    assert step is not None and 3 <= step < 100000


def test_activation_recompute_gives_the_same_gradients():
    from model.model import build_model
    from parallel import state
    from tests.helpers.small_models import mixed_config

    state.initialize(state.ParallelDims(), seed=2)
    model = build_model(mixed_config())
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 15, 40, 80], dtype=torch.int32)

    def grads(recompute):
        model.zero_grad()
        for layer in model.layers:
            layer.recompute = recompute
        model(tokens, cu, labels=tokens).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], rtol=1e-5, atol=1e-7), name


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    """A NaN step is skipped (weights unchanged, counted); K in a row stop the run with a clear
    error naming the last good checkpoint, which stays loadable."""
    import math

    import train.loop as loop

    real = loop.forward_backward
    bad_steps = set()
    calls = {"n": 0}

    def flaky(model, micro, scale, forward_only=False):
        calls["n"] += 1
        total = real(model, micro, scale, forward_only)
        return total * float("nan") if calls["n"] in bad_steps else total

    monkeypatch.setattr(loop, "forward_backward", flaky)
    bad_steps.update({2})
    run = small_run(tmp_path, train_iters=4, save=str(tmp_path / "n1"), save_interval=1, run_dir=str(tmp_path / "n1"))
    losses = loop.train(run)
    assert math.isnan(losses[1]) and all(math.isfinite(x) for x in losses[2:])
    import json

    records = [json.loads(x) for x in (tmp_path / "n1" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 1

    calls["n"] = 0
    bad_steps.clear()
    bad_steps.update({2, 3, 4, 5, 6})
    run = small_run(tmp_path, train_iters=8, save=str(tmp_path / "n2"), save_interval=1, max_nonfinite_steps=3)
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .* last good checkpoint is .*iter_0000001"):
        loop.train(run)
    assert ckpt.latest_step(tmp_path / "n2") == 1
    assert ckpt.load_model_for_inference(tmp_path / "n2") is not None


def test_bf16_master_weights_and_exact_resume(tmp_path):
    """bf16 weights with fp32 masters: A_log/dt_bias/router stay fp32, weights are the rounded
    masters, and N straight = N/2 + resume + N/2 bitwise (masters travel in the checkpoint)."""
    from train.loop import train

    straight = train(small_run(tmp_path, train_iters=4, bf16=True, save=str(tmp_path / "f")))
    first = train(small_run(tmp_path, train_iters=4, bf16=True, exit_interval=2, save=str(tmp_path / "g")))
    resumed = train(small_run(tmp_path, train_iters=4, bf16=True, save=str(tmp_path / "g")))
    assert first + resumed == straight
    assert straight[-1] < straight[0]

    from model.model import build_model
    from parallel import state
    from train.optim import build_optimizer
    from train.precision import MasterWeights, to_bf16

    run = small_run(tmp_path)
    state.initialize(state.ParallelDims())
    model = to_bf16(build_model(run.model))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["layers.0.mixer.A_log"] == torch.float32 and dtypes["layers.0.mixer.dt_bias"] == torch.float32
    assert dtypes["layers.1.ffn.router.weight"] == torch.float32
    assert dtypes["layers.0.mixer.q_proj.weight"] == torch.bfloat16
    assert model.layers[1].ffn.router.expert_bias.dtype == torch.float32
    optimizer = MasterWeights(build_optimizer(model, run.train))
    model(torch.randint(0, 8192, (1, 16))).float().mean().backward()
    optimizer.step()
    q = model.layers[0].mixer.q_proj.weight
    assert q.dtype == torch.bfloat16 and torch.equal(q, optimizer.masters[q].to(torch.bfloat16))
    assert optimizer.state[q]["exp_avg"].dtype == torch.float32


def test_garbage_collection_runs_at_fixed_steps_only(tmp_path, monkeypatch):
    """train.gc_interval: Python's automatic collector is off during training (it stalled steps),
    young generations are collected every gc_interval steps, and the collector is back on after."""
    import gc

    from train.loop import train

    calls, enabled_during = [], []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or collect(generation))
    seen = lambda model, step: enabled_during.append(gc.isenabled()) or {}  # noqa: E731
    train(small_run(tmp_path, train_iters=6, gc_interval=2, eval_interval=1), evaluation=seen)
    assert calls == [2, 1, 1, 1]  # one full pass before the loop, then after steps 2, 4 and 6
    assert enabled_during and not any(enabled_during)
    assert gc.isenabled()
    calls.clear(), enabled_during.clear()
    train(small_run(tmp_path, train_iters=2, gc_interval=0, eval_interval=1), evaluation=seen)
    assert calls == [] and all(enabled_during) and enabled_during
