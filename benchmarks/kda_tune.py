"""Sweep the launch options of our KDA kernels (kernels/kda/options.py, DEFAULT_LAUNCH) on the GPU.

For each kernel and each candidate launch entry, runs chunk_kda forward+backward (bf16, H16,
D128) with that entry in its KDAOptions under the torch profiler and records that kernel's GPU
time at each shape; the other kernels keep their defaults (or the --launch overrides). Prints, per
kernel, the candidates sorted by time (sum over the shapes) and the best one; results are also
written as JSON.

  python benchmarks/kda_tune.py [--shapes 8x4096,1x32768] [--kernels bwd_intra,fwd_intra]
  python benchmarks/kda_tune.py --kernels bwd_dh --only 1   (one candidate: a crash ends only this process)
"""
import argparse
import dataclasses
import json
import os
import time

import torch

from common import add_kda_option_flags, kda_options
from kda import make_inputs
from kernels.kda import chunk_kda

W = lambda w, s=1, **kw: dict(num_warps=w, num_stages=s, **kw)
CANDIDATES = {
    "fwd_cumsum": [W(4), W(8)],
    # maxnreg caps registers per thread (spilling the rest) so that more programs share an SM:
    # the intra and chunk kernels reach 255 registers, which leaves an SM 4-8 warps
    "fwd_intra": [W(2), W(4), W(8), W(2, maxnreg=128), W(2, 2), W(2, maxnreg=168)],
    "fwd_wy": [W(4), W(8), W(2), W(4, maxnreg=128)],
    # BV 16: twice the programs of BV 32 for the sequential state passes when B*H is small
    "fwd_h": [W(4, 2, BV=64), W(2, 2, BV=16), W(2, 2, BV=32), W(2, 2, BV=64), W(2, 1, BV=16),
              W(4, 2, BV=32), W(4, 2, BV=16), W(8, 2, BV=32)],
    "fwd_o": [W(4, 2), W(4, 3), W(8, 2)],
    # bf16 states: 4 and 8 warps end in an illegal memory access on the H200 (Triton 3.6; fp32: 8 warps BV 16)
    "bwd_dh": [W(8, 1, BV=32), W(4, 1, BV=16), W(2, 1, BV=16), W(4, 1, BV=32), W(8, 1, BV=16),
               W(4, 2, BV=16), W(8, 2, BV=32), W(2, 1, BV=32), W(2, 2, BV=16), W(2, 2, BV=32)],
    "bwd_chunk_dk": [W(4), W(8), W(2), W(4, maxnreg=168), W(4, maxnreg=128), W(4, 2)],
    "bwd_chunk_wy": [W(4), W(8), W(2), W(4, maxnreg=168)],
    "bwd_intra": [W(2, BD=32), W(4, BD=32), W(8, BD=32), W(4, BD=64), W(8, BD=64), W(2, BD=16),
                  W(2, BD=32, maxnreg=168), W(2, BD=32, maxnreg=128), W(2, 2, BD=32), W(4, BD=16),
                  W(2, BD=16, maxnreg=128), W(4, BD=32, maxnreg=128)],
}


def kernel_times(fn, reps=3):
    """GPU ms per kernel name (mean over reps calls of fn) from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        out[e.key] = out.get(e.key, 0.) + t / 1e3 / reps
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x4096,1x32768")
    ap.add_argument("--kernels", default=",".join(CANDIDATES))
    ap.add_argument("--only", type=int, default=None, help="index of the one candidate to run")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kda_tune.json"))
    add_kda_option_flags(ap)
    args = ap.parse_args()
    base = kda_options(args)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    data = {}
    for B, T in shapes:
        (q, k, v, g, beta), _ = make_inputs(B, T, 16, 128)
        do = torch.randn_like(v)

        def fwd_bwd(options, q=q, k=k, v=v, g=g, beta=beta, do=do):   # bind this shape's tensors
            o, _ = chunk_kda(q, k, v, g, beta, options=options)
            return torch.autograd.grad(o, [q, k, v, g, beta], do)
        data[(B, T)] = fwd_bwd
    results = {}
    for name in args.kernels.split(","):
        kname = f"kda_{name}_kernel"
        rows = []
        cands = CANDIDATES[name] if args.only is None else [CANDIDATES[name][args.only]]
        for cand in cands:
            # the candidate replaces the kernel's whole entry (a state pass then has no "few" launch)
            options = dataclasses.replace(base, launch={**base.launch, name: cand})
            t0 = time.time()
            row = dict(cfg=cand)
            try:
                for (B, T), fn in data.items():
                    fn(options)            # compile + warm up
                    torch.cuda.synchronize()
                    row[f"{B}x{T}"] = kernel_times(lambda: fn(options)).get(kname)
                row["total"] = sum(row[f"{B}x{T}"] for B, T in data)
            except Exception as exc:  # out of resources etc.
                row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                row["total"] = float("inf")
            row["wall_s"] = round(time.time() - t0, 1)
            print(name, row, flush=True)
            rows.append(row)
        rows.sort(key=lambda r: r["total"])
        results[name] = rows
        print(f"BEST {name}: {rows[0]['cfg']} ({rows[0]['total']:.3f} ms over shapes; default "
              f"{base.launch_entry(name)})", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
