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


def test_update_decided_on_the_device_equals_the_host_decision(tmp_path, monkeypatch):
    """bf16 with fused AdamW: after the first step the clip, the expert-bias move and the skip of a
    non-finite step are decided on the device (no host read inside the step). With the clip active
    on every step and a NaN loss at step 3, losses, weights and expert biases equal those of the
    host-decided path bitwise."""
    import math

    import train.loop as loop
    from train.optimizer import LocalOptimizer

    real = loop.forward_backward
    calls = {"n": 0}

    def nan_at_third(model, micro, scale, forward_only=False):
        calls["n"] += 1
        total = real(model, micro, scale, forward_only)
        return total * float("nan") if calls["n"] == 3 else total

    monkeypatch.setattr(loop, "forward_backward", nan_at_third)
    device_steps = []
    on_device = LocalOptimizer._update_on_device
    monkeypatch.setattr(LocalOptimizer, "_update_on_device",
                        lambda self, *a: device_steps.append(1) or on_device(self, *a))

    def run(device: bool):
        calls["n"] = 0
        if not device:
            monkeypatch.setattr(LocalOptimizer, "_skips_on_device", lambda self: False)
        final = {}

        def capture(model, step):
            final.update({n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]})
            return {}

        losses = loop.train(small_run(tmp_path, train_iters=5, bf16=True, clip_grad=0.05, eval_interval=5),
                            evaluation=capture)
        return losses, final

    device_losses, device_final = run(device=True)
    assert len(device_steps) == 4  # the first step creates the optimizer state on the host path
    host_losses, host_final = run(device=False)
    assert len(device_steps) == 4
    assert math.isnan(device_losses[2]) and math.isnan(host_losses[2])
    assert [x for x in device_losses if x == x] == [x for x in host_losses if x == x]
    biases = [n for n in host_final if n.endswith("expert_bias")]
    assert biases and any(bool(host_final[n].abs().sum()) for n in biases)  # the biases moved
    for name, value in host_final.items():
        assert torch.equal(device_final[name], value), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("bf16", [False, True])
def test_clipped_update_matches_torch_clip_and_adamw(bf16, device):
    """LocalOptimizer.update against torch's own pieces on a copy: clip_grad_norm_ and fused AdamW on
    the same parameter groups (fp32 parameters, or fp32 masters of the bf16 weights; bf16 takes the
    device-decided path from its second step). Steps 0 and 2 are clipped, step 1 is not."""
    from types import SimpleNamespace

    from model.model import build_model
    from parallel import state
    from tests.helpers.small_models import mixed_config
    from train.optim import parameter_groups
    from train.optimizer import LocalOptimizer
    from train.precision import to_bf16

    state.initialize(state.ParallelDims())
    torch.manual_seed(0)
    model = build_model(mixed_config()).to(device)  # on CUDA the fused kernels are the GPU's own
    if bf16:
        to_bf16(model)
    ref_model = build_model(mixed_config()).to(device)  # the same structure and names, fp32, the weights copied
    for (n, p), (_, r) in zip(model.named_parameters(), ref_model.named_parameters()):
        r.data = p.detach().float().clone()
    train = SimpleNamespace(optimizer="adamw", lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                            adam_eps=1e-8, clip_grad=0.5, bf16=bf16, qk_clip_tau=0.0)
    optimizer = LocalOptimizer(model, train)
    plain = torch.optim.AdamW(parameter_groups(ref_model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ref_params = dict(ref_model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    for step, size in enumerate((1.0, 1e-4, 3.0)):
        optimizer.begin_step(1e-2)
        plain.zero_grad()
        for n, p in model.named_parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * size).to(device=device, dtype=p.dtype)
            ref_params[n].grad = p.grad.float().clone()  # our update scales the fp32 ones in place
        norm, _ = optimizer.update(torch.tensor(2.0, dtype=torch.float64, device=device))
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref_params.values()), 0.5)
        plain.step()
        assert float(norm) == pytest.approx(float(ref_norm), rel=1e-5)
        assert (float(norm) > 0.5) == (step != 1)
        for n, p in model.named_parameters():
            got = optimizer.optimizer.masters[p] if bf16 and p in optimizer.optimizer.masters else p.detach()
            torch.testing.assert_close(got.float(), ref_params[n].detach(), rtol=1e-5, atol=1e-6, msg=n)
