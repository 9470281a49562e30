"""launch/compare.py: the arms and their parameter counts, the identical-recipe check (refuses arms
whose recipes differ), the step-0 weight check, the sweep manifest expansion, and the report on
synthetic metrics files with known numbers."""

import json
import re
import statistics

import pytest

from launch import compare, sweep
from launch.compare import REPO as ROOT
from launch.compare_report import write_report
from model.config import ConfigError
from model.presets import ARMS


@pytest.fixture
def parallel_state():
    from parallel import state

    state.initialize(state.ParallelDims())
    yield
    state.destroy()


def test_dry_run_prints_the_arms_counts_and_identical_commands(tmp_path, capsys):
    code = compare.main(["--config", "tiny", "--dry-run", "--skip-init-check", "--seeds", "2",
                         "--set", "train.train_iters=7", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    header = next(line for line in out.splitlines() if "kimi-linear" in line and "gdn-h" in line)
    assert header.split() == ["mla", "gdn-h", "kimi-linear"]
    patterns = next(line for line in out.splitlines() if line.startswith("layer pattern")).split()[2:]
    assert patterns == ["A", "GGGA", "KKKA"]
    assert "arms differ in model.layer_pattern: mla=A, gdn-h=GGGA, kimi-linear=KKKA" in out
    commands = [line for line in out.splitlines() if "launch/pretrain.py" in line]
    assert len(commands) == 6  # 3 arms x 2 seeds
    for seed in (1234, 1235):
        same_seed = [c for c in commands if f"--seed {seed} " in c]
        assert len(same_seed) == 3
        # the commands of one seed differ in the layer pattern, the name and the folder only
        stripped = {c.split(" --set model.layer_pattern=")[0] for c in same_seed}
        assert len(stripped) == 1 and "--set train.train_iters=7" in stripped.pop()
    assert not list(tmp_path.iterdir())  # a dry run trains and writes nothing


def test_parameter_counts_match_the_arithmetic(parallel_state):
    """Activated = total - the (E - k) routed experts each MoE layer does not use per token, an
    expert being a SwiGLU of 3 x hidden x width weights (written from the math, not from names)."""
    runs = compare.build_arms("tiny", list(ARMS))
    for arm, run in runs.items():
        m = run.model
        counts = compare.parameter_counts(m)
        moe_layers = m.ffn_types.count("moe")
        per_expert = 3 * m.hidden_size * m.moe_intermediate_size
        inactive = moe_layers * (m.num_experts - m.num_experts_per_token) * per_expert
        assert counts["activated"] == counts["total"] - inactive, arm
        assert counts["activated_non_embedding"] == counts["activated"] - 2 * m.vocab_size * m.hidden_size, arm
    totals = {arm: compare.parameter_counts(run.model)["total"] for arm, run in runs.items()}
    assert len(set(totals.values())) == 3  # the mixers differ in size, so the totals do


def test_arms_from_one_recipe_differ_in_the_layer_pattern_only():
    runs = compare.build_arms("tiny", list(ARMS), ["train.lr=1e-3", "model.num_layers=8"])
    expected, problems = compare.recipe_differences(runs)
    assert problems == {}
    assert set(expected) == {"model.layer_pattern", "model.name"}
    assert {arm: run.model.layer_pattern for arm, run in runs.items()} == {
        "mla": "A", "gdn-h": "GGGAGGGA", "kimi-linear": "KKKAKKKA"}
    assert all(run.train.lr == 1e-3 for run in runs.values())


def _recipe(path, pattern, **train):
    path.write_text(json.dumps({"preset": "tiny", "model": {"layer_pattern": pattern}, "train": train}))
    return str(path)


def test_arms_with_a_different_learning_rate_are_refused(tmp_path, capsys):
    mla = _recipe(tmp_path / "mla.json", "A", lr=1e-3)
    kimi = _recipe(tmp_path / "kimi.json", "KKKA", lr=3e-3, seed=7)
    runs = compare.build_arms(None, ["mla", "kimi-linear"], arm_configs={"mla": mla, "kimi-linear": kimi})
    _, problems = compare.recipe_differences(runs)
    assert problems == {"train.lr": {"mla": 1e-3, "kimi-linear": 3e-3}, "train.seed": {"mla": 1234, "kimi-linear": 7}}

    code = compare.main(["--arms", "mla,kimi-linear", "--arm-config", f"mla={mla}", "--arm-config",
                         f"kimi-linear={kimi}", "--dry-run", "--root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "differ beyond the layer pattern" in err
    assert "train.lr: mla=0.001, kimi-linear=0.003" in err and "train.seed: mla=1234, kimi-linear=7" in err


def test_matching_per_arm_recipes_are_accepted(tmp_path):
    runs = compare.build_arms(None, ["mla", "kimi-linear"], arm_configs={
        "mla": _recipe(tmp_path / "a.json", "A", lr=1e-3),
        "kimi-linear": _recipe(tmp_path / "k.json", "KKKA", lr=1e-3)})
    expected, problems = compare.recipe_differences(runs)
    assert problems == {} and list(expected) == ["model.layer_pattern"]


def test_shared_parameters_exclude_mixers_of_different_kinds(parallel_state):
    runs = compare.build_arms("tiny", ["mla", "kimi-linear"])
    prints = {arm: compare.initial_fingerprints(run) for arm, run in runs.items()}
    shared = compare.shared_parameter_names(runs["mla"], runs["kimi-linear"], prints["mla"], prints["kimi-linear"])
    assert "embedding.weight" in shared and "output_layer.weight" in shared
    assert "layers.1.ffn.experts.local_experts.3.linear_fc2.weight" in shared
    assert "layers.3.mixer.kv_b_proj.weight" in shared  # layer 3 is MLA in both arms
    assert not any(name.startswith(("layers.0.mixer.", "layers.1.mixer.", "layers.2.mixer.")) for name in shared)


def test_weight_check_sees_equal_and_different_initialisations(parallel_state):
    """The check itself: the same arm built twice with one seed is identical; another seed differs."""
    import copy

    (run,) = compare.build_arms("tiny", ["kimi-linear"]).values()
    other_seed = copy.deepcopy(run)
    other_seed.train.seed += 1
    compared, differing = compare.initial_weight_differences({"a": run, "b": copy.deepcopy(run)})
    assert compared == len(compare.initial_fingerprints(run)) and differing == {}
    compared, differing = compare.initial_weight_differences({"a": run, "b": other_seed})
    assert "embedding.weight" in differing and "layers.3.ffn.router.weight" in differing


def test_arms_share_the_initial_values_of_every_shared_parameter(parallel_state):
    runs = compare.build_arms("tiny", list(ARMS))
    compared, differing = compare.initial_weight_differences(runs)
    assert compared > 40
    assert differing == {}


# ----------------------------------------------------------------------------- sweep manifests
def test_sweep_manifest_expands_grid_and_entries():
    manifest = {"name": "t", "base": {"config": "tiny", "args": ["--train-iters", "5"], "set": {"train.lr": 1e-3}},
                "grid": {"arm": ["mla", "kimi-linear"], "seed": [1, 2]},
                "entries": [{"name": "wide", "set": {"model.hidden_size": 128}, "labels": {"arm": "kimi-linear"}}]}
    entries = sweep.expand(manifest)
    assert [e["name"] for e in entries] == ["mla-seed1", "mla-seed2", "kimi-linear-seed1", "kimi-linear-seed2", "wide"]
    first = entries[0]["argv"]
    assert first[:4] == ["--config", "tiny", "--seed", "1"]
    assert "model.layer_pattern=A" in first and "train.lr=0.001" in first and "--train-iters" in first
    assert entries[2]["labels"] == {"arm": "kimi-linear", "seed": 1}
    assert entries[4]["argv"][-2:] == ["--set", "model.hidden_size=128"]
    assert entries[0]["tokens_per_step"] == 4 * 64 and entries[0]["train_iters"] == 5


def test_sweep_submission_command_limits_concurrency(tmp_path, capsys):
    manifest = {"name": "arms", "base": {"config": "tiny"}, "grid": {"arm": list(ARMS), "seed": [1, 2]}}
    assert sweep.submit(manifest, tmp_path, max_concurrent=2, sbatch_args=["--time=5"], dry_run=True) is None
    command = capsys.readouterr().out.split()
    assert command[:4] == ["sbatch", "--parsable", "--array=0-5%2", "--job-name=arms"]
    assert command[4] == f"--output={tmp_path}/logs/%A_%a.log" and command[5] == "--time=5"
    assert command[6].endswith("launch/slurm/sweep.sbatch") and command[8] == str(tmp_path)
    assert not list(tmp_path.iterdir())  # a dry run submits and writes nothing


@pytest.mark.parametrize("bad,needle", [
    ({"base": {"config": "tiny", "args": ["--save", "x"]}, "entries": [{}]}, "--save is not allowed"),
    ({"base": {"config": "tiny"}, "entries": [{"sed": 1}]}, "unknown key(s) ['sed']"),
    ({"base": {"config": "tiny", "set": {"train.lrr": 1}}, "entries": [{}]}, "train.lrr"),
    ({"entries": [{"arm": "mla"}]}, "no config"),
    ({"base": {"config": "tiny"}, "grid": {"arm": ["transformer"]}}, "unknown arm 'transformer'"),
    ({"base": {"config": "tiny"}}, "no entries"),
])
def test_bad_sweep_manifests_are_refused_with_the_field(bad, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        sweep.expand({"name": "t", **bad})


# ----------------------------------------------------------------------------- the report
def _synthetic_run(folder, arm, seed, final_valid, rate, memory, with_valid=True, final_long=None, long_length=8192):
    """A run of 20 steps of 100 tokens; validation every 5 steps ending at ``final_valid``, and with
    ``final_long`` the long-document loss at the same steps ending there."""
    folder.mkdir(parents=True)
    (folder / "launch.json").write_text(json.dumps({"name": f"{arm}-{seed}", "labels": {"arm": arm, "seed": seed},
                                                    "tokens_per_step": 100, "train_iters": 20}))
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "loss": 9.0 - 0.1 * step + 0.01 * seed, "tokens_per_s": rate + step % 3,
                      "memory/peak_allocated_gib": memory * step / 20})
        if with_valid and step % 5 == 0:
            lines.append({"step": step, "consumed_tokens": step * 100, "valid/loss": final_valid + (20 - step) * 0.05})
            if final_long is not None:
                lines[-1].update({"valid_long/loss": final_long + (20 - step) * 0.04,
                                  "valid_long/min_length": long_length})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder


def test_report_plots_and_tabulates_known_numbers(tmp_path):
    import matplotlib.image

    finals = {("mla", 1): 3.50, ("mla", 2): 3.60, ("kimi-linear", 1): 3.20, ("kimi-linear", 2): 3.26}
    rates = {"mla": 1000.0, "kimi-linear": 800.0}
    memory = {"mla": 10.0, "kimi-linear": 12.5}
    dirs = [_synthetic_run(tmp_path / "runs" / f"{arm}-{seed}", arm, seed, value, rates[arm], memory[arm])
            for (arm, seed), value in finals.items()]
    png, md = write_report(dirs, progress=False)
    assert png == tmp_path / "runs" / "comparison.png" and md.parent == png.parent
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.read_text().splitlines() if line.startswith("| ") and "---" not in line}
    for arm in ("mla", "kimi-linear"):
        values = [finals[(arm, 1)], finals[(arm, 2)]]
        seeds, tokens, loss, rate, mem = table[arm]
        assert seeds == "2" and tokens == "2,000"
        assert loss == f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
        # tokens/s: median of rate + step % 3 over steps 3..20 -> rate + 1
        assert rate == f"{rates[arm] + 1:,.0f}"
        assert mem == f"{memory[arm]:.2f} (GPU)"
    assert list(table)[1:] == ["mla", "kimi-linear"]  # arms in the paper's order
    assert "final validation loss" in md.read_text() and "Note:" not in md.read_text()
    image = matplotlib.image.imread(png)
    assert image.shape[0] >= 600 and image.shape[1] >= 900
    assert image[..., :3].std() > 0.05  # curves and bars, not a blank canvas


def test_report_shows_the_long_document_loss_where_runs_have_it(tmp_path):
    import matplotlib.image

    finals = {("mla", 1): (3.50, 3.10), ("mla", 2): (3.60, 3.30), ("kimi-linear", 1): (3.20, 2.70),
              ("kimi-linear", 2): (3.26, None)}  # the last run was trained without --eval-long
    dirs = [_synthetic_run(tmp_path / f"{arm}-{seed}", arm, seed, valid, 1000.0, 10.0, final_long=long)
            for (arm, seed), (valid, long) in finals.items()]
    png, md = write_report(dirs, progress=False)
    text = md.read_text()
    assert "| arm | seeds | tokens | final validation loss | final long-document loss (≥ 8,192 tokens) |" in text
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert table["mla"][3] == f"{statistics.mean([3.10, 3.30]):.4f} ± {statistics.stdev([3.10, 3.30]):.4f}"
    assert table["kimi-linear"][3] == "2.7000 (1 seed)"
    assert table["kimi-linear"][2] == f"{statistics.mean([3.20, 3.26]):.4f} ± {statistics.stdev([3.20, 3.26]):.4f}"
    assert "seed 1, validation loss 3.5000 at step 20, long-document loss 3.1000 at step 20" in text
    assert "Note:" not in text
    assert matplotlib.image.imread(png).shape[1] >= 1500  # a third column of panels

    # thresholds that differ are named, not averaged silently
    other = _synthetic_run(tmp_path / "other" / "mla-3", "mla", 3, 3.4, 1000.0, 10.0, final_long=3.0,
                           long_length=4096)
    _, md = write_report([*dirs, other], out=tmp_path / "mixed", progress=False)
    assert "thresholds differ (4096, 8192 tokens)" in md.read_text()
    assert "long-document loss (≥ 4,096 / 8,192 tokens)" in md.read_text()


def test_sweep_summary_shows_each_tasks_losses(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "queue_states", lambda job: {})  # nothing left in the queue
    entries = [{"name": "mla-seed1"}, {"name": "kimi-linear-seed1"}, {"name": "gdn-h-seed1"}]
    (tmp_path / "7.json").write_text(json.dumps({"entries": entries}))
    _synthetic_run(tmp_path / "7_0", "mla", 1, 3.5, 1000.0, 10.0, final_long=3.1)
    _synthetic_run(tmp_path / "7_1", "kimi-linear", 1, 3.2, 1000.0, 10.0)
    rows = sweep.task_rows(tmp_path, "7")
    assert [(r["task"], r["step"], r["valid_loss"], r["long_loss"]) for r in rows] == [
        (0, 20, 3.5, 3.1), (1, 20, 3.2, None), (2, None, None, None)]
    lines = sweep.format_rows(rows).splitlines()
    assert lines[0].split()[-3:] == ["valid", "long", "port"]
    assert lines[1].split()[-3:] == ["3.5000", "3.1000", "-"]
    assert lines[2].split()[-3:] == ["3.2000", "-", "-"]
    assert lines[3].split()[2] == "NOT"  # NOT STARTED


def test_runs_get_their_own_gpus_or_share_one_when_asked():
    assert [compare.visible_devices(slot, 1, 8) for slot in range(3)] == ["0", "1", "2"]
    assert [compare.visible_devices(slot, 2, 8) for slot in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert [compare.visible_devices(slot, 1, 1, runs_per_gpu=6) for slot in range(6)] == ["0"] * 6
    assert [compare.visible_devices(slot, 1, 2, runs_per_gpu=3) for slot in range(6)] == ["0"] * 3 + ["1"] * 3
    with pytest.raises(ConfigError, match="has 1.*--runs-per-gpu"):
        compare.visible_devices(1, 1, 1)
    with pytest.raises(ConfigError, match="has 1"):
        compare.visible_devices(6, 1, 1, runs_per_gpu=6)
    with pytest.raises(ConfigError, match="--nproc-per-node 1"):
        compare.visible_devices(0, 2, 4, runs_per_gpu=2)


def test_eval_long_sets_the_threshold_for_every_arm(tmp_path, capsys):
    base = ["--config", "tiny", "--dry-run", "--skip-init-check", "--root", str(tmp_path),
            "--set", "train.eval_interval=5"]
    assert compare.main([*base, "--eval-long"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "launch/pretrain.py" in line]
    assert len(commands) == 3 and all("--set train.eval_long_min_length=8192" in c for c in commands)
    assert compare.main([*base, "--eval-long", "300"]) == 0
    assert "--set train.eval_long_min_length=300" in capsys.readouterr().out
    # without validation there is nothing to run it with
    assert compare.main(["--config", "tiny", "--dry-run", "--skip-init-check", "--eval-long"]) == 2
    assert "--eval-long-min-length=8192 needs --eval-interval N" in capsys.readouterr().err


def test_report_falls_back_to_training_loss_with_a_note(tmp_path):
    dirs = [_synthetic_run(tmp_path / f"r{seed}", "mla", seed, 3.0, 100.0, 1.0, with_valid=False) for seed in (1, 2)]
    _, md = write_report(dirs, out=tmp_path / "out", progress=False)
    text = md.read_text()
    assert "Note: not every run has validation records" in text
    final = [9.0 - 0.1 * 20 + 0.01 * s for s in (1, 2)]
    assert f"| mla | 2 | 2,000 | {statistics.mean(final):.4f} ± {statistics.stdev(final):.4f} |" in text
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 20_000


def test_report_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert compare.main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_here_concurrently_then_reports_and_a_rerun_skips_finished_runs(tmp_path, capsys):
    from data import ensure_default_dataset

    cache = ROOT / "cache" / "data"
    ensure_default_dataset(cache)
    argv = ["--config", "tiny", "--arms", "mla,kimi-linear", "--concurrent", "2", "--skip-init-check", "--root",
            str(tmp_path), "--set", "train.train_iters=4", "--set", f"train.data_cache_dir={cache}"]
    assert compare.main(argv) == 0, capsys.readouterr()
    for arm, pattern in (("mla", "A"), ("kimi-linear", "KKKA")):
        folder = tmp_path / f"{arm}-seed1234"
        assert [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
        meta = json.loads((folder / "iter_0000004" / "meta.json").read_text())
        assert meta["model"]["layer_pattern"] == pattern and meta["train"]["seed"] == 1234
    table = (tmp_path / "comparison.md").read_text()
    assert "| mla | 1 | 1,024 |" in table and "| kimi-linear | 1 | 1,024 |" in table
    logs = {p: p.stat().st_size for p in tmp_path.glob("*/train.log")}
    assert compare.main(argv) == 0  # finished runs are not started again
    assert {p: p.stat().st_size for p in tmp_path.glob("*/train.log")} == logs


@pytest.mark.slow
def test_ctrl_c_saves_the_runs_and_the_same_command_resumes_them(tmp_path):
    """SIGINT to the whole process group (Ctrl-C in a terminal, `timeout -s INT` in
    benchmarks/gpu_compare.sh) stops the runs through the runner, so each saves where it is; the same
    command then resumes them from those saves instead of step 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from data import ensure_default_dataset

    cache = ROOT / "cache" / "data"
    ensure_default_dataset(cache)
    cmd = [sys.executable, str(ROOT / "launch" / "compare.py"), "--config", "tiny", "--arms", "mla,kimi-linear",
           "--concurrent", "2", "--skip-init-check", "--root", str(tmp_path), "--set", "train.train_iters=100000",
           "--set", "train.save_interval=100000", "--set", f"train.data_cache_dir={cache}"]
    runner = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    folders = [tmp_path / f"{arm}-seed1234" for arm in ("mla", "kimi-linear")]
    steps = lambda folder: [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()
                            if '"step"' in x] if (folder / "metrics.jsonl").exists() else []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not all(len(steps(f)) >= 3 for f in folders) and runner.poll() is None:
            time.sleep(0.5)
        assert all(len(steps(f)) >= 3 for f in folders), [(f / "train.log").read_text()[-2000:] for f in folders]
    finally:  # also when the runs were too slow: the runner must stop them (they run 100,000 steps)
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGINT)
    assert runner.wait(timeout=240) == 130  # "interrupted: ... the same command resumes them"
    saved = {}
    for folder in folders:
        checkpoints = sorted(folder.glob("iter_*"))
        assert checkpoints, (folder / "train.log").read_text()[-2000:]
        saved[folder] = int(checkpoints[-1].name.split("_")[1])
        assert saved[folder] >= 3
    resumed = subprocess.run(cmd[:-6] + ["--set", "train.train_iters=" + str(max(saved.values()) + 2), "--set",
                                         f"train.data_cache_dir={cache}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for folder in folders:
        assert f"at step {saved[folder]}" in (folder / "train.log").read_text()  # resumed, not restarted
        assert steps(folder)[-1] == max(saved.values()) + 2
