"""torchrun worker of benchmarks/multi_gpu.py: the context-parallel KDA layer core over real ranks.

Every rank builds the same sequence of T tokens (two documents, the first spanning every CP slice
boundary but the last), takes its slice and runs the KDA core under context parallelism
(``ContextParallel.kda``: the short convolution with its halo, then the KDA op; on GPUs the Triton
kernels, in ``chunkwise`` mode with their fused pre-passes). Accuracy (fp32): every rank also runs
the whole sequence at CP=1 and compares its slice of the output and of the input gradients, and the
parameter gradients summed over the ranks (as the data/context-parallel gradient reduction does);
the relative error per tensor is the largest over the ranks. Speed (bf16 on GPUs): forward+backward
of the slice, the median of the slowest rank's times.

usage: torchrun --nproc-per-node P multi_gpu_cp_kda.py OUT.json MODE TOKENS HEADS HEAD_DIM [REPS]
"""

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from parallel.context import ContextParallel

CONV_WIDTH = 4
NAMES = ["o", "dq_proj", "dk_proj", "dv_proj", "dg", "dbeta_logits", "dq_conv", "dk_conv", "dv_conv",
         "dA_log", "ddt_bias"]


def boundaries(tokens: int) -> list[int]:
    return [0, tokens - tokens // 16 - 1, tokens]


def make_inputs(tokens, heads, head_dim, device, dtype):
    """Projections [T, H*D] x3, conv kernels [H*D, 1, W] x3, raw gate [T, H, D], beta logits [T, H],
    gate parameters (A_log [H], dt_bias [H*D]): the shapes the KDA layer hands to ``ContextParallel.kda``."""
    gen = torch.Generator().manual_seed(0)
    width = heads * head_dim
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale)
    projections = [rnd(tokens, width) for _ in range(3)]
    kernels = [rnd(width, 1, CONV_WIDTH, scale=0.5) for _ in range(3)]
    g, beta_logits = rnd(tokens, heads, head_dim), rnd(tokens, heads)
    a_log = torch.empty(heads).uniform_(1, 16, generator=gen).log()
    dt_bias = rnd(width, scale=0.5) - 1.0
    w = rnd(1, tokens, heads, head_dim)
    data = [x.to(device, dtype) for x in (*projections, g, beta_logits)]
    params = [x.to(device, dtype) for x in kernels] + [a_log.to(device), dt_bias.to(device)]
    return data, params, w.to(device, dtype)


def context(rank, size, mode, tokens, group):
    local = tokens // size
    cu = boundaries(tokens)
    starts = [x - rank * local for x in cu if rank * local < x < (rank + 1) * local]
    return ContextParallel(group=group, rank=rank, size=size, mode=mode, batch_size=1, local_length=local,
                           cu_seqlens=torch.tensor([0, *starts, local], dtype=torch.int32),
                           global_cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def forward_backward(cp, data, params, w, head_dim):
    """Output and gradients of (inputs..., parameters...) for this rank's slice ``data``."""
    data = [x.detach().requires_grad_() for x in data]
    params = [p.detach().requires_grad_() for p in params]
    *projections, g, beta_logits = data
    o = cp.kda(projections, params[:3], g, beta_logits, (params[3], params[4], None), head_dim)
    grads = torch.autograd.grad(o, data + params, w)
    return [o, *grads]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def accuracy(rank, size, mode, tokens, heads, head_dim, device, group):
    data, params, w = make_inputs(tokens, heads, head_dim, device, torch.float32)
    reference = forward_backward(context(0, 1, "chunkwise", tokens, None), data, params, w, head_dim)
    local = tokens // size
    mine = slice(rank * local, (rank + 1) * local)
    ours = forward_backward(context(rank, size, mode, tokens, group), [x[mine] for x in data], params,
                            w[:, mine], head_dim)
    n_data = 1 + len(data)
    for grad in ours[n_data:]:  # parameter gradients: the sum over the CP ranks
        dist.all_reduce(grad, group=group)
    errors = []
    for i, (a, b) in enumerate(zip(ours, reference)):
        if 0 < i < n_data:
            b = b[mine]
        elif i == 0:
            b = b[:, mine]
        errors.append(rel(a, b))
    worst = torch.tensor(errors, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(NAMES, worst.tolist()))


def timing(rank, size, mode, tokens, heads, head_dim, device, dtype, reps, group):
    data, params, w = make_inputs(tokens, heads, head_dim, device, dtype)
    local = tokens // size
    mine = slice(rank * local, (rank + 1) * local)
    cp = context(rank, size, mode, tokens, group)
    args = ([x[mine] for x in data], params, w[:, mine], head_dim)
    times = []
    for i in range(reps + 2):  # two warm-up runs (autotuning, caches)
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward(cp, *args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor((time.perf_counter() - start) * 1e3, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the step waits for the slowest rank
        if i >= 2:
            times.append(float(elapsed))
    return statistics.median(times)


def main(out, mode, tokens, heads, head_dim, reps=5):
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    row = dict(cp=size, mode=mode, tokens=tokens, heads=heads, head_dim=head_dim,
               dtype="bf16" if cuda else "fp32")
    if size > 1:
        row["rel_error"] = accuracy(rank, size, mode, tokens, heads, head_dim, device, group)
    row["fb_ms"] = timing(rank, size, mode, tokens, heads, head_dim, device,
                          torch.bfloat16 if cuda else torch.float32, reps, group)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:]))
