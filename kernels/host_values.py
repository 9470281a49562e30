"""Host copies of small device tensors whose values the host needs: document boundaries.

The host reads ``cu_seqlens`` to validate it, to size the varlen attention and to build the KDA
kernels' chunk tables. Reading a GPU tensor (``.tolist()``, ``.cpu()``) waits until the GPU has run
everything queued before it, so the next forward cannot be queued while the GPU still runs the
previous step's optimizer, and the GPU then idles while the host launches the forward's first
kernels. The values came from the host in the first place: whoever moves them to the GPU with
``to_device`` keeps the host tensor, and ``host_values`` returns it for that device tensor (as long
as the device tensor was not changed in place) instead of reading the GPU.
"""

from __future__ import annotations

import weakref

import torch

# id(device tensor) -> (weak reference, its version when recorded, the host tensor); an entry goes
# when its device tensor is freed
_KNOWN: dict[int, tuple] = {}


def to_device(host: torch.Tensor, device: torch.device | str, keep_host_copy: bool = False) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, the copy queued on the GPU's stream (pinned memory, no
    wait). ``keep_host_copy``: ``host_values`` of the result then reads nothing from the device."""
    device = torch.device(device)
    if host.device.type != "cpu":
        raise ValueError(f"to_device takes a CPU tensor, got one on {host.device}")
    if device.type == "cpu":
        return host
    placed = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    if keep_host_copy:
        remember(placed, host.clone())
    return placed


def remember(placed: torch.Tensor, host: torch.Tensor) -> None:
    """Record ``host`` as the values of device tensor ``placed``."""
    key = id(placed)
    _KNOWN[key] = (weakref.ref(placed, lambda _: _KNOWN.pop(key, None)), placed._version, host)


def host_values(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values on the host: itself on a CPU, the recorded copy of a tensor placed by
    ``to_device(..., keep_host_copy=True)``, otherwise a read of the device (which waits for its queue)."""
    if tensor.device.type == "cpu":
        return tensor
    hit = _KNOWN.get(id(tensor))
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    return tensor.cpu()
