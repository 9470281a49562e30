"""Run megatron-core on a machine without a GPU (gloo ranks, CI, laptops).

megatron-core assumes CUDA at a handful of call sites (measured in ../shared/MEGATRON_ON_CPU.md of
the design notes): buffers allocated on ``torch.cuda.current_device()``, the RNG tracker forking
the CUDA generator, CUDA streams and events in the MoE dispatchers, ``device="cuda"`` literals in
the pipeline schedules, ``Tensor.type()`` checks in the optimizer and uneven all-gathers that gloo
rejects. ``apply()`` patches exactly those, and only when no GPU is present; on a GPU it does
nothing. It is idempotent.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_APPLIED = False


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):
        return "cpu"
    return device


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments and ``.cuda()`` / ``.to("cuda")`` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to" and len(args) > 1 and not isinstance(args[1], torch.Tensor):
            args = (args[0], _cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # the CPU generator stands in for the CUDA one (torch.manual_seed itself calls into torch.cuda)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()


def _patch_moe_cpu_transfers() -> None:
    """Upstream converts split sizes to numpy only for CUDA tensors; gloo's all_to_all needs lists."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if tensor is None:
            return None
        tensor = tensor.cpu()
        return tensor.numpy() if as_numpy else tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_collectives() -> None:
    """gloo's all_gather needs equal sizes; NCCL does not. Pad to the largest, gather, slice."""
    original_all_gather = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = [t.shape for t in tensor_list]
        if all(s == tensor.shape for s in shapes):
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        max_rows = max(s[0] for s in shapes)
        padded = torch.zeros((max_rows, *tensor.shape[1:]), dtype=tensor.dtype)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        original_all_gather(gathered, padded, group=group)
        for out, full in zip(tensor_list, gathered):
            out.copy_(full[: out.shape[0]])
        return None

    dist.all_gather = all_gather


def _patch_tensor_type() -> None:
    """megatron's optimizer asserts CUDA tensor type names; report the CUDA names for CPU tensors."""
    original_type = torch.Tensor.type
    names = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    def tensor_type(self, *args, **kwargs):
        if args or kwargs:
            return original_type(self, *args, **kwargs)
        name = original_type(self)
        return names.get(name, name)

    torch.Tensor.type = tensor_type


def apply(force: bool = False) -> bool:
    """Patch megatron-core for CPU execution when no GPU is present. Returns True if applied."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_moe_cpu_transfers()
    _patch_uneven_collectives()
    _patch_tensor_type()
    # megatron fuses small ops with torch.compile; on a CPU that only adds compile time (seconds
    # per process) and a C-compiler dependency
    torch._dynamo.config.disable = True
    _APPLIED = True
    return True


_DEVICE_MODE = None


def enable_device_rewrite() -> None:
    """Rewrite ``device="cuda"`` for the rest of the process (pipeline schedules need it).

    Kept separate from ``apply`` because a TorchFunctionMode adds overhead to every torch call.
    """
    global _DEVICE_MODE
    if _APPLIED and _DEVICE_MODE is None:
        _DEVICE_MODE = _CudaToCpuMode()
        _DEVICE_MODE.__enter__()


def is_applied() -> bool:
    return _APPLIED
