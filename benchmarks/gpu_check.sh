#!/usr/bin/env bash
# One run on the lent GPU machine: install the peer wheels, run the GPU tests, the comparison
# (headline rows first), the training step, the rest of the comparison as time allows, and the
# report. Everything lands in $OUT (8 files: setup.log tests.log compare.log train_step.log
# compare.json train_step.json results.md results.png); a short summary is printed last.
#
#   usage (repository root, wheels copied into .whl/):  bash benchmarks/gpu_check.sh [TOTAL_SECONDS=450]
#   env: OUT (default ./gpu_out), RLSC_COMMIT (the commit under test, when .git is not there),
#        RLSC_COMPARE_ARGS / RLSC_TRAIN_ARGS (extra arguments, e.g. tiny shapes for a dry run on CPU)
#
# Each stage runs under `timeout` and its cap shrinks to what is left of TOTAL, so the whole
# script ends inside TOTAL seconds whatever fails; a failing stage is logged, not fatal.
set -u
START=$(date +%s)
TOTAL=${1:-450}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/rlsc_bench.XXXXXX")
mkdir -p "$SCRATCH"
SUMMARY=$SCRATCH/summary.txt
: > "$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }
# cap WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for the later stages (>= 5)
cap() { local c=$1 l=$(( $(left) - $2 )); (( l < c )) && c=$l; (( c < 5 )) && c=5; echo "$c"; }
note() { echo "[+$(elapsed)s] $*" | tee -a "$SUMMARY"; }

# ---------------------------------------------------------------- 1. set-up
{
    echo "== $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    if ls .whl/*.whl >/dev/null 2>&1; then
        timeout 90 python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl 2>&1
        rc=$?
        echo "pip rc=$rc"
        if [ $rc -ne 0 ]; then  # pure-Python wheels: unpacking them is an install
            python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('.site') for w in glob.glob('.whl/*.whl')]"
            echo "unzipped the wheels into .site: rc=$?"
        fi
    else
        echo "no wheels in .whl/: liger, cce and pytest-benchmark rows will be error rows"
    fi
} > "$OUT/setup.log" 2>&1
export PYTHONPATH=$PWD/.site:$PWD:${PYTHONPATH:-}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [ -z "${RLSC_COMMIT:-}" ]; then
    RLSC_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
fi
export RLSC_COMMIT
timeout 60 python3 - >> "$OUT/setup.log" 2>&1 <<'PY'
import importlib, torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
print("triton", triton.__version__, "transformers", transformers.__version__)
for m in ("liger_kernel.chunked_loss", "cut_cross_entropy", "pytest_benchmark", "matplotlib", "rlsc_kernels"):
    try:
        importlib.import_module(m); print("import", m, "ok")
    except Exception as e:
        print("import", m, "FAILED:", type(e).__name__, e)
PY
note "setup done (commit $RLSC_COMMIT): $(grep -E '^(torch|import .*FAILED)' "$OUT/setup.log" | tr '\n' ';')"

# ---------------------------------------------------------------- 2. GPU tests
T=$(cap 120 300)
timeout -k 5 "$T" python3 -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/tests.log" 2>&1
rc=$?
note "gpu tests rc=$rc (cap ${T}s): $(tail -n 1 "$OUT/tests.log")"

# ---------------------------------------------------------------- 3. comparison, headline rows first
LABEL="GPU run of benchmarks/gpu_check.sh: bf16, 16 sequences per batch, realistic inputs"
CMP=(python3 -m benchmarks.compare --out "$OUT/compare.json" --scratch "$SCRATCH" --label "$LABEL" ${RLSC_COMPARE_ARGS:-})
B=$(( $(left) - 200 )); (( B > 150 )) && B=150; (( B < 20 )) && B=20
T=$(cap 230 130)
timeout -k 5 "$T" "${CMP[@]}" --budget-s "$B" > "$OUT/compare.log" 2>&1
note "compare (headline first) rc=$? (budget ${B}s, cap ${T}s)"

# ---------------------------------------------------------------- 4. training step
T=$(cap 110 40)
timeout -k 5 "$T" python3 -m benchmarks.train_step --out "$OUT/train_step.json" ${RLSC_TRAIN_ARGS:-} > "$OUT/train_step.log" 2>&1
note "train step rc=$? (cap ${T}s): $(grep -c '"variant"' "$OUT/train_step.log") variants"

# ---------------------------------------------------------------- 5. the rest of the comparison
for attempt in 1 2 3 4 5; do
    L=$(left)
    (( L < 60 )) && break
    T=$(( L - 30 ))
    timeout -k 5 "$T" "${CMP[@]}" --resume --budget-s $(( T - 25 )) >> "$OUT/compare.log" 2>&1
    rc=$?
    note "compare (resume $attempt) rc=$rc (cap ${T}s)"
    [ $rc -eq 0 ] && break
done

# ---------------------------------------------------------------- 6. report
[ -f "$SCRATCH/compare.json" ] && cp "$SCRATCH/compare.json" "$OUT/compare.json"
TRAIN=()
[ -f "$OUT/train_step.json" ] && TRAIN=(--train "$OUT/train_step.json")
if [ -f "$OUT/compare.json" ]; then
    timeout 40 python3 -m benchmarks.report "$OUT/compare.json" "${TRAIN[@]}" --md "$OUT/results.md" \
        --png "$OUT/results.png" > /dev/null 2>> "$OUT/compare.log"
    note "report rc=$?"
    echo
    echo "==================== summary ===================="
    cat "$SUMMARY"
    echo
    timeout 30 python3 -m benchmarks.report "$OUT/compare.json" "${TRAIN[@]}" --summary
else
    note "no compare.json"
    cat "$SUMMARY"
    tail -n 30 "$OUT/compare.log"
fi
echo "total $(elapsed)s; files: $(ls "$OUT" | tr '\n' ' ')"
