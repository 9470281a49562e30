"""GPU debugging aid: one chunk_kda forward+backward under chosen kernel options.

  python benchmarks/kda_debug.py --case dk_ne_dv --state bf16 --inv tf32x3   (errors vs fp64)
  python benchmarks/kda_debug.py --shape 1x1024 --dim 128                      (finite check)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels.kda.chunk as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default=None)
    ap.add_argument("--shape", default="1x1024")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--state", choices=["bf16", "f32"], default="bf16" if C.STATE_16 else "f32")
    ap.add_argument("--inv", default=C.INV_PREC_16)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--launch", default="", help="LAUNCH overrides as in KDA_LAUNCH, e.g. bwd_dh.few.BV=32")
    args = ap.parse_args()
    C.override_launch(args.launch)
    C.STATE_16 = args.state == "bf16"
    C.INV_PREC_16 = args.inv
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tag = f"[{args.case or args.shape} state={args.state} inv={args.inv} dtype={args.dtype} {args.launch}]"
    if args.case:
        from tests.kernels.test_kda_reference import _case
        from tests.kernels.test_kda_triton import _on
        from tests.kernels.utils import rel_rms, run_with_grads
        from kernels.kda import recurrent_kda_reference
        inputs, cu = _case(args.case)
        ref = run_with_grads(recurrent_kda_reference, inputs, cu)
        o, s, g = run_with_grads(C.chunk_kda_triton, _on(inputs, "cuda", dt), None if cu is None else cu.cuda())
        errs = {"o": rel_rms(o, ref[0]), "s": rel_rms(s, ref[1])}
        errs.update({f"d{k}": rel_rms(g[k], ref[2][k]) for k in g})
        print(tag, " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
        sys.exit(0 if all(e < 3e-2 for e in errs.values()) else 1)   # bf16 test cap
    B, T = map(int, args.shape.split("x"))
    H, D = 2, args.dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(dt).requires_grad_() for _ in range(3))
    g = (-torch.rand(B, T, H, D, device="cuda", generator=gen)).requires_grad_()
    beta = torch.rand(B, T, H, device="cuda", generator=gen).to(dt).requires_grad_()
    o, _ = C.chunk_kda(q, k, v, g, beta)
    torch.cuda.synchronize()
    print(tag, "forward ok, finite:", bool(torch.isfinite(o).all()), flush=True)
    grads = torch.autograd.grad(o, [q, k, v, g, beta], torch.randn_like(o))
    torch.cuda.synchronize()
    finite = [bool(torch.isfinite(x).all()) for x in grads]
    print(tag, "backward ok, finite:", finite, flush=True)
    sys.exit(0 if all(finite) and bool(torch.isfinite(o).all()) else 1)


if __name__ == "__main__":
    main()
