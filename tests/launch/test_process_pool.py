"""launch/process_pool.py: the slot limit holds (intervals recorded by the children themselves), the
slot's CUDA_VISIBLE_DEVICES reaches the child, both failure policies, and that stopping (a failure
or Ctrl-C) sends SIGTERM to the children still running and waits for them."""

import os
import signal
import subprocess
import sys
import time

import pytest

from launch.process_pool import REPO, Command, CommandFailed, ProcessPool

# a child that records that SIGTERM reached it, says it is ready, then waits to be stopped
SLEEPER = """
import pathlib, signal, sys, time
def stopped(*_):
    pathlib.Path({marker!r}).write_text("terminated")
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
pathlib.Path({ready!r}).touch()
time.sleep(60)
"""


def python(code: str, log) -> Command:
    return Command([sys.executable, "-c", code], log)


def test_no_more_children_than_slots_run_at_once(tmp_path):
    # each child writes its own (start, end) times; with 2 slots no instant lies inside 3 intervals
    commands = [python(f"import time, pathlib; t = time.time(); time.sleep(0.8); "
                       f"pathlib.Path({str(tmp_path / f'{i}.times')!r}).write_text(f'{{t}} {{time.time()}}')",
                       tmp_path / f"{i}.log") for i in range(5)]
    assert ProcessPool(2, poll_seconds=0.05).run(commands) == []
    intervals = [tuple(map(float, (tmp_path / f"{i}.times").read_text().split())) for i in range(5)]
    overlap = [sum(start <= t < end for start, end in intervals) for t, _ in intervals]
    assert max(overlap) == 2


def test_each_slot_gets_its_devices_and_one_omp_thread(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "inherited")
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'])"
    slots = {}
    commands = [python(show, tmp_path / f"{i}" / "log.txt") for i in range(3)]
    pool = ProcessPool(3, lambda slot: None if slot == 2 else f"{slot * 2},{slot * 2 + 1}", poll_seconds=0.05)
    pool.run(commands, on_start=lambda command, slot: slots.setdefault(command.log, slot))
    assert sorted(slots.values()) == [0, 1, 2]
    expected = {0: "0,1 1", 1: "2,3 1", 2: "inherited 1"}  # None: the variable is left as it is
    for command in commands:
        assert command.log.read_text().strip() == expected[slots[command.log]]
    ProcessPool(1, poll_seconds=0.05).run(commands[:1])  # a rerun appends to the log (no devices: inherited)
    assert commands[0].log.read_text().splitlines() == [expected[slots[commands[0].log]], "inherited 1"]


def test_failures_are_counted_and_the_others_go_on(tmp_path):
    commands = [python(f"print('run {i}'); raise SystemExit({code})", tmp_path / f"{i}.log")
                for i, code in enumerate([0, 3, 0, 4])]
    ended = []
    failed = ProcessPool(1, poll_seconds=0.05).run(commands, on_exit=ended.append)
    assert [e.returncode for e in failed] == [3, 4] and [e.command for e in failed] == [commands[1], commands[3]]
    assert [e.command for e in ended] == commands  # one slot: in order, every one ran
    assert all(e.slot == 0 and e.seconds >= 0 for e in ended)
    assert (tmp_path / "2.log").read_text() == "run 2\n"


def test_the_first_failure_stops_the_others_with_sigterm(tmp_path):
    marker, ready = tmp_path / "sleeper.stopped", tmp_path / "sleeper.ready"
    sleeper = python(SLEEPER.format(marker=str(marker), ready=str(ready)), tmp_path / "sleeper.log")
    failing = python(f"import os, sys, time\nwhile not os.path.exists({str(ready)!r}): time.sleep(0.02)\n"
                     "print('something broke', file=sys.stderr); sys.exit(5)", tmp_path / "failing.log")
    never = python("pass", tmp_path / "never.log")
    started = time.time()
    with pytest.raises(CommandFailed) as info:
        ProcessPool(2, poll_seconds=0.05, stop_at_first_failure=True).run([sleeper, failing, never])
    assert time.time() - started < 30  # the sleeper did not run its minute out
    assert info.value.exited.command is failing and info.value.exited.returncode == 5
    assert info.value.log_tail() == "something broke"
    assert marker.read_text() == "terminated"  # SIGTERM reached it, and it was waited for
    assert not never.log.exists()  # nothing new starts after the failure


def test_an_interrupt_stops_the_children_and_propagates(tmp_path):
    marker, ready = tmp_path / "sleeper.stopped", tmp_path / "sleeper.ready"
    sleeper = python(SLEEPER.format(marker=str(marker), ready=str(ready)), tmp_path / "sleeper.log")

    def interrupt_when_ready(running):
        assert running == [sleeper]
        if ready.exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ProcessPool(1, poll_seconds=0.05).run([sleeper], on_tick=interrupt_when_ready)
    assert marker.read_text() == "terminated"


# a pool in a process of its own, as `launch/compare.py` runs under a terminal or `timeout -s INT`
POOL_PARENT = """
import pathlib, sys
from launch.process_pool import Command, ProcessPool
ProcessPool(1, poll_seconds=0.05).run([Command([sys.executable, "-c", {child!r}], pathlib.Path({log!r}))])
"""


@pytest.mark.parametrize("sig,inherited", [(signal.SIGINT, signal.SIG_DFL), (signal.SIGINT, signal.SIG_IGN),
                                            (signal.SIGTERM, signal.SIG_DFL)],
                         ids=["sigint", "sigint-inherited-as-ignored", "sigterm"])
def test_a_signal_to_the_process_group_reaches_only_the_pool(tmp_path, sig, inherited):
    # Ctrl-C and `timeout` signal the whole process group; a training run hit by SIGINT directly
    # would die without saving, so the child must see only the pool's SIGTERM. A script's background
    # job inherits SIGINT ignored; `timeout` and `kill` send SIGTERM: the pool stops on both
    marker, ready = tmp_path / "sleeper.stopped", tmp_path / "sleeper.ready"
    child = SLEEPER.format(marker=str(marker), ready=str(ready)).replace(
        "signal.signal(signal.SIGTERM", "signal.signal(signal.SIGINT, lambda *_: (pathlib.Path("
        f"{str(marker)!r}).write_text('interrupted'), sys.exit(1)))\nsignal.signal(signal.SIGTERM")
    parent = subprocess.Popen([sys.executable, "-c", POOL_PARENT.format(child=child, log=str(tmp_path / "c.log"))],
                              start_new_session=True, stderr=(tmp_path / "parent.log").open("w"), cwd=REPO,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
    deadline = time.time() + 60
    while not ready.exists() and parent.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), (tmp_path / "parent.log").read_text()
    os.killpg(parent.pid, sig)
    assert parent.wait(timeout=60) != 0  # the pool's KeyboardInterrupt propagates
    assert marker.read_text() == "terminated"


def test_a_pool_needs_a_slot():
    with pytest.raises(ValueError, match="slots=0"):
        ProcessPool(0)
