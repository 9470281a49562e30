"""Compile the chunkwise KDA kernels for Hopper (sm_90) without a GPU and report their resources.

Triton's wheel ships ptxas and cuobjdump, so `triton.compile` for a GPUTarget works on a CPU-only
machine. The launches are recorded from chunk.py's own launch code (a chunk_kda forward and
backward on empty CPU tensors with the kernels replaced by recorders) at the model's head size
(K = V = 128, bf16 inputs, fused gate; regular and "few" launches of the state passes), and each
is compiled with its arguments' types, constexprs and options, 16-byte-aligned pointers as
Triton's JIT specialises them. Prints registers,
spilled bytes (stack) and shared memory per kernel; a kernel that does not compile prints its
error. This checks a Triton release (e.g. the 3.7.1 pack of scripts/pack_triton.sh) before any
GPU time is spent, and shows what a kernel change does to registers and spills.

  python benchmarks/kda_aot.py [--state bf16|fp32] [--out FILE.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # compile for real even where the tests interpret
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

import kernels.kda.chunk as C  # noqa: E402
from kernels.kda import KDAOptions  # noqa: E402

KERNELS = ("kda_fwd_cumsum_kernel", "kda_fwd_intra_kernel", "kda_fwd_wy_kernel", "kda_fwd_h_kernel",
           "kda_fwd_o_kernel", "kda_bwd_dh_kernel", "kda_bwd_chunk_dk_kernel", "kda_bwd_chunk_wy_kernel",
           "kda_bwd_intra_kernel", "kda_gate_bwd_kernel")
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64"}


class _Recorder:
    """Stands in for a kernel of kernels/kda/chunk.py: `kernel[grid](*args, **kwargs)` records the
    launch (the arguments fix the signature, the keywords the constexprs and options) and runs
    nothing, so the real launch code of chunk.py runs on empty CPU tensors."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def record_launches(state, sequences, dtype=torch.bfloat16, dim=128, diag_decay_clamp=0.0):
    """Every kernel launch of one chunk_kda forward + backward as the model calls it (bf16 q/k/v/beta,
    raw gate fused, K = V = 128, H = 16; other dtypes and head sizes for the tests' launches),
    `sequences` documents of one chunk each (8: the state passes' regular launch, 1: their "few" launch)."""
    launches = []
    saved = {name: getattr(C, name) for name in KERNELS}
    options = KDAOptions(state_dtype="input" if state == "bf16" else "float32", diag_decay_clamp=diag_decay_clamp)
    try:
        for name, fn in saved.items():
            setattr(C, name, _Recorder(fn, launches))
        bf = dict(dtype=dtype, requires_grad=True)
        q, k, v = (torch.zeros(sequences, 64, 16, dim, **bf) for _ in range(3))
        g = torch.zeros(sequences, 64, 16, dim, **bf)
        beta = torch.zeros(sequences, 64, 16, **bf)
        gate = (torch.zeros(16), torch.zeros(16 * dim), None)
        o, _ = C.chunk_kda_triton(q, k, v, g, beta, use_qk_l2norm=False, gate=gate, options=options)
        torch.autograd.grad(o, [q, k, v, g, beta], torch.zeros_like(o))
    finally:
        for name, fn in saved.items():
            setattr(C, name, fn)
    return launches


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, int):
        return "i32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def resources(cubin: bytes):
    """(registers, stack bytes) from cuobjdump, or (None, None) where it is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":") for line in out.splitlines() if "REG:" in line for item in line.split()
                  if ":" in item)
    return int(fields.get("REG", -1)), int(fields.get("STACK", -1))


def compile_launch(fn, args, kwargs):
    """Compile one recorded launch for sm_90, 16-byte-aligned pointers as the JIT assumes."""
    options = {key: kwargs[key] for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
    values = dict(zip(fn.arg_names, args))
    consts = {key: val for key, val in kwargs.items() if key not in options}
    consts.update({name: None for name, val in values.items() if val is None})
    sig = {name: "constexpr" if name in consts else _arg_type(values[name]) for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")}
    label = fn.__name__.removeprefix("kda_").removesuffix("_kernel")
    label += "".join(f" {key}{consts[key]}" for key in ("BV", "BD") if key in consts)
    row = dict(kernel=label, **options)
    try:
        compiled = triton.compile(ASTSource(fn, signature=sig, constexprs=consts, attrs=aligned),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as exc:   # report and go on with the other kernels
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return row
    row["registers"], row["stack_bytes"] = resources(compiled.asm["cubin"])
    row["shared_kib"] = round(compiled.metadata.shared / 1024, 1)
    return row


def plan(state, dtype=torch.bfloat16, dim=128, diag_decay_clamp=0.0):
    """The distinct launches of both state-pass regimes, in launch order."""
    seen = set()
    for fn, args, kwargs in (record_launches(state, 8, dtype, dim, diag_decay_clamp)
                             + record_launches(state, 1, dtype, dim, diag_decay_clamp)):
        key = (fn.__name__, tuple(sorted(kwargs.items())))
        if key not in seen:
            seen.add(key)
            yield fn, args, kwargs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", choices=["bf16", "fp32"], default="bf16", help="dtype of W / q e^G / kg / states")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of q / k / v")
    ap.add_argument("--dim", type=int, default=128, help="head size K = V")
    ap.add_argument("--diag-decay-clamp", type=float, default=0.0, help="KDAOptions.diag_decay_clamp")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dtype = {name: dt for dt, name in DTYPES.items()}[args.dtype]
    print(f"triton {triton.__version__}, sm_90, K = V = {args.dim}, {args.dtype} inputs, {args.state} states")
    print(f"{'kernel':22s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'stack B':>8s} {'shared KiB':>10s}")
    rows = []
    for fn, launch_args, kwargs in plan(args.state, dtype, args.dim, args.diag_decay_clamp):
        row = compile_launch(fn, launch_args, kwargs)
        rows.append(row)
        if "error" in row:
            print(f"{row['kernel']:22s} ERROR {row['error']}")
        else:
            print(f"{row['kernel']:22s} {row['num_warps']:5d} {row['num_stages']:6d} {row['registers']!s:>5s} "
                  f"{row['stack_bytes']!s:>8s} {row['shared_kib']:10.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(triton=triton.__version__, state=args.state, rows=rows), f, indent=1)
    sys.exit(1 if any("error" in row for row in rows) else 0)


if __name__ == "__main__":
    main()
