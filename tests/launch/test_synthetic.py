"""launch/synthetic.py on the CPU at toy sizes: a trivially solvable palindrome reaches 100% held-out
accuracy and stops early, every arm and task trains through the pretraining loop, the sweep's job
list, the local job runner, and the report beside the paper's numbers."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import synthetic
from launch.jobs import read_jobs, run_jobs, select
from launch.synthetic_report import PAPER_PEAK

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.hidden_size=32", "--set", "model.kda_head_dim=16", "--set", "model.intermediate_size=64",
        "--set", "model.qk_nope_head_dim=16", "--set", "model.qk_rope_head_dim=8", "--set", "model.v_head_dim=16",
        "--set", "model.kv_lora_rank=16", "--log-interval", "1000"]


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_short_palindrome_is_solved_and_training_stops(tmp_path):
    run_dir = tmp_path / "pal"
    code = synthetic.main(["--task", "palindrome", "--arm", "K", "--length", "8", "--task-arg", "symbols=4",
                           "--lr", "3e-3", "--steps", "400", "--batch-size", "16", "--eval-interval", "50",
                           "--eval-samples", "64", "--run-dir", str(run_dir), "--save", "--save-interval", "1000",
                           *TINY])
    assert code == 0
    records = _records(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    accuracy = [(r["step"], r["synthetic/token_accuracy"], r["synthetic/sequence_accuracy"])
                for r in records if "synthetic/token_accuracy" in r]
    assert sum(losses[:5]) / 5 > 1.0 and sum(losses[-5:]) / 5 < 0.1, losses  # ln 4 = 1.39 at chance
    assert accuracy[0][1] < 1.0 and accuracy[-1][1:] == (1.0, 1.0), accuracy
    stopped = accuracy[-1][0]
    assert stopped < 400 and len(losses) == stopped  # ended at the evaluation that reached 100%
    assert (run_dir / f"iter_{stopped:07d}" / "meta.json").exists()  # and saved there
    result = json.loads((run_dir / "result.json").read_text())
    assert result["peak_token_accuracy"] == 1.0 and result["last_step"] == stopped
    settings = json.loads((run_dir / "synthetic.json").read_text())
    assert settings["task"] == {"name": "palindrome", "symbols": 4, "vocab_size": 6}
    assert settings["model"]["layer_pattern"] == "K" and settings["model"]["num_layers"] == 2


@pytest.mark.parametrize("task,arm", [("mqar", "G"), ("stack", "A")])
def test_other_tasks_and_arms_train_and_log_accuracy(tmp_path, task, arm):
    run_dir = tmp_path / "run"
    code = synthetic.main(["--task", task, "--arm", arm, "--length", "16", "--steps", "3", "--batch-size", "4",
                           "--eval-interval", "2", "--eval-samples", "8", "--run-dir", str(run_dir), *TINY])
    assert code == 0
    evaluated = [r["step"] for r in _records(run_dir) if "synthetic/token_accuracy" in r]
    assert evaluated == [2, 3]  # every eval interval and the last step
    assert json.loads((run_dir / "result.json").read_text())["last_step"] == 3


def test_run_stopped_by_a_signal_writes_no_result_and_resumes_to_its_end(tmp_path, monkeypatch, capsys):
    """A stop request (SIGTERM from the job runner at its time limit) saves and ends the run early; it
    must not leave result.json, or the runner would skip the job as finished instead of resuming it."""
    from train import signals

    evaluate = synthetic.HeldOutAccuracy.__call__

    def evaluate_then_stop_at_step_2(self, model, step):
        if step == 2:
            signals.request("SIGTERM")
        return evaluate(self, model, step)

    run_dir = tmp_path / "run"
    argv = ["--task", "stack", "--arm", "K", "--length", "16", "--steps", "6", "--batch-size", "4",
            "--eval-interval", "2", "--eval-samples", "8", "--run-dir", str(run_dir), "--save", "--save-interval", "100",
            *TINY]
    monkeypatch.setattr(synthetic.HeldOutAccuracy, "__call__", evaluate_then_stop_at_step_2)
    assert synthetic.main(argv) == 0
    assert not (run_dir / "result.json").exists() and "no result.json written" in capsys.readouterr().out
    assert (run_dir / "iter_0000002").exists()
    monkeypatch.setattr(synthetic.HeldOutAccuracy, "__call__", evaluate)
    assert synthetic.main(argv) == 0  # the same command: resumes at step 2 and runs to the end
    assert json.loads((run_dir / "result.json").read_text())["last_step"] == 6
    assert [r["step"] for r in _records(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_model_is_the_papers_two_layer_dense_model():
    for arm, kind in (("K", "kda"), ("G", "gdn"), ("A", "mla")):
        config = synthetic.synthetic_model(100, arm).validate()
        assert config.layer_types == [kind, kind] and config.ffn_types == ["dense", "dense"]
        assert (config.kda_num_heads, config.kda_head_dim, config.num_attention_heads) == (2, 128, 2)
        assert config.hidden_size == 256 and config.vocab_size == 100


def test_bad_flags_give_a_clear_error(tmp_path, capsys):
    assert synthetic.main(["--task", "mqar", "--arm", "K", "--length", "16", "--task-arg", "kv_pairs=9",
                           "--run-dir", str(tmp_path)]) == 2
    assert "use fewer pairs" in capsys.readouterr().err
    assert synthetic.main(["--task", "stack", "--arm", "K", "--length", "16", "--steps", "0",
                           "--run-dir", str(tmp_path)]) == 2
    assert "--steps=0: must be positive" in capsys.readouterr().err


def test_sweep_lists_every_job_with_the_1024_kda_gdn_contrast_first(tmp_path):
    out = tmp_path / "jobs.jsonl"
    assert synthetic.main(["sweep", "--out", "runs/s", "--output", str(out), "--", "--bf16", "--steps", "100"]) == 0
    jobs = read_jobs(out)
    assert len(jobs) == 3 * 3 * 4 * 4 and len({job["name"] for job in jobs}) == len(jobs)
    first = jobs[:24]
    assert {(j["length"], j["arm"]) for j in first} == {(1024, "K"), (1024, "G")}
    assert {j["task"] for j in first} == {"palindrome", "mqar", "stack"} and {j["lr"] for j in first} == {
        5e-5, 1e-4, 5e-4, 1e-3}
    for job in jobs:
        argv = shlex.split(job["command"])
        assert argv[:2] == ["python", "launch/synthetic.py"] and argv[-3:] == ["--bf16", "--steps", "100"]
        args = synthetic.parse_train_args(argv[2:])
        assert (args.task, args.arm, args.length, args.lr) == (job["task"], job["arm"], job["length"], job["lr"])
        assert args.run_dir == job["run_dir"] and job["done_file"] == f"{job['run_dir']}/result.json"


def test_runner_runs_jobs_in_parallel_and_skips_finished_ones(tmp_path):
    def job(name, code):
        run_dir = tmp_path / name
        script = f"import pathlib; pathlib.Path({str(run_dir / 'done')!r}).write_text('x'); raise SystemExit({code})"
        return {"name": name, "command": shlex.join(["python", "-c", script]), "run_dir": str(run_dir),
                "done_file": str(run_dir / "done")}

    jobs = [job("a", 0), job("b", 0), job("c", 3)]
    assert run_jobs(jobs, parallel=2) == 1  # one failed
    assert all((tmp_path / name / "done").exists() for name in "abc")
    (tmp_path / "c" / "done").unlink()
    (tmp_path / "a" / "done").write_text("kept")
    assert run_jobs(jobs, parallel=2) == 1  # only c ran again
    assert (tmp_path / "a" / "done").read_text() == "kept"
    assert select(jobs, index=1) == [jobs[1]] and select(jobs, shard="1/2") == [jobs[1]]
    with pytest.raises(ValueError, match="--index 3"):
        select(jobs, index=3)


def test_runner_ctrl_c_stops_the_runs_and_says_how_to_resume(tmp_path):
    """SIGINT to the runner's group (Ctrl-C, `timeout -s INT` in benchmarks/gpu_synthetic.sh): the
    runs get SIGTERM (a training run saves on it), the runner exits 130 with a message, no traceback."""
    import signal
    import time

    started = [tmp_path / f"started{i}" for i in range(2)]
    jobs = [{"name": f"j{i}", "run_dir": str(tmp_path / f"j{i}"), "done_file": str(tmp_path / f"j{i}" / "done"),
             "command": shlex.join(["python", "-c", f"import pathlib, time; pathlib.Path({str(started[i])!r})"
                                    ".write_text('x'); time.sleep(120)"])} for i in range(2)]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    runner = subprocess.Popen([sys.executable, "launch/synthetic.py", "run", str(tmp_path / "jobs.jsonl"),
                               "--parallel", "2"], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not all(p.exists() for p in started):
        time.sleep(0.2)
    assert all(p.exists() for p in started)
    os.killpg(runner.pid, signal.SIGINT)
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 130
    assert "the same command resumes" in err and "Traceback" not in err


def _fake_run(root, task, arm, length, lr, curve):
    run_dir = root / synthetic.run_name(task, arm, length, lr)
    run_dir.mkdir(parents=True)
    (run_dir / "synthetic.json").write_text(json.dumps({"task": {"name": task}, "arm": arm, "length": length,
                                                        "lr": lr}))
    lines = [{"step": s, "loss": 1.0} for s, _ in curve] + [
        {"step": s, "synthetic/token_accuracy": a, "synthetic/sequence_accuracy": a / 2} for s, a in curve]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_picks_the_best_lr_and_puts_the_paper_beside_ours(tmp_path):
    _fake_run(tmp_path, "mqar", "K", 1024, 1e-3, [(500, 0.4), (1000, 0.995), (1500, 1.0)])
    _fake_run(tmp_path, "mqar", "K", 1024, 1e-4, [(500, 0.2), (1000, 0.6)])
    _fake_run(tmp_path, "mqar", "G", 1024, 5e-4, [(500, 0.1), (1000, 0.7)])
    _fake_run(tmp_path, "mqar", "G", 256, 5e-4, [(500, 0.9)])
    out = tmp_path / "report"
    assert synthetic.main(["report", str(tmp_path), "--out", str(out)]) == 0
    assert (out / "peak_accuracy.png").stat().st_size > 1000 and (out / "convergence_L1024.png").exists()
    table = (out / "synthetic_report.md").read_text()
    kda = next(line for line in table.splitlines() if line.startswith("| KDA (ours)"))
    gdn = next(line for line in table.splitlines() if line.startswith("| GDN (ours)"))
    paper = PAPER_PEAK["mqar"]
    assert f"100.0 / {paper['KDA'][2]}" in kda and "| 1000 / ~4-6k |" in kda and "0.001" in kda
    assert f"90.0 / {paper['GDN'][0]}" in gdn and f"70.0 / {paper['GDN'][2]}" in gdn and "not in 1000" in gdn
    assert "| Mamba2 (paper only) |" in table


def test_report_without_runs_is_an_error(tmp_path, capsys):
    assert synthetic.main(["report", str(tmp_path)]) == 2
    assert "no synthetic runs" in capsys.readouterr().err


@pytest.mark.slow  # two processes start torch and megatron-core: 25-40 s on two busy cores
def test_parallel_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "parallel.json"
    cmd = [sys.executable, "benchmarks/synthetic_parallel.py", "--task", "stack", "--length", "16", "--steps", "4",
           "--batch-size", "4", "--parallel", "2", "--out", str(out), "--", "--eval-samples", "8", *TINY]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["runs"] == 2 and row["steps_per_s_total"] > row["steps_per_s_per_run"] > 0
    assert "| 2 |" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arm", ["K", "G", "A"])
def test_papers_model_trains_on_the_gpu(tmp_path, arm):
    """The full-size synthetic model (hidden 256, head dim 128) in bf16 at length 1024: the Triton
    KDA kernels (K, G) and flash attention (A) train, the loss falls, accuracy is logged."""
    run_dir = tmp_path / arm
    code = synthetic.main(["--task", "mqar", "--arm", arm, "--length", "1024", "--lr", "1e-3", "--steps", "60",
                           "--eval-interval", "30", "--eval-samples", "64", "--bf16", "--run-dir", str(run_dir)])
    assert code == 0
    records = _records(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 60 and all(map(math.isfinite, losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses  # ln 1025 -> below ln 512 (a value)
    assert [r["step"] for r in records if "synthetic/token_accuracy" in r] == [30, 60]

if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
