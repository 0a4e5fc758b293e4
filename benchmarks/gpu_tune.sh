#!/usr/bin/env bash
# First look on a lent GPU: the GPU tests and a block-size / backward-strategy sweep at the
# Qwen2.5-7B head. Writes logs and tune.json under $OUT. Usage (device tool, carry .whl):
#   bash benchmarks/gpu_tune.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/rlsc_kernels/test_gpu.py -rA 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout 260 python3 -m benchmarks.tune_blocks --budget-s 200 --out "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log"
