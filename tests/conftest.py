"""Shared test setup: one thread per process (CI has 2 cores). The repository root is on sys.path
through pytest's ``pythonpath`` setting (pyproject.toml), so tests import ``tests.helpers``."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--kda-launch", default="",
                     help="launch overrides of the Triton KDA kernels for the kernel tests, kernel[.few].option=N,... "
                          "(kernels/kda/options.py; for GPU experiments)")
