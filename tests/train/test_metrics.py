"""MoE load balance, KDA gate statistics, memory, JSONL and (faked) Weights & Biases writers."""

import json
import sys
import types

import pytest
import torch

from train.metrics import GateMonitor, MetricsLogger, kda_decay_at_zero_input, memory_metrics, moe_load_metrics


@pytest.fixture(scope="module")
def model():
    from parallel import state

    state.initialize(state.ParallelDims())
    from model.model import build_model
    from tests.helpers.small_models import mixed_config

    torch.manual_seed(0)
    m = build_model(mixed_config())
    m.train()
    return m


def test_moe_load_from_router_counters(model):
    """The counters megatron's routers keep equal an independent count from the routing maps."""
    routers = {i: model.layers[i].ffn.router for i in (1, 2, 3)}
    for r in routers.values():
        r.local_tokens_per_expert.zero_()
    maps = {i: [] for i in routers}
    hooks = [r.register_forward_hook(lambda mod, inp, out, i=i: maps[i].append(out[1].detach().clone()))
             for i, r in routers.items()]
    tokens = torch.randint(0, 512, (2, 24))
    for _ in range(2):  # two micro-batches accumulate
        model(tokens, labels=tokens).sum().backward()
    for h in hooks:
        h.remove()
    metrics = moe_load_metrics(model)
    worst = 0.0
    for i in routers:
        counts = torch.cat(maps[i]).double().sum(0)  # [experts]
        assert counts.sum() == 2 * 48 * 2  # 2 micro-batches x 48 tokens x top-2
        mean = counts.sum().item() / 4
        assert metrics[f"moe/layer{i}/max_over_mean"] == pytest.approx(counts.max().item() / mean, abs=0)
        assert metrics[f"moe/layer{i}/min_over_mean"] == pytest.approx(counts.min().item() / mean, abs=0)
        worst = max(worst, counts.max().item() / mean)
    assert metrics["moe/max_over_mean"] == worst
    model.zero_grad(set_to_none=True)


def _reference_log_decay(raw, a_log, dt_bias, heads):
    x = raw.double().reshape(raw.shape[0], heads, -1) + dt_bias.double().reshape(heads, -1)
    return -torch.exp(a_log.double().reshape(heads, 1)) * torch.log1p(torch.exp(x))


def test_kda_gate_statistics(model):
    kda, gdn = model.layers[0].mixer, model.layers[2].mixer  # KDA (per channel) and GDN (per head)
    static = kda_decay_at_zero_input(model)
    g0 = _reference_log_decay(torch.zeros(1, 64), kda.A_log, kda.dt_bias, 4)
    assert static["kda/layer0/log_decay0_mean"] == pytest.approx(g0.mean().item(), rel=1e-6)
    assert static["kda/layer0/log_decay0_min"] == pytest.approx(g0.min().item(), rel=1e-6)
    g0 = _reference_log_decay(torch.zeros(1, 4), gdn.A_log, gdn.dt_bias, 4)
    assert static["gdn/layer2/log_decay0_mean"] == pytest.approx(g0.mean().item(), rel=1e-6)
    assert set(static) == {f"{p}/log_decay0_{s}" for p in ("kda/layer0", "gdn/layer2", "kda/layer3")
                           for s in ("mean", "min")}

    inputs = {}
    pre = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0].detach()))
           for i, m in ((0, kda), (2, gdn))]
    monitor = GateMonitor(model)
    tokens = torch.randint(0, 512, (2, 16))
    model(tokens)  # not armed: nothing recorded
    inputs.clear()
    monitor.arm()
    with torch.no_grad():
        model(tokens)
        model(torch.randint(0, 512, (2, 16)))
    stats = monitor.collect()
    for h in pre:
        h.remove()
    assert not monitor.armed and not kda.f_b_proj._forward_hooks
    for i, layer, name in ((0, kda, "kda/layer0"), (2, gdn, "gdn/layer2")):
        x = torch.cat([t.squeeze(1) for t in inputs[i]]).double()
        raw = (x @ layer.f_a_proj.weight.double().T) @ layer.f_b_proj.weight.double().T
        g = _reference_log_decay(raw, layer.A_log, layer.dt_bias, 4)
        beta = torch.sigmoid(x @ layer.b_proj.weight.double().T)
        assert stats[f"{name}/log_decay_mean"] == pytest.approx(g.mean().item(), rel=1e-5)
        assert stats[f"{name}/log_decay_min"] == pytest.approx(g.min().item(), rel=1e-5)
        assert stats[f"{name}/beta_mean"] == pytest.approx(beta.mean().item(), rel=1e-5)
    assert g.max() <= 0


def test_memory_metrics_on_cpu():
    out = memory_metrics("cpu")
    assert out["memory/rss_gib"] > 0.01 and out["memory/peak_rss_gib"] >= out["memory/rss_gib"] * 0.99


def test_jsonl_writer(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: import raises ImportError
    logger = MetricsLogger(tmp_path / "run", {"train": {"lr": 1e-3}}, wandb_project="kimi")
    assert "wandb is not installed" in capsys.readouterr().out
    logger.log(1, {"loss": torch.tensor(2.5), "lr": 1e-3})
    logger.log(2, {"loss": 2.25, "moe/max_over_mean": 1.5})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.25, "moe/max_over_mean": 1.5}]
    MetricsLogger(tmp_path / "quiet", enabled=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "quiet").exists()


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


def _fake_wandb(monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return runs


def test_wandb_offline_by_default_grouped_by_slurm_array(tmp_path, monkeypatch):
    runs = _fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    config = {"model": {"hidden_size": 64}, "train": {"lr": 1e-3}}
    logger = MetricsLogger(tmp_path, config, wandb_project="kimi-linear")
    logger.log(5, {"loss": 3.0, "tokens_per_expert": [1, 2]})
    logger.close()
    (run,) = runs
    assert run.kwargs["mode"] == "offline" and run.kwargs["group"] == "4242"
    assert run.kwargs["name"] == "4242_3" and run.kwargs["config"] == config
    assert run.kwargs["project"] == "kimi-linear" and run.kwargs["dir"] == str(tmp_path)
    assert run.logged == [(5, {"loss": 3.0})] and run.finished
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["tokens_per_expert"] == [1, 2]


def test_wandb_online_when_configured_and_disabled(tmp_path, monkeypatch):
    runs = _fake_wandb(monkeypatch)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    MetricsLogger(tmp_path, {}, wandb_project="p")
    MetricsLogger(tmp_path, {}, wandb_project="p", wandb_mode="offline", wandb_entity="me", run_name="r")
    MetricsLogger(tmp_path, {}, wandb_project="p", wandb_mode="disabled")
    MetricsLogger(tmp_path, {}, wandb_project="")
    MetricsLogger(None, {}, wandb_project="p")  # no run directory: JSONL and W&B both off
    assert [r.kwargs["mode"] for r in runs] == ["online", "offline"]
    assert runs[0].kwargs["group"] is None and runs[1].kwargs["entity"] == "me" and runs[1].kwargs["name"] == "r"
