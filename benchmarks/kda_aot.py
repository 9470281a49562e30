"""Compile the chunkwise KDA kernels for Hopper (sm_90) without a GPU and report their resources.

Triton's wheel ships ptxas and cuobjdump, so `triton.compile` for a GPUTarget works on a CPU-only
machine. Each kernel is compiled as kernels/kda/chunk.py launches it at the model's head size
(K = V = 128, bf16 inputs, the LAUNCH table's options, regular and "few" launches of the state
passes), with 16-byte-aligned pointers as Triton's JIT specialises them. Prints registers,
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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.kda.chunk as C  # noqa: E402
import kernels.kda.chunk_bwd as B  # noqa: E402
import kernels.kda.chunk_fwd as F  # noqa: E402

TOKEN_16 = {"q", "k", "v", "do", "dv", "beta", "o", "dq", "dk"}      # bf16 in the model's call
STATE = {"W", "Qg", "Kg", "h", "dh"}                                 # bf16 states (v8) or fp32
INDEX = {"cu_seqlens", "chunk_info", "chunk_offsets"}
SCALAR = {"lower_bound": "fp32"}


def signature(fn, consts, state):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in SCALAR:
            sig[name] = SCALAR[name]
        elif name in INDEX:
            sig[name] = "*i32"
        elif name in TOKEN_16:
            sig[name] = "*bf16"
        elif name in STATE:
            sig[name] = f"*{state}"
        else:
            sig[name] = "*fp32"
    return sig


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


def compile_one(label, fn, consts, options, state):
    sig = signature(fn, consts, state)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")}
    row = dict(kernel=label, **{k: v for k, v in options.items()})
    try:
        compiled = triton.compile(ASTSource(fn, signature=sig, constexprs=consts, attrs=aligned),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as exc:   # report and go on with the other kernels
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return row
    row["registers"], row["stack_bytes"] = resources(compiled.asm["cubin"])
    row["shared_kib"] = round(compiled.metadata.shared / 1024, 1)
    return row


def plan(state):
    """(label, kernel, constexprs, launch options) as chunk.py launches them at K = V = 128."""
    K = V = BK = 128
    BV = 64
    prec = "tf32"
    fp32_state = state == "fp32"
    gate = 1   # the model's fused gate (softplus form), which compiles the gate code paths
    yield "fwd_cumsum", F.kda_fwd_cumsum_kernel, dict(H=16, K=K, BK=BK, GATE=gate), C._cfg("fwd_cumsum")
    yield ("fwd_intra", F.kda_fwd_intra_kernel, dict(H=16, K=K, BK=BK, BD=32, PREC=prec, SPAN=C.DIAG_SPAN_MAX),
           C._cfg("fwd_intra"))
    yield ("fwd_wy", F.kda_fwd_wy_kernel, dict(H=16, K=K, V=V, BK=BK, BV=BV, BKS=64, PREC=prec,
                                               INV_PREC=C.INV_PREC_16), C._cfg("fwd_wy"))
    for name, fn in (("fwd_h", F.kda_fwd_h_kernel), ("bwd_dh", B.kda_bwd_dh_kernel)):
        for which, entry in (("", C.LAUNCH[name]), (" few", C.LAUNCH[name]["few"])):
            consts = dict(H=16, K=K, V=V, BK=BK, BV=C._blk(name, "BV", BV, BK, entry), PREC=prec)
            consts.update(dict(HAS_H0=False, STORE_HT=False) if name == "fwd_h" else dict(HAS_DHT=False, HAS_H0=False))
            yield f"{name}{which} BV{consts['BV']}", fn, consts, C._cfg(name, BK, entry, fp32_state)
    yield "fwd_o", F.kda_fwd_o_kernel, dict(H=16, K=K, V=V, BK=BK, BV=BV, PREC=prec), C._cfg("fwd_o")
    for name, fn in (("bwd_chunk_dk", B.kda_bwd_chunk_dk_kernel), ("bwd_chunk_wy", B.kda_bwd_chunk_wy_kernel)):
        yield name, fn, dict(H=16, K=K, V=V, BV=32, PREC=prec), C._cfg(name)
    BD = C._blk("bwd_intra", "BD", BK, BK)
    yield (f"bwd_intra BD{BD}", B.kda_bwd_intra_kernel,
           dict(H=16, K=K, BD=BD, GATE=gate, PREC=prec, SPAN=C.DIAG_SPAN_MAX), C._cfg("bwd_intra"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", choices=["bf16", "fp32"], default="bf16", help="dtype of W / q e^G / kg / states")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90, K = V = 128, bf16 inputs, {args.state} states")
    print(f"{'kernel':22s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'stack B':>8s} {'shared KiB':>10s}")
    rows = []
    for label, fn, consts, options in plan(args.state):
        row = compile_one(label, fn, consts, options, args.state)
        rows.append(row)
        if "error" in row:
            print(f"{label:22s} ERROR {row['error']}")
        else:
            print(f"{label:22s} {row['num_warps']:5d} {row['num_stages']:6d} {row['registers']!s:>5s} "
                  f"{row['stack_bytes']!s:>8s} {row['shared_kib']:10.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(triton=triton.__version__, state=args.state, rows=rows), f, indent=1)
    sys.exit(1 if any("error" in row for row in rows) else 0)


if __name__ == "__main__":
    main()
