#!/usr/bin/env bash
# A short follow-up on the lent GPU (about 3 minutes): the GPU tests, then the headline rows
# (Qwen2.5-7B head, N = 16384, bf16) for rlsc-triton, cce and the matmul floor, and ours again
# with a 128 MB grad-logits buffer instead of 256 MB. Writes under $OUT.
set -u
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD/.site:$PWD:${PYTHONPATH:-}
timeout 75 python3 -m pytest -q -p no:cacheprovider tests/rlsc_kernels/test_gpu.py > "$OUT/tests.log" 2>&1
echo "gpu tests rc=$?: $(tail -n 1 "$OUT/tests.log")"
CMP=(python3 -m benchmarks.compare --heads qwen2.5-math-7b --seq-lens 1024 --target-ms 400)
timeout 70 "${CMP[@]}" --impls rlsc-triton,cce,matmul-floor --out "$OUT/quick.json" > "$OUT/quick.log" 2>&1
echo "compare rc=$?"
# The same row with buffer_bytes=128 MB (an explicit keyword of the op) instead of the default 256 MB.
BUF128='import functools, sys, types, rlsc_kernels as rk, benchmarks.impls as I, benchmarks.compare as C
I._rk = lambda: types.SimpleNamespace(linear_logprobs=rk.linear_logprobs,
                                      linear_rlsc_loss=functools.partial(rk.linear_rlsc_loss, buffer_bytes=128 << 20))
sys.exit(C.main(sys.argv[1:]))'
timeout 35 python3 -c "$BUF128" "${CMP[@]:3}" --impls rlsc-triton --ops rlsc_fwd_bwd --out "$OUT/quick128.json" > "$OUT/quick128.log" 2>&1
echo "compare (128 MB) rc=$?"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for name in ("quick.json", "quick128.json"):
    p = pathlib.Path(sys.argv[1]) / name
    if not p.exists():
        print(name, "missing"); continue
    for r in json.loads(p.read_text())["results"]:
        print(name, r["op"], r["impl"], r.get("median_ms"), r.get("peak_mem_mb"), r.get("max_rel_err"), (r.get("error") or "")[:100])
PY
