"""HostCopy: the host reads a value without waiting for the GPU work queued after it."""
import pytest
import torch

from train.host_copy import HostCopy


def test_cpu_copy_holds_the_value_at_creation():
    x = torch.tensor([1.5, 2.0], dtype=torch.float64)
    read = HostCopy(x)
    x.mul_(10)  # a later in-place change (the optimizer's, say) does not reach the read value
    assert read.get().tolist() == [1.5, 2.0]
    assert float(HostCopy(torch.tensor(3.25))) == 3.25


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_read_returns_before_the_work_queued_after_it():
    """A copy queued before ~1 s of GPU sleep: reading it returns while the sleep still runs (a
    plain .cpu() would wait for it), with the value from before the in-place change queued later."""
    x = torch.arange(4, dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    read = HostCopy(x * 2)
    torch.cuda._sleep(2_000_000_000)  # cycles: about a second at the H200's clock
    x.mul_(100)
    done = torch.cuda.Event()
    done.record()
    assert read.get().tolist() == [0.0, 2.0, 4.0, 6.0]
    assert not done.query(), "the read waited for the work queued after the copy"
    torch.cuda.synchronize()
