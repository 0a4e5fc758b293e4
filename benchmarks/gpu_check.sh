#!/usr/bin/env bash
# One run on the lent GPU machine, inside TOTAL seconds (default 420, leaving a 15-minute device
# budget room for the machine's start and a rerun): install the peer wheels, run the GPU tests
# (single pass in real bf16, no-sync check, the two-sweep kernels), then the comparison rows issues
# 7 and 8 still need measured, most important first, all into one compare.json:
#   A. headline (Qwen2.5-Math-7B head, 16 x 1024, bf16): ours on every path (auto, single pass,
#      two sweeps, exact, filtered), one logits GEMM, CCE, TRL, Liger scaled CE, Liger GRPO, naive;
#   P. the single pass's stages timed one by one (benchmarks/single_pass_profile.py);
#   B. 16 x 3072 on the same head: ours (auto / single pass / two sweeps), GEMM, CCE, TRL (the
#      single-pass row raises buffer_bytes to hold one 3072-token sequence; "auto" keeps the
#      default budget and takes the two-sweep path there);
#   C. the training step (naive vs fused), if time is left; then TRL's fused head vs ours through
#      a random Qwen2.5-1.5B, 16 x 1024 (benchmarks/trl_head.py -> trl_head.{log,json});
#   D. the rest of the default comparison (other heads and lengths), as time allows;
# and the report. Everything lands in $OUT (setup.log tests.log compare.log compare.json
# results.md results.png, train_step.{log,json} if C ran); a short summary is printed last.
#
#   usage (repository root, wheels copied into .whl/):  bash benchmarks/gpu_check.sh [TOTAL_SECONDS=420]
#   env: OUT (default ./gpu_out), RLSC_COMMIT (the commit under test, when .git is not there),
#        RLSC_COMPARE_ARGS / RLSC_TRAIN_ARGS (extra arguments, e.g. tiny shapes for a dry run on CPU),
#        RLSC_HEAD (head of stages A and B, default qwen2.5-math-7b), RLSC_TEST_ARGS (pytest selection),
#        RLSC_PROFILE_ARGS (arguments of single_pass_profile.py)
#
# Each stage runs under `timeout` and its cap shrinks to what is left of TOTAL, so the whole
# script ends inside TOTAL seconds whatever fails; a failing stage is logged, not fatal.
set -u
START=$(date +%s)
TOTAL=${1:-420}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/rlsc_bench.XXXXXX")
mkdir -p "$SCRATCH"
SUMMARY=$SCRATCH/summary.txt
: > "$SUMMARY"
HEAD_NAME=${RLSC_HEAD:-qwen2.5-math-7b}

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
        echo "no wheels in .whl/: liger, cce, trl and pytest-benchmark rows will be error rows"
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
for m in ("liger_kernel.chunked_loss", "liger_kernel.ops.fused_linear_scaled_cross_entropy", "cut_cross_entropy",
          "trl.kernels", "pytest_benchmark", "matplotlib", "rlsc_kernels", "rlsc_kernels.backends.triton_single_pass"):
    try:
        importlib.import_module(m); print("import", m, "ok")
    except Exception as e:
        print("import", m, "FAILED:", type(e).__name__, e)
PY
note "setup done (commit $RLSC_COMMIT): $(grep -E '^(torch|import .*FAILED)' "$OUT/setup.log" | tr '\n' ';')"

# ---------------------------------------------------------------- 2. GPU tests
# every gpu-marked test: the single pass in real bf16, the no-host-sync check
# (torch.cuda.set_sync_debug_mode("error") with check_values=False), the two-sweep kernels
T=$(cap 150 240)
timeout -k 5 "$T" python3 -m pytest -q -m gpu ${RLSC_TEST_ARGS:-tests} -p no:cacheprovider -rs > "$OUT/tests.log" 2>&1
rc=$?
note "gpu tests rc=$rc (cap ${T}s): $(tail -n 1 "$OUT/tests.log")"

# ---------------------------------------------------------------- 3. comparison
LABEL="GPU run of benchmarks/gpu_check.sh: bf16, 16 sequences per batch, realistic inputs"
CMP=(python3 -m benchmarks.compare --out "$OUT/compare.json" --scratch "$SCRATCH" --label "$LABEL" --resume)
# compare LABEL CAP RESERVE ARGS...: one compare.py process appending to compare.json
compare() {
    local what=$1 want=$2 reserve=$3; shift 3
    local T B
    T=$(cap "$want" "$reserve"); B=$(( T - 20 )); (( B < 10 )) && B=10
    timeout -k 5 "$T" "${CMP[@]}" --budget-s "$B" "$@" ${RLSC_COMPARE_ARGS:-} >> "$OUT/compare.log" 2>&1
    RC=$?
    note "compare $what rc=$RC (budget ${B}s, cap ${T}s)"
}
RC=0
# (within one process the core impls run before the others, so the headline is split in two)
HEADLINE_IMPLS=rlsc-triton,matmul-floor,cce,trl,liger-scaled-ce,rlsc-triton-single-pass,rlsc-triton-two-sweep,rlsc-triton-single-pass-2seq
HEADLINE_MORE=liger,rlsc-triton-exact,rlsc-triton-filtered,torch-naive
LONG_IMPLS=rlsc-triton,rlsc-triton-single-pass,matmul-floor,cce,trl,rlsc-triton-two-sweep
compare "A1 (headline: ${HEAD_NAME} 16x1024)" 100 130 --heads "$HEAD_NAME" --seq-lens 1024 --impls "$HEADLINE_IMPLS"
compare "A2 (headline, more impls)" 80 90 --heads "$HEAD_NAME" --seq-lens 1024 --impls "$HEADLINE_MORE"
# where the single pass's time goes: each stage of one chunk alone, the whole call, one GEMM
if (( $(left) > 200 )); then
    T=$(cap 45 150)
    timeout -k 5 "$T" python3 -m benchmarks.single_pass_profile --out "$OUT/single_pass_profile.json" \
        ${RLSC_PROFILE_ARGS:-} > "$OUT/single_pass_profile.log" 2>&1
    note "single-pass profile rc=$? (cap ${T}s): $(grep -E '"single_pass_over_gemm"' "$OUT/single_pass_profile.log")"
fi
# the single pass at every length (issue 19): 16 x 3072 against three full-size GEMMs, alternating,
# with its dispatcher GEMM count and chunk layout
if (( $(left) > 150 )); then
    T=$(cap 90 120)
    timeout -k 5 "$T" python3 -m benchmarks.single_pass_lengths --device cuda --head "$HEAD_NAME" --dtype bfloat16 \
        --shapes 16x3072 --rounds 3 --out "$OUT/single_pass_lengths.json" > "$OUT/single_pass_lengths.log" 2>&1
    note "single pass 16x3072 rc=$? (cap ${T}s): $(grep -E '^16x3072:' "$OUT/single_pass_lengths.log")"
fi
compare "B (${HEAD_NAME} 16x3072)" 80 40 --heads "$HEAD_NAME" --seq-lens 3072 --impls "$LONG_IMPLS" --ops rlsc_fwd_bwd,logprobs_fwd

# ---------------------------------------------------------------- 4. training step (if time is left)
if (( $(left) > 150 )); then
    T=$(cap 110 40)
    timeout -k 5 "$T" python3 -m benchmarks.train_step --out "$OUT/train_step.json" ${RLSC_TRAIN_ARGS:-} > "$OUT/train_step.log" 2>&1
    note "train step rc=$? (cap ${T}s): $(grep -c '"variant"' "$OUT/train_step.log") variants"
fi

# ---------------------------------------------------------------- 4b. TRL's fused head vs ours (issue 9)
# GRPO-style scoring pass (forward + backward of per-token log-probs) through a random
# Qwen2.5-1.5B, 16 x 1024 completion tokens: TRL's kernel, TRL's wrapper on our op, our head.
if (( $(left) > 150 )); then
    T=$(cap 120 40)
    timeout -k 5 "$T" python3 -m benchmarks.trl_head --device cuda --shape qwen2.5-1.5b --target-ms 2000 \
        --out "$OUT/trl_head.json" > "$OUT/trl_head.log" 2>&1
    note "trl head rc=$? (cap ${T}s): $(grep -c '"impl"' "$OUT/trl_head.log") rows"
fi

# ---------------------------------------------------------------- 4c. whole RLSC steps under 24 / 16 GB (issue 11)
# sample + update at the Qwen2.5-Math-1.5B shape, ours vs naive, full vs LoRA r16, 1024 / 3072 tokens,
# then generation (generate / dynamic / static+CUDA graphs) and the update with/without Liger; rows
# are written as they finish, rows not started by --time-budget-s are skipped (RLSC_MEMORY_ARGS: extra)
if (( $(left) > 150 )); then
    T=$(cap 300 40)
    timeout -k 5 "$T" python3 -m benchmarks.memory_budget --time-budget-s $(( T - 90 )) --rollouts --liger \
        --out "$OUT/memory_budget.json" --png "$OUT/memory_budget.png" ${RLSC_MEMORY_ARGS:-} > "$OUT/memory_budget.log" 2>&1
    note "memory budget rc=$? (cap ${T}s): $(grep -E '^# In ' "$OUT/memory_budget.log")"
fi

# ---------------------------------------------------------------- 5. the rest of the comparison
# (a fresh process resumes after a sticky CUDA error, which ends compare.py with code 3)
for attempt in 1 2 3; do
    (( $(left) < 60 )) && break
    compare "D (rest, attempt $attempt)" $(( $(left) - 30 )) 30
    [ "$RC" -eq 3 ] || break
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
