#!/usr/bin/env bash
# The synthetic tasks (issue 24, docs/synthetic.md) on one lent H200: a job list of runs (by default
# the length-1024 KDA vs GDN contrast: 3 tasks x arms K,G x LR 5e-4,1e-3), all at once on the one GPU,
# each saving checkpoints in its run folder. A call trains at most SYN_LIMIT seconds; the runs then
# save and stop, and the same command on the still-warm machine resumes them (runs/ is kept between
# calls). Every call ends with the report (table, plots) and the runs' metrics as one archive, in
# $OUT/<name of SYN_ROOT> ($OUT/synthetic by default).
# Usage on the GPU machine (carry nothing; .whl/.triton with TRITON_PACK for the packed Triton):
#   bash benchmarks/gpu_synthetic.sh
#   SYN_TASKS, SYN_ARMS, SYN_LENGTHS, SYN_LRS: the grid of the job list (written once per machine)
#   SYN_STEPS (3000), SYN_EVAL (eval interval, 200), SYN_PARALLEL (runs at once, 12), SYN_LIMIT (s, 540)
#   SYN_EXTRA: more arguments for every run, e.g. "--task-arg kv_pairs=32 --seed 7"; give such a
#     variant its own SYN_ROOT (run folders are named by task, arm, length and LR only)
#   MPS=1: the runs under CUDA MPS (gpu_env.sh's mps_start); leave it unset when the caller started MPS
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
ROOT=${SYN_ROOT:-runs/synthetic}; JOBS=$ROOT/jobs.jsonl
mkdir -p "$ROOT"
[ -f "$JOBS" ] || python3 launch/synthetic.py sweep --tasks "${SYN_TASKS:-palindrome,mqar,stack}" \
  --arms "${SYN_ARMS:-K,G}" --lengths "${SYN_LENGTHS:-1024}" --lrs "${SYN_LRS:-5e-4,1e-3}" --out "$ROOT" \
  --output "$JOBS" -- --bf16 --steps "${SYN_STEPS:-3000}" --eval-interval "${SYN_EVAL:-200}" --save --save-interval 1000 \
  ${SYN_EXTRA:-}
[ -n "${MPS:-}" ] && mps_start
# SIGINT reaches the runner only; it sends its runs SIGTERM, and each saves at its next step and exits
timeout -s INT "${SYN_LIMIT:-540}" python3 launch/synthetic.py run "$JOBS" --parallel "${SYN_PARALLEL:-12}"
nvidia-smi --query-gpu=memory.used --format=csv,noheader
[ -n "${MPS:-}" ] && mps_stop
for run in "$ROOT"/*/; do  # where each run stands: its last step and held-out accuracy
  python3 - "$run" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1]); rows = []
if (run / "metrics.jsonl").exists():
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
acc = [r for r in rows if "synthetic/token_accuracy" in r]
last = acc[-1] if acc else {}
steps = [r.get("step", 0) for r in rows if "step" in r]
print(f"{run.name:40s} step {max(steps, default=0):5d}  held-out token acc "
      f"{100 * last.get('synthetic/token_accuracy', 0):6.2f}% (at {last.get('step', '-')})"
      f"{'  done' if (run / 'result.json').exists() else ''}")
PY
done
REPORT=$OUT/$(basename "$ROOT")
python3 launch/synthetic.py report "$ROOT" --out "$REPORT" 2>&1 | tail -3
cat "$REPORT/synthetic_report.md" 2>/dev/null | head -40
tar -czf "$REPORT/runs.tgz" --exclude='iter_*' \
  -C "$ROOT" $(cd "$ROOT" && ls -d */ 2>/dev/null) jobs.jsonl 2>/dev/null
