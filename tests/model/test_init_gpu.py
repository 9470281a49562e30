"""Initialisation does not depend on the device: parameters allocated on a GPU get the bits they
get on the CPU (model/init.py computes every value on the CPU)."""

import pytest
import torch

from tests.helpers.small_models import mixed_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_and_cpu_initialisation_are_bitwise_equal():
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=0)
    cpu = build_model(mixed_config(), seed=5)
    with torch.device("cuda"):
        cuda = build_model(mixed_config(), seed=5)
    assert all(p.is_cuda for p in cuda.parameters())
    for (name, p), q in zip(cpu.named_parameters(), cuda.parameters()):
        assert torch.equal(p, q.cpu()), name
