"""The KDA short convolution + SiLU, forward + backward, as the model runs it on a GPU: the Triton
kernels (kernels/short_conv.py) against the PyTorch expression compiled by inductor (what
``--compile`` ran before) and eager. Each point first checks the three against an fp64 reference.

    python benchmarks/short_conv.py [--tokens 32768] [--channels 2048] [--out results.json]

One q/k/v convolution of scaling-653m at 32k tokens per step is 32768 x 2048 (16 heads x 128).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.short_conv import short_conv_silu_triton  # noqa: E402
from model.packed import causal_depthwise_conv, pack  # noqa: E402


def expression(x, w, position):
    return F.silu(causal_depthwise_conv(x, w, position))


def documents(tokens: int, seed: int = 0) -> torch.Tensor:
    """cu_seqlens of book-like packing: lengths from 1 to 8k tokens, the last one cut to fit."""
    gen = torch.Generator().manual_seed(seed)
    cu, at = [0], 0
    while at < tokens:
        at = min(tokens, at + int(torch.randint(1, 8192, (1,), generator=gen)))
        cu.append(at)
    return torch.tensor(cu, dtype=torch.int32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    T, C, W = args.tokens, args.channels, args.width
    position = pack(1, T, documents(T), "cuda").position_in_document
    x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(C, 1, W, device="cuda") / W).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(expression, fullgraph=True, dynamic=False)
    ways = {"triton (ours)": short_conv_silu_triton, "inductor (compiled PyTorch)": compiled, "eager PyTorch": expression}

    want = expression(x.double(), w.double(), position)
    want_grads = torch.autograd.grad(want, (x, w), dy.double())
    rows = []
    for name, fn in ways.items():
        out = fn(x, w, position)
        grads = torch.autograd.grad(out, (x, w), dy)
        errors = [((g.double() - r).norm() / r.norm()).item() for g, r in zip((out, *grads), (want, *want_grads))]

        def forward_backward():
            torch.autograd.grad(fn(x, w, position), (x, w), dy)

        def forward():
            with torch.no_grad():
                fn(x, w, position)

        rows.append(dict(way=name, fwd_bwd_ms=triton.testing.do_bench(forward_backward, return_mode="median"),
                         fwd_ms=triton.testing.do_bench(forward, return_mode="median"),
                         rel_err_out_dx_dw=errors))
    floor_ms = 5 * T * C * 2 / 4.0e12 * 1e3  # x, y forward; x, dy, dx backward at 4 TB/s
    print(f"short conv + SiLU, {T} x {C} bf16, width {W}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}; bytes floor ~{floor_ms:.3f} ms f+b")
    print("| way | fwd+bwd ms | fwd ms | rel. error out / dx / dw vs fp64 |")
    print("| --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['way']} | {r['fwd_bwd_ms']:.3f} | {r['fwd_ms']:.3f} | "
              + " / ".join(f"{e:.1e}" for e in r["rel_err_out_dx_dw"]) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(tokens=T, channels=C, width=W, device=torch.cuda.get_device_name(),
                                                  torch=torch.__version__, triton=triton.__version__, rows=rows),
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
