#!/usr/bin/env bash
# The KDA kernels under a second Triton release (default 3.7.1: the issue asks for 3.6, the GPU
# machine's, and 3.7; CI's venv has the newest allowed): the kernel tests in that release's
# interpreter, then an sm_90 compile of every chunkwise kernel with its compiler and ptxas
# (benchmarks/kda_aot.py; no GPU needed). Called by .ci/run after the test command.
# Usage: bash scripts/check_triton.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.7.1}
DIR=${TRITON_CHECK_DIR:-/tmp/triton-$VERSION}
[ -f "$DIR/triton/__init__.py" ] || .venv/bin/python -m pip install -q --no-deps --target "$DIR" "triton==$VERSION"
export PYTHONPATH="$DIR"
.venv/bin/python -c "import triton, sys; sys.exit(0 if triton.__version__ == '$VERSION' else f'got triton {triton.__version__}')"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/kernels
.venv/bin/python -W ignore benchmarks/kda_aot.py
