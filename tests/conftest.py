"""Shared test setup: one thread per process (CI has 2 cores). The repository root is on sys.path
through pytest's ``pythonpath`` setting (pyproject.toml), so tests import ``tests.helpers``."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--kda-launch", default="",
                     help="launch overrides of the Triton KDA kernels for the kernel tests, kernel[.few].option=N,... "
                          "(kernels/kda/options.py; for GPU experiments)")
    parser.addoption("--kda-diag-decay-clamp", type=float, default=0.0,
                     help="KDAOptions.diag_decay_clamp of the kernel tests (0: exact diagonal tiles)")


def pytest_sessionfinish(session, exitstatus):
    """Tear down a process group the tests started in this process (``parallel.state.initialize``):
    an NCCL group left to the interpreter's exit can block it after the last test has passed."""
    import sys

    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from parallel import state

            state.destroy()
