"""What a training run records beside the loss: the validation loss (metrics.jsonl and W&B, with the
step and the tokens consumed) and the share of samples drawn from each blended source."""

import json
import math
import sys
import types

import pytest
import torch

from tests.helpers.small_models import small_run
from train import checkpoint as ckpt


class _FakeWandbRun:
    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        pass


def _fake_wandb(monkeypatch) -> list:
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(_FakeWandbRun()) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return runs


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _reference_validation_loss(run, checkpoint, iters: int) -> float:
    """Mean per-token loss of the checkpoint on the first ``iters`` validation micro-batches:
    a plain forward per micro-batch and a float64 masked mean, beside the engine's evaluation."""
    from data import build_pretraining_loaders, ensure_default_dataset

    t = run.train
    default = ensure_default_dataset(t.data_cache_dir)
    _, valid = build_pretraining_loaders(
        data_prefixes=default.train_prefixes, valid_prefixes=default.valid_prefixes, seq_length=t.seq_length,
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size, seed=t.seed)
    model = ckpt.load_model_for_inference(checkpoint)
    loss_sum = mask_sum = 0.0
    with torch.no_grad():
        for _ in range(iters):
            batch = next(valid)
            per_token = model(batch["tokens"], batch["cu_seqlens"], labels=batch["labels"]).double()
            loss_sum += float((per_token * batch["loss_mask"].double()).sum())
            mask_sum += float(batch["loss_mask"].sum())
    return loss_sum / mask_sum


def test_validation_loss_goes_to_metrics_and_wandb(tmp_path, monkeypatch):
    from train.loop import train

    runs = _fake_wandb(monkeypatch)
    save = tmp_path / "v"
    run = small_run(train_iters=4, eval_interval=2, eval_iters=3, save=str(save), save_interval=2,
                    run_dir=str(save), wandb_project="kimi")
    train(run)
    records = _metrics(save)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    tokens_per_step = run.train.global_batch_size * run.train.seq_length
    assert [r["consumed_tokens"] for r in records] == [tokens_per_step * s for s in (1, 2, 3, 4)]
    evaluated = {r["step"]: r for r in records if "valid/loss" in r}
    assert sorted(evaluated) == [2, 4]
    for step, record in evaluated.items():
        expected = _reference_validation_loss(run, ckpt.resolve(save, step), iters=3)
        assert math.isclose(record["valid/loss"], expected, rel_tol=1e-5), (step, record["valid/loss"], expected)
        assert math.isclose(record["valid/ppl"], math.exp(record["valid/loss"]), rel_tol=1e-9)
        assert record["valid/tokens"] == 3 * run.train.micro_batch_size * run.train.seq_length
        assert record["valid/tokens_per_s"] > 0
    (wandb_run,) = runs
    logged = {step: data for step, data in wandb_run.logged}
    assert {k: logged[2][k] for k in ("valid/loss", "valid/ppl", "consumed_tokens")} == {
        k: evaluated[2][k] for k in ("valid/loss", "valid/ppl", "consumed_tokens")}
    assert "valid/loss" not in logged[3]


def test_validation_metrics_formulas():
    from train.metrics import validation_metrics

    out = validation_metrics(loss_sum=30.0, loss_tokens=10.0, tokens=12.0, seconds=2.0)
    assert out == {"valid/loss": 3.0, "valid/ppl": math.exp(3.0), "valid/tokens_per_s": 6.0, "valid/tokens": 12.0}
    assert validation_metrics(1e4, 1.0, 1.0, 1.0)["valid/ppl"] == math.inf
    assert math.isnan(validation_metrics(math.nan, 1.0, 1.0, 1.0)["valid/ppl"])


def test_blend_shares_go_to_metrics_and_wandb(tmp_path, monkeypatch):
    from data import ensure_default_dataset
    from train.loop import train

    runs = _fake_wandb(monkeypatch)
    run = small_run(train_iters=3, run_dir=str(tmp_path), wandb_project="kimi")
    default = ensure_default_dataset(run.train.data_cache_dir)
    run.train.data_prefixes = [default.train_prefixes[0], default.valid_prefixes[0]]
    run.train.data_weights = [0.75, 0.25]
    train(run)
    records = _metrics(tmp_path)
    samples = [run.train.global_batch_size * r["step"] for r in records]
    first = [r["data/source0_share"] * n for r, n in zip(records, samples)]
    second = [r["data/source1_share"] * n for r, n in zip(records, samples)]
    assert first == pytest.approx([3, 6, 9]) and second == pytest.approx([1, 2, 3])  # 3:1 in every step of 4
    (wandb_run,) = runs
    assert [data["data/source0_share"] for _, data in wandb_run.logged] == [r["data/source0_share"] for r in records]


def test_run_records_its_kernel_options(tmp_path, monkeypatch):
    """The KDA layers' kernel options reach the op in every layer call, and the run records them in
    every checkpoint's meta.json and in its first metrics record (a resumed run's first one too)."""
    import model.kda as model_kda
    from kernels.kda import KDAOptions
    from train.loop import train

    options = KDAOptions(state_dtype="float32", diag_span_max=0.0).with_launch("fwd_wy.num_warps=8")
    monkeypatch.setattr(model_kda, "KDAOptions", lambda: options)   # what every KDA layer is built with
    seen = []
    op = model_kda.kda_op
    monkeypatch.setattr(model_kda, "kda_op", lambda *a, options=None, **k: seen.append(options) or op(*a, **k))
    save = tmp_path / "o"
    train(small_run(train_iters=2, save=str(save), save_interval=1, run_dir=str(save)))
    assert seen and all(o is options for o in seen)
    record = json.loads(json.dumps(options.to_dict()))
    for step in (1, 2):
        assert json.loads((ckpt.resolve(save, step) / "meta.json").read_text())["kda_kernel_options"] == record
    train(small_run(train_iters=3, save=str(save), save_interval=1, run_dir=str(save)))  # resumes at step 2
    records = _metrics(save)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["kda_kernel_options"] == records[2]["kda_kernel_options"] == record
    assert "kda_kernel_options" not in records[1]
