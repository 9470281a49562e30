"""Extra work of chunkwise KDA context parallelism on one GPU: pre-passes + folds vs the local op.

Every CP rank runs the ordinary KDA op on its shard of L tokens plus the scheme's extra work
(parallel/context/kda_chunkwise.py): the forward pre-pass (Triton ``kda_cp_transition``, the
[M | E] pair), the fold of the earlier ranks' pairs, the backward pre-pass (``kda_cp_entry_grad``)
and the reverse fold. This script simulates the ranks of one long document (every rank chains) one
after another in one process: the all-gathers are replaced by a stub that returns the other ranks'
pairs, so the numbers hold compute only (docs/parallelism.md has the communication volume).

Per (heads, shard length L, CP size P): the local op's forward+backward (with an initial state and a
final-state gradient, as under CP), the CP op's forward+backward on ranks 0, 1 and P-1 (the extra is
the slowest rank's difference), and the pieces alone (each pre-pass kernel, the longest folds).
bf16, D = 128, the model's raw gate. Prints a table and writes JSON.

  python benchmarks/cp_kda.py [--heads 16,32] [--shards 4096,...,131072] [--cp 2,4,8] [--out FILE]
                              [--cp-precision tf32x3|tf32|ieee] [--launch ...]   (kernel options)
                              [--profile]   (per kernel: where the slowest rank's extra time goes)
  python benchmarks/cp_kda.py --smoke      # CPU, Triton interpreter, tiny shapes: the script runs
"""
import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

from common import add_kda_option_flags, kda_options  # noqa: E402
from kernels.kda import cp_prepass  # noqa: E402
from kernels.kda.chunk import chunk_kda_triton, op_precision  # noqa: E402
from parallel.context import ContextParallel, kda_chunkwise  # noqa: E402
from tests.helpers.kda import rel_rms  # noqa: E402 (PYTHONPATH=.: the tests' shared comparison)


def make_inputs(L, H, D, device, dtype, seed=0):
    """q, k, v, raw gate, beta of one shard (requiring grad) and the gate parameters, like the model."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)
    tensors = [rnd(1, L, H, D), rnd(1, L, H, D), rnd(1, L, H, D), rnd(1, L, H, D),
               torch.rand(1, L, H, generator=gen)]
    tensors = [x.to(device=device, dtype=dtype).requires_grad_() for x in tensors]
    a_log = torch.empty(H).uniform_(1, 16, generator=gen).log().to(device).requires_grad_()
    dt_bias = torch.full((H * D,), -4.0, device=device).requires_grad_()
    return tensors, (a_log, dt_bias, None)


def timer(fn, device, warmup, reps):
    """Median time of fn in ms (CUDA events on GPUs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_kernels(fn, reps=3) -> dict:
    """GPU time per kernel name of one call of ``fn`` (ms, mean of ``reps`` calls under the torch
    profiler) and their sum: with the call's wall time it says whether an extra is GPU work or
    the GPU waiting for the host."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        for k in e.kernels:
            kernels[k.name[:80]] = kernels.get(k.name[:80], 0.0) + k.duration / 1e3 / reps
    return dict(busy_ms=sum(kernels.values()), kernels=dict(sorted(kernels.items(), key=lambda kv: -kv[1])))


def profile_lines(row) -> list[str]:
    """The kernels where the slowest rank's f+b differs from the local op's most."""
    local, cp = row["profile"]["local"], row["profile"]["cp"]
    lines = [f"  H{row['heads']} {_tokens(row['shard'])} CP{row['cp']}: GPU busy {local['busy_ms']:.3f} ms local, "
             f"{cp['busy_ms']:.3f} ms CP (wall {row['local_fb_ms']:.3f} / {max(row['cp_fb_ms'].values()):.3f})"]
    names = set(local["kernels"]) | set(cp["kernels"])
    diff = sorted(names, key=lambda n: -abs(cp["kernels"].get(n, 0) - local["kernels"].get(n, 0)))
    for name in diff[:8]:
        a, b = local["kernels"].get(name, 0.0), cp["kernels"].get(name, 0.0)
        lines.append(f"    {b - a:+8.3f} ms  ({a:.3f} -> {b:.3f})  {name}")
    return lines


def rank_context(rank, P, L):
    """Rank ``rank`` of one sample that is a single document of P*L tokens."""
    return ContextParallel(group=None, rank=rank, size=P, mode="chunkwise", batch_size=1, local_length=L,
                           cu_seqlens=torch.tensor([0, L], dtype=torch.int32),
                           global_cu_seqlens=torch.tensor([0, P * L], dtype=torch.int32))


class StubGather:
    """Stands in for the all-gather of one rank: the other ranks' entries are zeros (timing only)."""

    def __init__(self):
        self.rank = 0

    def __call__(self, local, group, size):
        out = local.new_zeros(size, *local.shape)
        out[self.rank] = local
        return out


class Capture:
    """A state hook that keeps the WY pieces and do for timing the pre-pass kernels alone."""

    def initial_state(self, pieces, cu, offsets, options):
        self.forward, self.cu, self.offsets = pieces, cu, offsets
        W = pieces["W"]
        return W.new_zeros(1, W.shape[1], W.shape[3], pieces["U"].shape[3], dtype=torch.float32)

    def final_state_gradient(self, pieces, do, cu, offsets, options):
        self.backward, self.do = pieces, do
        return None


def measure(H, D, L, sizes, device, dtype, warmup, reps, options, profile=False):
    inputs, gate = make_inputs(L, H, D, device, dtype)
    leaves = [*inputs, gate[0], gate[1]]
    gen = torch.Generator(device="cpu").manual_seed(1)
    do = torch.randn(1, L, H, D, generator=gen).to(device=device, dtype=dtype)
    h0 = (torch.randn(1, H, D, D, generator=gen) * 0.1).to(device)
    dht = torch.randn(1, H, D, D, generator=gen).to(device)
    cu = torch.tensor([0, L], dtype=torch.int32)
    time_it = lambda fn: timer(fn, device, warmup, reps)

    def local_fb():
        o, ht = chunk_kda_triton(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu, gate=gate,
                                 options=options)
        torch.autograd.grad((o, ht), leaves, (do, dht))

    local = time_it(local_fb)
    capture = Capture()
    o, _ = chunk_kda_triton(*inputs, cu_seqlens=cu, gate=gate, state_hook=capture, options=options)
    o.backward(do)
    docs = torch.zeros(1, dtype=torch.int32, device=device)
    pair_of = lambda opts: cp_prepass.transition_pairs(capture.forward, capture.cu, capture.offsets, docs,
                                                       torch.ones_like(docs), opts)
    entry_of = lambda opts: cp_prepass.entry_state_gradients(capture.backward, capture.do, capture.cu,
                                                             capture.offsets, docs, opts)
    transition = time_it(lambda: pair_of(options))
    entry = time_it(lambda: entry_of(options))
    # what the pre-passes' dot precision costs in accuracy: against the same kernels with fp32 dots
    exact = dataclasses.replace(options, cp_precision="ieee")
    pair_err = rel_rms(pair_of(options), pair_of(exact))
    entry_err = rel_rms(entry_of(options), entry_of(exact))
    rows = []
    stub = StubGather()
    original = kda_chunkwise.all_gather_pairs
    kda_chunkwise.all_gather_pairs = stub
    try:
        for P in sizes:
            ranks = sorted({0, min(1, P - 1), P - 1})
            contexts = {r: rank_context(r, P, L) for r in ranks}
            cp_ms, cp_fns = {}, {}
            for r in ranks:
                stub.rank = r

                def cp_fb(cp=contexts[r]):
                    out = kda_chunkwise.chunkwise_kda(*inputs, cp=cp, gate=gate, fused_prepass=True, options=options)
                    torch.autograd.grad(out, leaves, do)

                cp_ms[r], cp_fns[r] = time_it(cp_fb), cp_fb
            pairs = torch.zeros(P, 1, H, D, 2 * D, device=device)
            grads = torch.zeros(P, 1, H, D, D, device=device)
            continues = [[1.0]] * P  # host values, as the chain keeps them
            fold_fwd = time_it(lambda: kda_chunkwise.fold_entry_states(pairs, continues, P - 1))
            fold_bwd = time_it(lambda: kda_chunkwise.fold_exit_gradients(grads, pairs[1:, ..., :D], continues, 0))
            extra = max(cp_ms.values()) - local
            kernels = {}
            if profile and device.type == "cuda":
                stub.rank = slowest = max(cp_ms, key=cp_ms.get)
                kernels["profile"] = dict(local=gpu_kernels(local_fb), cp=gpu_kernels(cp_fns[slowest]), rank=slowest)
            rows.append(dict(**kernels, heads=H, head_dim=D, shard=L, cp=P, total=P * L, local_fb_ms=local,
                             cp_fb_ms={str(r): t for r, t in cp_ms.items()}, extra_ms=extra, extra_pct=100 * extra / local,
                             transition_ms=transition, entry_grad_ms=entry, precision=options.cp_precision,
                             transition_rel_err=pair_err, entry_grad_rel_err=entry_err, fold_fwd_ms=fold_fwd, fold_bwd_ms=fold_bwd,
                             pieces_pct=100 * (transition + entry + fold_fwd + fold_bwd) / local))
    finally:
        kda_chunkwise.all_gather_pairs = original
    return rows


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 else str(n)


def table(rows) -> str:
    lines = ["| H | shard L | CP | total T | local f+b ms | CP f+b ms (slowest rank) | extra % | "
             "transition ms | entry grad ms | folds ms | pieces % | pre-pass error vs fp32 dots |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['heads']} | {_tokens(r['shard'])} | {r['cp']} | {_tokens(r['total'])} | "
                     f"{r['local_fb_ms']:.2f} | {max(r['cp_fb_ms'].values()):.2f} | {r['extra_pct']:.1f} | "
                     f"{r['transition_ms']:.3f} | {r['entry_grad_ms']:.3f} | {r['fold_fwd_ms'] + r['fold_bwd_ms']:.3f} "
                     f"| {r['pieces_pct']:.1f} | {r['precision']}: {r['transition_rel_err']:.1e} / "
                     f"{r['entry_grad_rel_err']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",")]
    parser.add_argument("--heads", type=ints, default=[16, 32])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--shards", type=ints, default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--cp", type=ints, default=[2, 4, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="cp_kda_bench.json")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, fp32")
    parser.add_argument("--profile", action="store_true",
                        help="also the GPU kernels of the local op and of the slowest rank (torch profiler)")
    add_kda_option_flags(parser)
    args = parser.parse_args()
    options = kda_options(args)
    if args.smoke:
        args.heads, args.head_dim, args.shards, args.cp, args.warmup, args.reps = [1], 16, [64], [2], 0, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/cp_kda.py needs a CUDA GPU (or --smoke for the CPU interpreter)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    print("\n".join(table([]).splitlines()[:2]), flush=True)
    for H in args.heads:
        for L in args.shards:
            new = measure(H, args.head_dim, L, args.cp, device, dtype, args.warmup, args.reps, options, args.profile)
            print("\n".join(table(new).splitlines()[2:]), flush=True)  # progress, one line per row
            for row in new:
                if "profile" in row:
                    print("\n".join(profile_lines(row)), flush=True)
            rows.extend(new)
    import triton

    result = dict(date=datetime.date.today().isoformat(),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__,
                  precision=cp_prepass._prec(device, options, op_precision(dtype)),
                  kda_options=options.to_dict(), rows=rows)
    print(f"\n{result['device']}, torch {result['torch']}, Triton {result['triton']}, pre-pass dots "
          f"{result['precision']}\n" + table(rows))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
