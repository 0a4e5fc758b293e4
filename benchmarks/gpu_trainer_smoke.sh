#!/usr/bin/env bash
# GPU smoke run of the trainer: a tiny random Llama with SmolLM2's tokenizer (the GGUF is too big
# to carry), Triton backend through rlsc train and rlsc eval, bf16 autocast.
# Prepare on a CPU machine (ignored folder .gpucheck/, carried with the device run):
#   python -c "<save a LlamaConfig(hidden_size=64, 2 layers) model + the embedded tokenizer to .gpucheck/tiny>"
#   pip download --no-deps --python-version 3.12 -d .gpucheck/whl math-verify latex2sympy2_extended antlr4-python3-runtime
# Ran on an H100 on 2026-11-26: benchmarks/results/logs/h100-trainer-smoke.log.
set -u
OUT=${OUT:-/tmp/gpuout}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target .site .gpucheck/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/.site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
DEV=${DEV:-cuda}
timeout 100 python3 -m rlsc train --model .gpucheck/tiny --prompts builtin:demo --num-prompts 2 --num-samples 16 \
  --max-new-tokens 64 --steps 3 --checkpoint-every 2 --output-dir /tmp/g --device $DEV ${PREC:-} 2>&1 | tail -n 15 | tee "$OUT/train.log"
echo "train rc=${PIPESTATUS[0]}"
head -c 600 /tmp/g/metrics.jsonl; echo
timeout 60 python3 -m rlsc eval --model /tmp/g/final --prompts builtin:demo --k 4 --max-new-tokens 16 --device $DEV --output-dir /tmp/ge 2>&1 | tail -n 8 | tee "$OUT/eval.log"
echo "eval rc=${PIPESTATUS[0]}"
