#!/usr/bin/env bash
# One GPU call that checks what was built without a GPU: the GPU-marked tests of the newer code
# (device-independent init, context parallelism, CP pre-passes, synthetic tasks, the transformers
# baseline), a before/after of the KDA benchmark and one training-throughput row (same call, the
# tree before a refactor in $BEFORE_TREE), the chunkwise-CP pre-pass cost and the memory model.
# Usage on the GPU machine (carry .whl, .triton, cache and the before tree):
#   BEFORE_TREE=.before bash benchmarks/gpu_validate.sh [steps...]
#   steps: tests cp_tests conv kda_before kda_after tp_before tp_after arms cp cp_tf32 cp_profile memory
#   (default: all but cp_tests, arms, cp_tf32 and cp_profile)
#   make the before tree here with:  mkdir .before && git archive REV | tar -x -C .before
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TRITON_PACK=${TRITON_PACK:-.triton/triton-3.7.1.tar.xz}
source benchmarks/gpu_env.sh
# as benchmarks/gpu_throughput.sh: fewer fragmentation failures near the memory limit (a paired
# throughput call with --steps 10 ran out of memory at 121.7 GiB of peak use)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
STEPS=${*:-"tests kda_before kda_after tp_before tp_after cp memory"}
BEFORE=${BEFORE_TREE:-.before}
KDA_ARGS=${KDA_ARGS:-"--shapes 8x4096,1x32768 --dt-bias=-4,2 --ops ours"}  # KDA_ARGS: other points
TP_ARGS=${TP_ARGS:-"--preset scaling-653m --arms kimi-linear --contexts 4096 --tokens-per-step 32768 --steps 6 --bf16"}  # TP_ARGS, TP_LIMIT: other rows
# the before tree's own benchmark scripts and packages (in place of the checkout's on PYTHONPATH)
BEFORE_ENV="PYTHONPATH=${PYTHONPATH/$PWD/$(realpath "$BEFORE")}"
# a hang is killed with SIGABRT, and the log then ends with every thread's stack
PYTHONFAULTHANDLER=1 STEP_SIGNAL=ABRT step tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/model/test_init_gpu.py \
  tests/parallel/test_context_parallel_gpu.py tests/kernels/test_kda_cp_prepass.py tests/launch/test_synthetic.py \
  tests/launch/test_hf_baseline.py tests/model/test_lm_head_loss_gpu.py tests/model/test_attention_gpu.py \
  tests/model/test_no_host_sync_gpu.py tests/train/test_training.py tests/train/test_host_copy.py \
  tests/kernels/test_short_conv.py tests/model/test_fusion_gpu.py
# every test of the CP pre-pass files on the GPU, the unmarked fp32 ones too (they then run the real kernels)
step cp_tests 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kda_cp_prepass.py \
  tests/parallel/test_context_parallel_gpu.py
# the short convolution + SiLU: Triton kernels against inductor and eager PyTorch, f+b time and errors
step conv 120 python3 benchmarks/short_conv.py --out "$OUT/short_conv.json"
step kda_before 150 bash -c "cd $BEFORE && env $BEFORE_ENV python3 benchmarks/kda.py $KDA_ARGS --out $OUT/kda_before.json"
step kda_after 150 python3 benchmarks/kda.py $KDA_ARGS --out "$OUT/kda_after.json"
step tp_before ${TP_LIMIT:-150} bash -c "cd $BEFORE && env $BEFORE_ENV python3 benchmarks/train_throughput.py $TP_ARGS --baseline none \
  --out $OUT/tp_before.json"
step tp_after ${TP_LIMIT:-150} python3 benchmarks/train_throughput.py $TP_ARGS --baseline none --out "$OUT/tp_after.json"
# Kimi Linear and MLA without recompute, compiled, each twice in turn (K M K M): one call's numbers
# moved 7% between two runs of the same arm, so the pair says how far apart repeated runs are
# (ARMS_RUNS=1: each once)
ARMS_ARGS="--preset scaling-653m --contexts 4096 --tokens-per-step 32768 --steps 5 --bf16 --compile --baseline none"
for run in $(seq 1 "${ARMS_RUNS:-2}"); do
  for arm in kimi-linear mla; do
    step arms 200 python3 benchmarks/train_throughput.py $ARMS_ARGS --arms $arm --out "$OUT/arms_${arm}_$run.json"
  done
done
# CP_LAUNCH: launch overrides of the pre-pass kernels for steps cp and cp_tf32 (e.g. cp_transition.num_stages=2)
CP_ARGS=(--heads 32 --shards 4096,16384,65536 --cp 2,4,8 ${CP_LAUNCH:+--launch "$CP_LAUNCH"})
step cp 150 python3 benchmarks/cp_kda.py "${CP_ARGS[@]}" --out "$OUT/cp_kda.json"
step cp_tf32 150 python3 benchmarks/cp_kda.py "${CP_ARGS[@]}" --cp-precision tf32 --out "$OUT/cp_kda_tf32.json"
# the 4k shards, per kernel: is the slowest rank's extra GPU work or the GPU waiting for the host?
step cp_profile 150 python3 benchmarks/cp_kda.py --heads 32 --shards 4096,16384 --cp 2,8 --cp-precision tf32 --profile \
  ${CP_LAUNCH:+--launch "$CP_LAUNCH"} --out "$OUT/cp_kda_profile.json"
step memory 240 python3 benchmarks/memory_model.py --seq-lengths 4096,8192,16384 --recompute none,all --loss-chunk-tokens 0,4096 -- \
  --config scaling-653m --bf16 --micro-batch-size 1 --global-batch-size 1 --set train.optimizer=adamw \
  --set train.data_cache_dir=cache/data
