"""The SLURM scripts on a real SLURM (scripts/setup_slurm.sh starts a one-node cluster; CI runs it
before the tests): the tiny comparison submitted as one job array (3 arms, CPU, one process per
task), every task's run folder, metrics and rendezvous port; then stops of two running tasks:

- `scancel --batch --signal=USR1` (what `--signal=B:USR1@300` sends before the time limit): the
  batch script passes the stop to the ranks, they save at the next step boundary, and the job
  requeues itself;
- `scancel --signal=USR1` (every process of the job's steps): the ranks save and exit 0, and the
  test requeues the task with `scontrol requeue`.

Both tasks must resume from the checkpoint of their stop and finish. Requeued jobs wait about two
minutes before SLURM starts them again (their begin time); the tests move that to now.

Then launch/slurm/pretrain.sbatch on two nodes: a second, private cluster whose two slurmd daemons
run on this machine (n1, n2; Debian's Slurm allows several per host): torchrun's c10d rendezvous
on the first node, a stop delivered to the ranks of both nodes, requeue and resume.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 100  # long enough (several seconds) for a stop to arrive while the task trains
TIMEOUT = 420  # seconds for the whole array, stops and resumes included

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="SLURM is not installed (sbatch not found); bash scripts/setup_slurm.sh sets it up")


def _run(*cmd, check=True, timeout=60):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def _queue(job: str) -> dict[int, str]:
    out = _run("squeue", "-h", "-r", "-j", job, "-o", "%K %T", check=False).stdout
    return {int(k): v for k, v in (line.split() for line in out.splitlines() if line.strip())}


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().startswith("{")]


class Array:
    """The submitted array: its folders, logs and a diagnosis for failure messages."""

    def __init__(self, root: Path, job: str):
        self.root, self.job = root, job

    def folder(self, task: int) -> Path:
        return self.root / f"{self.job}_{task}"

    def log(self, task: int) -> str:
        path = self.root / "logs" / f"{self.job}_{task}.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def diagnosis(self) -> str:
        parts = [f"queue: {_queue(self.job)}"]
        for task in range(3):
            events = self.folder(task) / "slurm.jsonl"
            parts.append(f"--- task {task}: steps {(_steps(self.folder(task)) or [None])[-1]}, events:\n"
                         + (events.read_text() if events.exists() else "(none)")
                         + "\n--- log (last 40 lines):\n" + "\n".join(self.log(task).splitlines()[-40:]))
        return "\n".join(parts)

    def wait(self, predicate, what: str, timeout: float, deadline: float):
        end = min(time.time() + timeout, deadline)
        while time.time() < end:
            value = predicate()
            if value:
                return value
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}\n{self.diagnosis()}")


@pytest.fixture
def cluster():
    ping = _run("scontrol", "ping", check=False)
    if "UP" not in ping.stdout:
        pytest.fail(f"slurmctld is not responding ({ping.stdout.strip()} {ping.stderr.strip()}); "
                    "run bash scripts/setup_slurm.sh first")
    state = _run("sinfo", "-h", "-o", "%T").stdout.split()
    if not any(s.startswith(("idle", "mixed", "allocated")) for s in state):
        pytest.fail(f"no SLURM node is up (sinfo: {state}); run bash scripts/setup_slurm.sh")


@pytest.mark.slow
def test_comparison_array_stop_requeue_and_resume(tmp_path, cluster):
    from data import ensure_default_dataset

    cache = ROOT / "cache" / "data"
    ensure_default_dataset(cache)  # built once here, not by three tasks at a time
    root = tmp_path / "compare"
    submit = subprocess.run(
        [sys.executable, "launch/compare.py", "--config", "tiny", "--seeds", "1", "--slurm", "--skip-init-check",
         "--root", str(root), "--set", f"train.train_iters={STEPS}", "--set", f"train.data_cache_dir={cache}",
         "--set", "train.log_interval=10", "--sbatch-arg=--gpus-per-node=0", "--sbatch-arg=--cpus-per-task=1",
         "--sbatch-arg=--time=15"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job = re.search(r"submitted array job (\d+)", submit.stdout).group(1)
    array = Array(root, job)
    deadline = time.time() + TIMEOUT
    try:
        # two tasks train at once on the 2-CPU node; stop both once they have logged a step, before
        # any checkpoint (the first is the last step)
        batch_stop, step_stop = 0, 1
        stops = {batch_stop: ["scancel", "--batch", "--signal=USR1", f"{job}_{batch_stop}"],
                 step_stop: ["scancel", "--signal=USR1", f"{job}_{step_stop}"]}

        def stop_when_training():
            for task in [t for t in stops if _steps(array.folder(t))]:
                _run(*stops.pop(task))
            return not stops

        array.wait(stop_when_training, "tasks 0 and 1 to train", 240, deadline)

        def stopped(task):
            events = [json.loads(x) for x in (array.folder(task) / "slurm.jsonl").read_text().splitlines()]
            return any(e["event"] == "end" for e in events)

        for task in (batch_stop, step_stop):
            array.wait(lambda t=task: stopped(t), f"task {task} to save and stop", 120, deadline)
        array.wait(lambda: _queue(job).get(step_stop) is None, f"task {step_stop} to leave the queue", 60, deadline)
        _run("scontrol", "requeue", f"{job}_{step_stop}")

        def started_again():  # requeued tasks start about two minutes later; bring that forward
            for task in (batch_stop, step_stop):
                if _queue(job).get(task) == "PENDING":
                    _run("scontrol", "update", f"JobId={job}_{task}", "StartTime=now", check=False)
            return not _queue(job)

        array.wait(started_again, "every task to finish", TIMEOUT, deadline)
    finally:
        _run("scancel", job, check=False)

    ports = []
    for task, arm in enumerate(("mla", "gdn-h", "kimi-linear")):
        folder = array.folder(task)
        launch = json.loads((folder / "launch.json").read_text())
        assert launch["labels"] == {"arm": arm, "seed": 1234}, array.diagnosis()
        events = [json.loads(x) for x in (folder / "slurm.jsonl").read_text().splitlines()]
        starts = [e for e in events if e["event"] == "start"]
        ports.append(starts[0]["port"])
        assert events[-1] == {**events[-1], "event": "end", "exit_code": 0}, array.diagnosis()
        metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == STEPS and math.isfinite(metrics[-1]["loss"]), array.diagnosis()
        assert (folder / f"iter_{STEPS:07d}" / "meta.json").exists(), array.diagnosis()
        assert json.loads((folder / f"iter_{STEPS:07d}" / "meta.json").read_text())["model"]["layer_pattern"] == {
            "mla": "A", "gdn-h": "GGGA", "kimi-linear": "KKKA"}[arm]
        log = array.log(task)
        if task in (batch_stop, step_stop):
            stop = re.search(r"stop requested \([^)]*\): saving at step (\d+)", log)
            assert stop, f"task {task} did not stop\n{array.diagnosis()}"
            step = int(stop.group(1))
            assert 0 < step < STEPS
            assert f"resumed from {folder}/iter_{step:07d} at step {step}" in log, array.diagnosis()
            assert len(starts) == 2 and starts[1]["restart_count"] == "1", array.diagnosis()
        else:
            assert "stop requested" not in log and len(starts) == 1, array.diagnosis()
    assert [e for e in _events(array.folder(batch_stop)) if e["event"] == "end"][0]["requeue"] == 1
    assert [e for e in _events(array.folder(step_stop)) if e["event"] == "end"][0]["requeue"] == 0
    assert len(set(ports)) == 3, f"rendezvous ports repeat: {ports}"

    summary = _run(sys.executable, ROOT / "launch" / "sweep.py", "summary", root, "--job", job).stdout
    rows = [line.split() for line in summary.splitlines()[2:]]
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        (str(task), f"{arm}-seed1234", "COMPLETED", f"{STEPS}/{STEPS}")
        for task, arm in enumerate(("mla", "gdn-h", "kimi-linear"))], summary
    assert [r[3] for r in rows] == ["1", "1", "0"], summary  # restarts


def _events(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "slurm.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- two nodes
TWO_NODE_CONF = """ClusterName=twonode
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=1
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=1
PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def two_nodes(tmp_path, cluster):
    """A private two-node cluster (its own slurm.conf, ports and state); yields the environment
    that points SLURM's commands at it, and stops it (jobs first) afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the two-node test cluster needs root (slurmd runs jobs as their user)")
    folder = tmp_path / "twonode"
    for sub in ("state", "spool-n1", "spool-n2"):
        (folder / sub).mkdir(parents=True)
    ctld, slurmd, n1, n2 = _free_ports(4)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    conf = folder / "slurm.conf"
    conf.write_text(TWO_NODE_CONF.format(host=host, ctld_port=ctld, slurmd_port=slurmd, dir=folder, n1_port=n1,
                                         n2_port=n2))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [["slurmctld", "-f", conf], ["slurmd", "-f", conf, "-N", "n1"], ["slurmd", "-f", conf, "-N", "n2"]]
    try:
        for command in daemons:
            subprocess.run([str(c) for c in command], env=env, check=True, timeout=30)
        end = time.time() + 60
        while time.time() < end:
            states = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True, text=True).stdout
            if states.split() == ["idle", "2"]:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the two-node cluster did not come up: sinfo {states!r}\n"
                        + "\n".join(p.read_text()[-2000:] for p in folder.glob("*.log")))
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)
        end = time.time() + 60  # let the jobs finish before their daemons go
        while time.time() < end and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                    text=True).stdout.strip():
            time.sleep(1)
        for pid_file in folder.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass


@pytest.mark.slow
def test_pretrain_sbatch_on_two_nodes_stops_requeues_and_resumes(tmp_path, two_nodes):
    from data import ensure_default_dataset

    cache = ROOT / "cache" / "data"
    ensure_default_dataset(cache)
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    steps = 60
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--time=10", f"--output={log}",
         "launch/slurm/pretrain.sbatch", "--config", "tiny", "--train-iters", str(steps), "--log-interval", "5",
         "--set", f"train.data_cache_dir={cache}"],
        cwd=ROOT, env={**two_nodes, "RUN_DIR": str(run_dir), "KIMI_REPO": str(ROOT), "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    def queue():
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=two_nodes, capture_output=True,
                              text=True).stdout.strip()

    def diagnosis():
        events = run_dir / "slurm.jsonl"
        return (f"queue: {queue()!r}\nevents:\n{events.read_text() if events.exists() else '(none)'}\nlog:\n"
                + ("\n".join(log.read_text(errors='replace').splitlines()[-60:]) if log.exists() else "(none)"))

    def wait(predicate, what, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                return
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}\n{diagnosis()}")

    try:
        wait(lambda: _steps(run_dir), "the first step", 240)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=two_nodes, check=True, timeout=30)
        wait(lambda: (run_dir / "slurm.jsonl").exists() and any(e["event"] == "end" for e in _events(run_dir)),
             "the stop", 120)

        def finished():
            if queue() == "PENDING":  # requeued: start now instead of in two minutes
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=two_nodes,
                               capture_output=True, timeout=30)
            return queue() == ""

        wait(finished, "the resumed job to finish", 300)
    finally:
        subprocess.run(["scancel", job], env=two_nodes, capture_output=True, timeout=30)

    text = log.read_text(errors="replace")
    starts = [e for e in _events(run_dir) if e["event"] == "start"]
    assert len(starts) == 2 and all(e["nodes"] == 2 and e["node_list"] == "n[1-2]" for e in starts), diagnosis()
    assert all(e["master"] == "127.0.0.1" for e in starts)  # the first node's address
    for node in ("n1", "n2"):  # the stop reached a rank on every node
        assert re.search(rf"\[{node}\] SIGUSR1 sent to rank process \d+", text), diagnosis()
    stop = re.search(r"stop requested \([^)]*\): saving at step (\d+)", text)
    assert stop and 0 < int(stop.group(1)) < steps, diagnosis()
    step = int(stop.group(1))
    assert f"resumed from {run_dir}/iter_{step:07d} at step {step}" in text, diagnosis()
    assert _steps(run_dir)[-1] == steps and (run_dir / f"iter_{steps:07d}" / "meta.json").exists(), diagnosis()
    assert _events(run_dir)[-1]["exit_code"] == 0
