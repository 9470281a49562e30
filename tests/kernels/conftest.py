"""KDA kernel tests: run Triton in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be on before `triton` itself is first imported (triton.language's own
helpers are @jit functions, interpreted or compiled from that moment on). pytest loads this
file before importing any test module of this folder or of later folders (model tests import
kernels.kda), so setting it here works for `pytest tests` and `pytest tests/kernels`; it does
not if triton was imported before pytest started.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        sys.stderr.write("tests/kernels: triton was imported before TRITON_INTERPRET=1 could be "
                         "set; the Triton kernel tests will fail on this CPU-only machine\n")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")


@pytest.fixture(scope="session")
def kda_options(request):
    """The KDAOptions the Triton kernel tests run with: the defaults, with pytest's --kda-launch and
    --kda-diag-decay-clamp overrides."""
    from kernels.kda import KDAOptions

    clamp = request.config.getoption("--kda-diag-decay-clamp")
    return KDAOptions(diag_decay_clamp=clamp).with_launch(request.config.getoption("--kda-launch"))
