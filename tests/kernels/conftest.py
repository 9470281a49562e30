"""KDA kernel tests: run Triton in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is set here,
before the kernel modules are imported by the test files.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
