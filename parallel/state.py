"""Process groups: torch.distributed + megatron-core parallel_state, built once per process.

``ParallelDims`` holds the layout (data, tensor, pipeline, expert, context sizes) and validates it
against the world size; ``initialize`` starts torch.distributed (nccl on GPUs, gloo on CPUs, a
single-process group when not launched by torchrun) and megatron's model-parallel groups.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import cpu_compat


class ParallelConfigError(ValueError):
    """The parallel layout does not fit the world size or the model."""


@dataclass
class ParallelDims:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    world_size: int = 1

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline * self.context)

    def validate(self) -> "ParallelDims":
        for name, flag in (("tensor", "tensor-model"), ("pipeline", "pipeline-model"), ("expert", "expert-model"),
                           ("context", "context")):
            value = getattr(self, name)
            if value < 1:
                raise ParallelConfigError(f"--{flag}-parallel-size={value}: must be >= 1")
        model_parallel = self.tensor * self.pipeline * self.context
        if self.world_size % model_parallel:
            raise ParallelConfigError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size ({self.tensor}) x "
                f"--pipeline-model-parallel-size ({self.pipeline}) x --context-parallel-size ({self.context}) = "
                f"{model_parallel}; change the sizes or the number of processes"
            )
        if (self.data * self.context) % self.expert:
            raise ParallelConfigError(
                f"--expert-model-parallel-size={self.expert} must divide data x context parallel size "
                f"= {self.data * self.context}"
            )
        if self.virtual_pipeline and self.virtual_pipeline > 1 and self.pipeline == 1:
            raise ParallelConfigError(
                "--virtual-pipeline-model-parallel-size > 1 needs --pipeline-model-parallel-size > 1"
            )
        if self.sequence_parallel and self.tensor == 1:
            raise ParallelConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        return self


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 10) -> None:
    """Start torch.distributed from torchrun's environment, or as a single process."""
    if dist.is_initialized():
        return
    cpu_compat.apply()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ:  # launched by torchrun / srun
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a single process; leaves os.environ alone so that subprocesses do not inherit a port
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (rendezvous of local test and benchmark jobs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_seed = 1234


def initial_seed() -> int:
    """The seed of the last ``initialize`` (the default seed of model.model.build_model)."""
    return _seed


def initialize(dims: ParallelDims, seed: int = 1234) -> ParallelDims:
    """Initialise torch.distributed and megatron's parallel groups for ``dims``; seed the RNGs."""
    from megatron.core import parallel_state, tensor_parallel

    global _seed

    init_distributed()
    dims.world_size = dist.get_world_size()
    dims.validate()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tensor,
        pipeline_model_parallel_size=dims.pipeline,
        virtual_pipeline_model_parallel_size=dims.virtual_pipeline,
        context_parallel_size=dims.context,
        expert_model_parallel_size=dims.expert,
    )
    _seed = seed
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dims


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
