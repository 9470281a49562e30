"""The KDA short convolution + SiLU, forward + backward, as the model runs it on a GPU: the Triton
kernels (kernels/short_conv.py) against the PyTorch expression compiled by inductor (what
``--compile`` ran before) and eager. Each point first checks the three against an fp64 reference.

    python benchmarks/short_conv.py [--tokens 32768] [--channels 2048] [--out results.json]
    python benchmarks/short_conv.py --device cpu --tokens 300 --channels 64   # a smoke run (interpreter)

One q/k/v convolution of scaling-653m at 32k tokens per step is 32768 x 2048 (16 heads x 128).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SMOKE = "--device=cpu" in sys.argv or any(a == "--device" and b == "cpu" for a, b in zip(sys.argv, sys.argv[1:]))
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

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


def _milliseconds(fn, device: str) -> float:
    """Median time of ``fn``: Triton's do_bench on a GPU; one timed call elsewhere (a smoke run)."""
    if device == "cuda":
        return triton.testing.do_bench(fn, return_mode="median")
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run in Triton's interpreter")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    T, C, W, device = args.tokens, args.channels, args.width, args.device
    # bf16 on the GPU; fp32 in the interpreter (it cannot compute bf16 dots or tiles faithfully)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    position = pack(1, T, documents(T), device).position_in_document
    x = torch.randn(T, C, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(C, 1, W, device=device) / W).to(dtype).requires_grad_()
    dy = torch.randn(T, C, device=device, dtype=dtype)
    ways = {"triton (ours)": short_conv_silu_triton, "eager PyTorch": expression}
    if device == "cuda":
        ways["inductor (compiled PyTorch)"] = torch.compile(expression, fullgraph=True, dynamic=False)

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

        rows.append(dict(way=name, fwd_bwd_ms=_milliseconds(forward_backward, device),
                         fwd_ms=_milliseconds(forward, device), rel_err_out_dx_dw=errors))
    floor_ms = 5 * T * C * 2 / 4.0e12 * 1e3  # x, y forward; x, dy, dx backward at 4 TB/s
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter, fp32)"
    print(f"short conv + SiLU, {T} x {C} {str(dtype).removeprefix('torch.')}, width {W}, {name}, "
          f"torch {torch.__version__}, triton {triton.__version__}; bytes floor ~{floor_ms:.3f} ms f+b")
    print("| way | fwd+bwd ms | fwd ms | rel. error out / dx / dw vs fp64 |")
    print("| --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['way']} | {r['fwd_bwd_ms']:.3f} | {r['fwd_ms']:.3f} | "
              + " / ".join(f"{e:.1e}" for e in r["rel_err_out_dx_dw"]) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(tokens=T, channels=C, width=W, device=name,
                                                  torch=torch.__version__, triton=triton.__version__, rows=rows),
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
