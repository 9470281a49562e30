#!/usr/bin/env bash
# One GPU call that checks the training path of the stack on the lent H200: bf16 training (bf16
# weights, fp32 masters, Triton KDA) with AdamW and Muon, resume vs straight on the GPU, the KDA
# benchmark, and a short scaling-653m throughput run. Each step has its own time limit and writes
# its log under $OUT, so a step that runs long costs only itself.
# Usage on the GPU machine (carry .whl with the megatron-core and fla-core wheels, and cache/ with
# the default corpus):  bash benchmarks/gpu_check.sh [steps...]   (default: all steps)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
STEPS=${*:-"resume muon throughput kda"}
step resume 200 python3 benchmarks/resume_check.py --steps 20 --bf16 --out "$OUT/resume.json"
step muon 120 python3 launch/pretrain.py --config tiny --train-iters 40 --bf16 --log-interval 10 \
  --set train.data_cache_dir=cache/data --set train.optimizer=muon --save /tmp/run_muon
step throughput 240 python3 benchmarks/train_throughput.py --preset scaling-653m --arms kimi-linear,mla \
  --contexts 4096 --tokens-per-step 32768 --steps 4 --bf16 --out "$OUT/throughput.json"
step kda 200 python3 benchmarks/kda.py --shapes 8x4096,1x32768 --out "$OUT/kda_bench.json"
