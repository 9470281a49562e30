"""Initialisation does not depend on the parallel layout: every local tensor of every rank, under
TP, EP, PP, virtual PP and their combinations, is the corresponding slice of the single-process
model's tensor with the same seed, and routed experts are distinct at every expert-parallel size.

One 4-rank launch builds all layouts (tests/parallel/init_worker.py); the slices are written out
here from megatron's partitioning rules, independently of model/init.py.
"""

import re
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import torchrun
from tests.parallel import init_worker

EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts\.local_experts\.)(\d+)(\..*)$")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    path = tmp_path_factory.mktemp("init_layouts")
    torchrun(Path(init_worker.__file__), 4, path, timeout=600)
    return {layout: [torch.load(path / f"{layout}_rank{r}.pt") for r in range(4)] for layout in init_worker.LAYOUTS}


@pytest.fixture(scope="module")
def reference():
    """The single-process model (this process, TP = EP = PP = 1) with the worker's seed."""
    from model.model import build_model
    from parallel import state

    state.initialize(state.ParallelDims(), seed=init_worker.SEED)
    model = build_model(init_worker.config())
    return {name: t.detach() for name, t in [*model.named_parameters(), *model.named_buffers()]
            if isinstance(t, torch.nn.Parameter) or name.endswith("expert_bias")}


def global_name(name: str, record: dict) -> str:
    """Local expert i of expert-parallel rank r is global expert r * (experts per rank) + i."""
    match = EXPERT.match(name)
    if not match:
        return name
    rank, size = record["ep"]
    per_rank = init_worker.config().num_experts // size
    return f"{match[1]}{rank * per_rank + int(match[2])}{match[3]}"


def expected_slice(full: torch.Tensor, name: str, sharded: bool, dim: int, rank: int, size: int) -> torch.Tensor:
    if not sharded or size == 1:
        return full
    if name.endswith("linear_fc1.weight"):  # megatron's fused SwiGLU: [gate_r; up_r] of [gate; up]
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return full.chunk(size, dim=dim)[rank]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(init_worker.LAYOUTS))
def test_every_shard_is_the_slice_of_the_single_process_tensor(dumps, reference, layout):
    seen = set()
    for record in dumps[layout]:
        for name, (tensor, sharded, dim) in record["tensors"].items():
            full_name = global_name(name, record)
            rank, size = record["etp" if EXPERT.match(name) else "tp"]
            expected = expected_slice(reference[full_name], name, sharded, dim, rank, size)
            assert torch.equal(tensor, expected), (layout, name)
            seen.add(full_name)
    assert seen == set(reference), set(reference) ^ seen  # the ranks together hold every tensor


@pytest.mark.distributed
def test_experts_distinct_and_the_same_at_every_expert_parallel_size(dumps, reference):
    experts = {}  # (ep size, global name) -> tensor
    for layout, size in (("dp4", 1), ("ep2", 2), ("ep4", 4)):
        for record in dumps[layout]:
            assert record["ep"][1] == size
            for name, (tensor, _, _) in record["tensors"].items():
                if EXPERT.match(name):
                    experts[size, global_name(name, record)] = tensor
    names = sorted({name for _, name in experts})
    config = init_worker.config()
    assert len(names) == 2 * config.num_experts * (config.num_layers - config.first_k_dense)
    for name in names:
        assert torch.equal(experts[1, name], experts[2, name]) and torch.equal(experts[1, name], experts[4, name]), name
    for name in names:  # no two experts of a layer alike
        match = EXPERT.match(name)
        others = [n for n in names if EXPERT.match(n)[1] == match[1] and EXPERT.match(n)[3] == match[3] and n != name]
        for other in others:
            assert not torch.equal(experts[4, name], experts[4, other]), (name, other)
