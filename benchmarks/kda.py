"""Benchmark chunk_kda (ours) vs flash-linear-attention's chunk_kda vs causal SDPA (flash).

Forward and forward+backward, bf16, H=16, D=128, by default as the model calls the op: the raw gate
projection with the activation in the op (FLA: use_gate_in_kernel=True), gradients of every input and
of A_log / dt_bias, at 8x4096, 1x32768 and one 32k row of book-length documents, at dt_bias = -4
(mild decay), 0 and +2 (fast-forgetting channels). Prints a table (ms, tokens/s, TFLOP/s, peak
memory, ratio to FLA; the headline is the worst point) and writes JSON.

  python benchmarks/kda.py [--shapes 8x4096,1x32768v] [--dt-bias=-4,0,2,normal] [--breakdown] [--out F]
                           [--launch kernel[.few].option=N,...] [--state-dtype float32]   (kernel options)
"""
import argparse
import json
import os
import time

import torch
import triton

from common import add_kda_option_flags, fla_backward_usable, kda_options
from kernels.kda import CHUNK_SIZE, chunk_kda
from kernels.kda.gate import kda_log_decay


def kda_flops(B, T, H, D):
    """The tech report's chunkwise FLOP count per head: 6 T d^2 + 3 T C d + T C^2 (forward)."""
    return B * H * (6 * T * D * D + 3 * T * CHUNK_SIZE * D + T * CHUNK_SIZE * CHUNK_SIZE)


def attn_flops(B, T, H, D):
    """Causal attention forward: two T x T x D matmuls, half masked."""
    return B * H * 2 * T * T * D


def make_inputs(B, T, H, D, device="cuda", raw_gate=False, dt_bias="-4"):
    """raw_gate=False: g is the fp32 log-decay; True: g is the raw (bf16) gate projection and
    (A_log, dt_bias) are returned for the in-kernel gate. ``dt_bias``: a constant ("-4": about the
    initialisation, mild decay; "0", "2": fast-forgetting channels as training grows them) or
    "normal" (N(0, 0.5) per channel)."""
    gen = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    q = torch.randn(B, T, H, D, generator=gen, **bf)
    k = torch.randn(B, T, H, D, generator=gen, **bf)
    v = torch.randn(B, T, H, D, generator=gen, **bf)
    # log-decay of the model's gate (kernels/kda/gate.py), fp32
    raw = torch.randn(B, T, H, D, generator=gen, device=device)
    A = torch.log(torch.empty(H, device=device).uniform_(1, 16, generator=gen))
    if dt_bias == "normal":
        dt_bias = 0.5 * torch.randn(H * D, generator=gen, device=device)
    else:
        dt_bias = torch.full((H * D,), float(dt_bias), device=device)
    g = kda_log_decay(raw, (A, dt_bias, None))
    beta = torch.rand(B, T, H, generator=gen, **bf)
    if raw_gate:
        g = raw.to(torch.bfloat16)
    tensors = [x.requires_grad_() for x in (q, k, v, g, beta)]
    return tensors, (A.requires_grad_(), dt_bias.requires_grad_())


def parse_shape(shape: str):
    """"8x4096" -> (8, 4096, None); "1x32768v" -> one row of book-length documents (cu_seqlens:
    documents of 60%, 27% and 13% of the row, boundaries off the 64-token chunk grid)."""
    varlen = shape.endswith("v")
    B, T = map(int, shape.rstrip("v").split("x"))
    if not varlen:
        return B, T, None
    if B != 1:
        raise SystemExit(f"--shapes {shape}: varlen rows need B = 1")
    cuts = [0, int(T * 0.6) + 17, int(T * 0.87) + 5, T]
    return B, T, torch.tensor(cuts, dtype=torch.long, device="cuda")


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def peak_mem(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def kernel_breakdown(fn):
    """GPU time per kernel name (ms) over one call of fn, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            out[e.key[:60]] = t / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:14])


def fwd_bwd_fns(op, inputs, params=()):
    """``params``: tensors the op uses besides its inputs whose gradients a training step needs
    too (the gate's A_log and dt_bias)."""
    def fwd():
        with torch.no_grad():
            return op(*inputs)

    out = op(*inputs)
    do = torch.randn_like(out)

    def fwd_bwd():
        o = op(*inputs)
        return torch.autograd.grad(o, [x for x in (*inputs, *params) if x.requires_grad], do)
    return fwd, fwd_bwd


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def save(env, rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x4096,1x32768,1x32768v",
                    help="BxT list; a trailing v: one row of book-length documents (varlen)")
    ap.add_argument("--ops", default="ours,sdpa_flash,fla", help="which of ours, sdpa_flash, fla to time")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--gate", choices=["log", "raw"], default="raw",
                    help="raw (the model's call): bf16 gate projection, activation inside the op (ours: fused "
                         "into the cumsum; FLA: use_gate_in_kernel), gradients of A_log and dt_bias too; "
                         "log: g is the precomputed fp32 log-decay")
    ap.add_argument("--dt-bias", default="-4,0,2",
                    help="comma list of dt_bias points: constants or 'normal' (N(0, 0.5) per channel)")
    ap.add_argument("--breakdown", action="store_true", help="GPU time per kernel (forward and f+b) for every op")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kda_bench.json"))
    add_kda_option_flags(ap)
    args = ap.parse_args()
    H, D = args.heads, args.dim
    options = kda_options(args)
    try:
        from fla.ops.kda import chunk_kda as fla_chunk_kda
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except Exception as exc:  # pragma: no cover
        fla_chunk_kda, fla_version = None, f"unavailable ({exc})"
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               fla=fla_version, gate=args.gate, kda_options=options.to_dict())
    print(env)
    rows, start, wanted = [], time.time(), set(args.ops.split(","))
    points = args.dt_bias.split(",") if args.gate == "raw" else ["-4"]
    for shape in args.shapes.split(","):
        B, T, cu = parse_shape(shape)
        for point in points:
            if point != points[0] and wanted == {"sdpa_flash"}:
                break
            (q, k, v, g, beta), (A_log, dt_bias) = make_inputs(B, T, H, D, raw_gate=args.gate == "raw",
                                                               dt_bias=point)
            gate = (A_log, dt_bias, None) if args.gate == "raw" else None
            params = (A_log, dt_bias) if gate else ()
            fla_gate = dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias) if gate else {}
            ops = {
                "ours": lambda q, k, v, g, beta: chunk_kda(q, k, v, g, beta, gate=gate, cu_seqlens=cu,
                                                           options=options)[0],
                "sdpa_flash": lambda q, k, v, g, beta: torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2),
            }
            if fla_chunk_kda is not None:
                ops["fla"] = lambda q, k, v, g, beta: fla_chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
                                                                    cu_seqlens=cu, **fla_gate)[0]
            for name, op in ops.items():
                if name not in wanted or (name == "sdpa_flash" and (point != points[0] or cu is not None)):
                    continue
                inputs = [q, k, v] if name == "sdpa_flash" else [q, k, v, g, beta]
                call = (lambda *a, op=op, g=g, beta=beta: op(*a, g, beta)) if name == "sdpa_flash" else op
                flops = attn_flops(B, T, H, D) if name == "sdpa_flash" else kda_flops(B, T, H, D)
                fwd, fwd_bwd = fwd_bwd_fns(call, inputs, () if name == "sdpa_flash" else params)
                row = dict(name=name, B=B, T=T, H=H, D=D, varlen=cu is not None, dt_bias=point)
                row["fwd_ms"] = bench(fwd)
                row["fwd_mem_gib"] = peak_mem(fwd)
                if name == "fla" and not fla_backward_usable():
                    row["fwdbwd_ms"] = None
                    row["fwdbwd_error"] = "not run: Triton < 3.7.1 on Hopper (fla#640)"
                else:
                    try:
                        row["fwdbwd_ms"] = bench(fwd_bwd)
                        row["fwdbwd_mem_gib"] = peak_mem(fwd_bwd)
                    except Exception as exc:
                        row["fwdbwd_ms"] = None
                        row["fwdbwd_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                if name == "ours" or (args.breakdown and name == "fla"):
                    if args.breakdown:
                        row["kernels_fwd_ms"] = kernel_breakdown(fwd)
                    if row["fwdbwd_ms"]:
                        row["kernels_fwdbwd_ms"] = kernel_breakdown(fwd_bwd)
                row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                if row["fwdbwd_ms"]:
                    row["fwdbwd_tflops"] = 3 * flops / row["fwdbwd_ms"] / 1e9
                    row["fwdbwd_tok_s"] = B * T / row["fwdbwd_ms"] * 1e3
                row["fwd_tok_s"] = B * T / row["fwd_ms"] * 1e3
                rows.append(row)
                # each row as it lands: FLA's first calls autotune for minutes, and a time limit
                # should leave the rows already measured
                print(f"[{time.time() - start:.0f} s] {name} {shape} dt_bias {point}: fwd {row['fwd_ms']:.2f} ms, "
                      f"f+b {fmt(row['fwdbwd_ms'])} ms", flush=True)
                save(env, rows, args.out)
                torch.cuda.empty_cache()
            del q, k, v, g, beta
    # ratios to FLA
    for r in rows:
        f = next((x for x in rows if x["name"] == "fla" and all(x[key] == r[key] for key in ("B", "T", "varlen", "dt_bias"))),
                 None)
        if f is not None:
            r["fwd_speedup_vs_fla"] = f["fwd_ms"] / r["fwd_ms"]
            if f.get("fwdbwd_ms") and r.get("fwdbwd_ms"):
                r["fwdbwd_speedup_vs_fla"] = f["fwdbwd_ms"] / r["fwdbwd_ms"]
    hdr = f"{'op':11s} {'shape':>10s} {'dt_bias':>7s} {'fwd ms':>8s} {'fwd TF/s':>8s} {'f+b ms':>8s} {'f+b TF/s':>8s} " \
          f"{'Mtok/s f+b':>10s} {'mem GiB':>7s} {'xFLA fwd':>8s} {'xFLA f+b':>8s}"
    print(hdr)
    for r in rows:
        shape = f"{r['B']}x{r['T']}" + ("v" if r["varlen"] else "")
        print(f"{r['name']:11s} {shape:>10s} {r['dt_bias']:>7s} {fmt(r['fwd_ms']):>8s} "
              f"{fmt(r['fwd_tflops'], '.1f'):>8s} {fmt(r.get('fwdbwd_ms')):>8s} "
              f"{fmt(r.get('fwdbwd_tflops'), '.1f'):>8s} {fmt(r.get('fwdbwd_tok_s') and r['fwdbwd_tok_s'] / 1e6):>10s} "
              f"{fmt(r.get('fwdbwd_mem_gib', r['fwd_mem_gib'])):>7s} {fmt(r.get('fwd_speedup_vs_fla')):>8s} "
              f"{fmt(r.get('fwdbwd_speedup_vs_fla')):>8s}")
        if r.get("fwdbwd_error"):
            print(f"    backward not run: {r['fwdbwd_error']}")
        for part in ("fwd", "fwdbwd"):
            if r.get(f"kernels_{part}_ms"):
                print(f"    {part}: " + ", ".join(f"{k.split('(')[0][:34]}={v:.2f}"
                                              for k, v in r[f"kernels_{part}_ms"].items()))
    worst = [r["fwdbwd_speedup_vs_fla"] for r in rows if r["name"] == "ours" and r.get("fwdbwd_speedup_vs_fla")]
    if worst:
        print(f"headline (worst point): ours f+b = {min(worst):.2f}x FLA's")
    save(env, rows, args.out)


if __name__ == "__main__":
    main()
