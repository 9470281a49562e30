"""Reading a value the GPU computes without waiting for the work queued after it.

``tensor.cpu()`` returns only when everything queued on the stream before it has run, so a read at
the end of a step makes the host stand still while the GPU finishes the optimizer's kernels, work
the read does not need; the host then builds the next step's batch with the GPU idle. ``HostCopy``
queues the copy (into pinned memory) where the value is ready and records an event right behind it:
reading waits for that event only, and the work queued after it keeps the GPU busy meanwhile.
"""

from __future__ import annotations

import torch


class HostCopy:
    """A copy of ``tensor`` to the host, started now; ``get()`` (or ``float()`` of a one-element
    tensor) waits for the copy alone."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        self._event = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # a copy, so later in-place changes of the tensor do not show
            self._host = tensor.clone()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host

    def __float__(self) -> float:
        return float(self.get())
