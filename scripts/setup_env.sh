#!/usr/bin/env bash
# Create .venv with Python 3.12 (megatron-core >= 0.17 needs it) and install the project.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    for candidate in python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            echo "$candidate"; return
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        version=$(pyenv versions --bare | grep -E '^3\.12(\.|$)' | tail -n 1)
        if [ -n "$version" ]; then echo "$(pyenv root)/versions/$version/bin/python3"; return; fi
    fi
    echo "error: Python 3.12 not found (megatron-core needs it); install it or put python3.12 on PATH" >&2
    exit 1
}

if [ ! -x .venv/bin/python ]; then
    "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, triton, megatron.core, transformers; print('environment ready: torch', torch.__version__, '| triton', triton.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
