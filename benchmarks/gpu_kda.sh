#!/usr/bin/env bash
# The KDA-kernel GPU call (issue 3) on the lent H200: the kernel tests (Triton kernels against the
# fp64 reference, FLA comparison, int64 addressing) and the no-host-sync test, optional debug runs
# (kda_debug.py variants, compute-sanitizer) and launch sweeps, then benchmarks/kda.py. Each step
# has its own time limit.
# Usage on the GPU machine (carry .whl, and .triton with TRITON_PACK):  bash benchmarks/gpu_kda.sh [steps...]
#   steps: tests debug sanitize bench bench_clamp bench_log tune tune_each   (default: tests bench)
#   TUNE_KERNELS: the kernels kda_tune.py sweeps (step tune)
#   KDA_TESTS, TEST_K: the test paths of step tests (default tests/kernels) and a pytest -k filter
#   TEST_SHARDS, TEST_TIMEOUT: parallel pytest processes (10) and each one's limit in s (380)
#   SKIP_SYNC_TEST: set to leave out tests/model/test_no_host_sync_gpu.py
#   KDA_COMPARE_FLA=0 / model: no error comparison with FLA / only the model-size one (FLA autotunes
#     for minutes per process; .triton/autotune.tar from an earlier bench call saves most of it; the
#     model-size comparison took 190 s with those results, so give it TEST_TIMEOUT >= 300)
#   BENCH_SHAPES: the shapes of step bench (default 8x4096,1x32768,1x32768v; v = book-length documents)
#   BENCH_DT: the dt_bias points of step bench (default -4,0,2); BENCH_BREAKDOWN=1: per-kernel times
#   BENCH_OPS: what step bench times (default ours,sdpa_flash,fla)
#   BENCH_LIMIT: seconds for step bench (default 300; the first FLA backward autotunes for minutes)
#   TRITON_PACK: a packed Triton to use instead of the machine's (gpu_env.sh, scripts/pack_triton.sh)
#   TUNE_ONLY: "kernel:index ..." candidates of kda_tune.py, each in its own process (step tune_each)
#   KDA_DEBUG_ARGS: extra kda_debug.py variants, ';'-separated (step debug)
#   SANITIZE_ARGS: kda_debug.py arguments run under compute-sanitizer's memcheck (step sanitize)
#   KDA_LAUNCH: launch overrides of our kernels, kernel[.few].option=N,... (kernels/kda/options.py), given
#     to every step as --launch (kda.py, kda_debug.py, kda_tune.py) or --kda-launch (pytest)
#   KDA_CLAMP: KDAOptions.diag_decay_clamp for step tests (--kda-diag-decay-clamp) and step bench; step
#     bench_clamp times ours alone with it (default 8) on bench's shapes and points, beside bench
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
source benchmarks/gpu_env.sh
STEPS=${*:-"tests bench"}
STEP_HIDE="^\\{|^[a-z_]+ \\{" STEP_TAIL=30  # tune rows and JSON stay in the logs
debug() {  # each ';'-separated argument list of kda_debug.py in its own process (a crash ends only it)
  local variants args
  IFS=';' read -ra variants <<< "${KDA_DEBUG_ARGS:-"--case dk_ne_dv --state-dtype input"}"
  for v in "${variants[@]}"; do
    read -ra args <<< "$v"
    timeout 90 python3 benchmarks/kda_debug.py "${args[@]}" ${KDA_LAUNCH:+--launch "$KDA_LAUNCH"} 2>&1 | grep -vE "Warning|warn" \
      | grep -E "^\[|kda_|Error|error" | tail -6
  done
}
tune_each() {
  for c in ${TUNE_ONLY:-bwd_dh:1}; do
    timeout 60 python3 benchmarks/kda_tune.py --kernels "${c%%:*}" --only "${c##*:}" --out "/tmp/tune_${c/:/_}.json" \
      ${KDA_LAUNCH:+--launch "$KDA_LAUNCH"} 2>&1 \
      | grep -E "^[a-z_]+ \{" | cut -c1-200
  done
}
tests() {  # the kernel tests in parallel pytest shards (compilation is CPU-bound), then the sync test;
  # each test's result line lands in $OUT/tests_progress.txt as it finishes (kept if a limit cuts the run)
  local dir n=${TEST_SHARDS:-10}
  dir=$(mktemp -d)
  python3 -m pytest -q -p no:cacheprovider --collect-only ${KDA_TESTS:-tests/kernels} ${TEST_K:+-k "$TEST_K"} \
    | grep "::" > "$dir/all.txt"
  for i in $(seq 0 $((n - 1))); do
    awk -v i="$i" -v n="$n" 'NR % n == i' "$dir/all.txt" > "$dir/$i.txt"
    timeout "${TEST_TIMEOUT:-380}" python3 -m pytest -v -p no:cacheprovider ${KDA_LAUNCH:+--kda-launch "$KDA_LAUNCH"} \
      ${KDA_CLAMP:+--kda-diag-decay-clamp "$KDA_CLAMP"} \
      $(cat "$dir/$i.txt") 2>&1 \
      | grep --line-buffered -E "(PASSED|FAILED|ERROR|SKIPPED)( |$)|^E  " >> "$OUT/tests_progress.txt" &
  done
  wait
  echo "$(wc -l < "$dir/all.txt") collected: $(grep -c " PASSED" "$OUT/tests_progress.txt") passed," \
    "$(grep -c " FAILED" "$OUT/tests_progress.txt") failed, $(grep -c " ERROR" "$OUT/tests_progress.txt") errors," \
    "$(grep -c " SKIPPED" "$OUT/tests_progress.txt") skipped"
  grep -E " FAILED| ERROR|^E  " "$OUT/tests_progress.txt" | head -20
  [ -n "${SKIP_SYNC_TEST:-}" ] || python3 -m pytest -q -p no:cacheprovider tests/model/test_no_host_sync_gpu.py 2>&1 | tail -3
}
step tune_each 420 bash -c "$(declare -f tune_each); tune_each"
step tests 400 bash -c "$(declare -f tests); tests"
step debug 300 env KDA_DEBUG_ARGS="${KDA_DEBUG_ARGS:-}" bash -c "$(declare -f debug); debug"
step sanitize 240 bash -c "compute-sanitizer --tool memcheck --print-limit 5 python3 benchmarks/kda_debug.py \
  ${SANITIZE_ARGS:---shape 1x2048 --state-dtype input} ${KDA_LAUNCH:+--launch $KDA_LAUNCH} 2>&1 | grep -vE 'Warning|warn' | grep -E 'ERROR|Invalid|at |kda_|\\[' | head -40"
step bench ${BENCH_LIMIT:-300} python3 benchmarks/kda.py --shapes "${BENCH_SHAPES:-8x4096,1x32768,1x32768v}" \
  --dt-bias="${BENCH_DT:--4,0,2}" --ops "${BENCH_OPS:-ours,sdpa_flash,fla}" ${BENCH_BREAKDOWN:+--breakdown} \
  ${KDA_LAUNCH:+--launch "$KDA_LAUNCH"} ${KDA_CLAMP:+--diag-decay-clamp "$KDA_CLAMP"} --out "$OUT/kda_bench.json"
step bench_clamp ${BENCH_LIMIT:-300} python3 benchmarks/kda.py --shapes "${BENCH_SHAPES:-8x4096,1x32768,1x32768v}" \
  --dt-bias="${BENCH_DT:--4,0,2}" --ops ours ${BENCH_BREAKDOWN:+--breakdown} --diag-decay-clamp "${KDA_CLAMP:-8}" \
  ${KDA_LAUNCH:+--launch "$KDA_LAUNCH"} --out "$OUT/kda_bench_clamp.json"
step bench_log 200 python3 benchmarks/kda.py --gate log --shapes 8x4096,1x32768 ${KDA_LAUNCH:+--launch "$KDA_LAUNCH"} \
  --out "$OUT/kda_bench_log.json"
step tune 360 python3 benchmarks/kda_tune.py --kernels "${TUNE_KERNELS:-fwd_intra,bwd_intra,fwd_h,bwd_dh}" \
  ${KDA_LAUNCH:+--launch "$KDA_LAUNCH"} --out "$OUT/kda_tune.json"
# the autotune results of this call (FLA's), for .triton/autotune.tar of the next one (gpu_env.sh)
(cd "$TRITON_CACHE" 2>/dev/null && find . -name "*.autotune.json" > /tmp/autotune.list \
  && [ -s /tmp/autotune.list ] && tar -cf "$OUT/autotune.tar" -T /tmp/autotune.list) || true
