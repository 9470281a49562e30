"""GPU debugging aid: one chunk_kda forward+backward under chosen kernel options.

  python benchmarks/kda_debug.py --case dk_ne_dv --state-dtype input --inverse-precision tf32x3  (errors vs fp64)
  python benchmarks/kda_debug.py --shape 1x1024 --dim 128 --launch bwd_dh.few.BV=32             (finite check)

``--case`` runs a case of the kernel tests (tests/helpers/kda.py), so it needs the repository root
on the import path: ``PYTHONPATH=. python benchmarks/kda_debug.py --case ...`` (the GPU scripts set it).
"""
import argparse
import functools
import sys

import torch

from common import add_kda_option_flags, kda_options
from kernels.kda import chunk_kda, recurrent_kda_reference
from kernels.kda.chunk import chunk_kda_triton


def _case_errors(name, options, dtype):
    """Relative errors of output, final state and every gradient of test case ``name`` vs fp64."""
    try:
        from tests.helpers.kda import case, on_device, rel_rms, run_with_grads
    except ImportError:
        raise SystemExit("--case needs the repository root on the import path: "
                         "PYTHONPATH=. python benchmarks/kda_debug.py --case ...") from None
    inputs, cu = case(name)
    ref = run_with_grads(recurrent_kda_reference, inputs, cu)
    op = functools.partial(chunk_kda_triton, options=options)
    o, s, g = run_with_grads(op, on_device(inputs, "cuda", dtype), None if cu is None else cu.cuda())
    errs = {"o": rel_rms(o, ref[0]), "s": rel_rms(s, ref[1])}
    errs.update({f"d{k}": rel_rms(g[k], ref[2][k]) for k in g})
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default=None, help="a case of tests/helpers/kda.py (errors against fp64)")
    ap.add_argument("--shape", default="1x1024")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    add_kda_option_flags(ap)
    args = ap.parse_args()
    options = kda_options(args)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tag = (f"[{args.case or args.shape} state={options.state_dtype} inv={options.inverse_precision} "
           f"dtype={args.dtype} {args.launch}]")
    if args.case:
        errs = _case_errors(args.case, options, dt)
        print(tag, " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
        sys.exit(0 if all(e < 3e-2 for e in errs.values()) else 1)   # bf16 test cap
    B, T = map(int, args.shape.split("x"))
    H, D = 2, args.dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(dt).requires_grad_() for _ in range(3))
    g = (-torch.rand(B, T, H, D, device="cuda", generator=gen)).requires_grad_()
    beta = torch.rand(B, T, H, device="cuda", generator=gen).to(dt).requires_grad_()
    o, _ = chunk_kda(q, k, v, g, beta, options=options)
    torch.cuda.synchronize()
    print(tag, "forward ok, finite:", bool(torch.isfinite(o).all()), flush=True)
    grads = torch.autograd.grad(o, [q, k, v, g, beta], torch.randn_like(o))
    torch.cuda.synchronize()
    finite = [bool(torch.isfinite(x).all()) for x in grads]
    print(tag, "backward ok, finite:", finite, flush=True)
    sys.exit(0 if all(finite) and bool(torch.isfinite(o).all()) else 1)


if __name__ == "__main__":
    main()
