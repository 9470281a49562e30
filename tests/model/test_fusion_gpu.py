"""The fused (compiled) norms and KDA short convolution on a GPU equal their eager form in bf16."""

import pytest
import torch

from model import fusion
from tests.model.test_fusion import check_fused_equals_eager

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fused_functions_match_eager_on_gpu():
    torch._dynamo.reset()
    fusion.enable(True)
    try:
        check_fused_equals_eager("cuda", torch.bfloat16, 2e-2)
    finally:
        fusion.enable(False)
