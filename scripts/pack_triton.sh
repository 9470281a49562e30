#!/usr/bin/env bash
# Packs a Triton release small enough to carry to the lent GPU machine (its calls carry at most
# 64 MiB; the Triton 3.7.1 wheel is 189 MiB). Keeps what compiling and launching kernels for
# NVIDIA GPUs needs: the Python package, libtriton.so with its symbol tables stripped (461 ->
# 180 MB), ptxas, cuobjdump (register reports) and libdevice. Drops the Blackwell ptxas, CUPTI and the
# proton profiler (loaded only by triton.profiler) and nvdisasm; the small AMD backend
# stays (the entry points list it, and `import triton` loads every listed backend). Needs PyPI.
# Usage (on this machine):  bash scripts/pack_triton.sh [VERSION]   -> .triton/triton-VERSION.tar.xz
# On the GPU machine:       TRITON_PACK=.triton/triton-VERSION.tar.xz bash benchmarks/gpu_kda.sh tests
set -euo pipefail
VERSION=${1:-3.7.1}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  -d "$WORK/wheel" "triton==$VERSION"
mkdir -p "$WORK/site" && (cd "$WORK/site" && python3 -m zipfile -e "$WORK"/wheel/triton-*.whl .)
cd "$WORK/site"
rm -rf triton/_C/libproton.so triton/backends/nvidia/lib/cupti \
  triton/backends/nvidia/bin/ptxas-blackwell triton/backends/nvidia/bin/nvdisasm
strip --strip-unneeded triton/_C/libtriton.so
chmod +x triton/backends/nvidia/bin/*   # python -m zipfile drops the executable bits
cd - > /dev/null
mkdir -p .triton
tar -C "$WORK/site" -cf - . | xz -T2 -6 > ".triton/triton-$VERSION.tar.xz"
ls -l ".triton/triton-$VERSION.tar.xz"
