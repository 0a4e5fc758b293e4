#!/usr/bin/env bash
# One run on the lent GPU machine, inside TOTAL seconds (default 420, leaving a 15-minute device
# budget room for the machine's start and a rerun). Stages run by priority, each under its own
# time box (a cap that shrinks to what is left of TOTAL), so a short loan answers the most
# important question first; a failing stage is logged, not fatal:
#   1. set-up, and the evidence record (evidence.json: device, driver, torch / triton / CUDA
#      versions, commit, date) that every later stage adds its outcome to;
#   2. correctness on the GPU, most important first: the regime matrix (every entry point x
#      dtype x plain / GradScaler / autocast x grad_output x eager / compiled, test_gpu.py) and
#      the sync-free route in every regime; then every other gpu-marked test (the single pass in
#      real bf16, the two-sweep kernels, int64 offsets);
#   3. the headline rows (Qwen2.5-Math-7B head, 16 x 1024, bf16): ours on every path (auto,
#      single pass, two sweeps, exact, filtered), one logits GEMM, CCE, TRL, Liger, naive;
#   4. the trainer smoke with each sampler (static, compact, dynamic; benchmarks/gpu_trainer_smoke.sh,
#      when its .gpucheck/ model is carried);
#   5. the memory budget (whole RLSC steps under 24 / 16 GB);
#   6. as time allows: the single pass's stage profile, 16 x 3072, the training step, TRL's head,
#      the rest of the comparison; the report.
# evidence.json is what flips a CUDA default (docs: the single pass becomes the default where its
# GPU tests pass and its headline row beats the two sweeps on this device; the trainer's sampler
# likewise from stage 4): it records, per stage, the return code and the numbers that decide it.
#
#   usage (repository root, wheels copied into .whl/):  bash benchmarks/gpu_check.sh [TOTAL_SECONDS=420]
#   env: OUT (default ./gpu_out), RLSC_COMMIT (the commit under test, when .git is not there),
#        RLSC_COMPARE_ARGS / RLSC_TRAIN_ARGS (extra arguments, e.g. tiny shapes for a dry run on CPU),
#        RLSC_HEAD (head of stages 3 and 6, default qwen2.5-math-7b), RLSC_TEST_ARGS (pytest selection),
#        RLSC_PROFILE_ARGS (arguments of single_pass_profile.py)
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
# evidence KEY RC [DETAIL]: one stage's outcome into evidence.json (created with the machine facts)
EVIDENCE=$OUT/evidence.json
timeout 30 python3 - "$EVIDENCE" "$RLSC_COMMIT" >> "$OUT/setup.log" 2>&1 <<'PY'
import datetime, json, platform, subprocess, sys, torch, triton
facts = {"commit": sys.argv[2], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
         "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
         "python": platform.python_version(), "stages": {}}
try:
    facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
except Exception as e:  # noqa: BLE001
    facts["driver"] = f"unknown ({e})"
json.dump(facts, open(sys.argv[1], "w"), indent=1)
PY
evidence() {
    timeout 20 python3 - "$EVIDENCE" "$@" <<'PY' 2>/dev/null
import json, sys
path, key, rc, detail = sys.argv[1], sys.argv[2], int(sys.argv[3]), " ".join(sys.argv[4:])
data = json.load(open(path))
data["stages"][key] = {"rc": rc, "detail": detail}
json.dump(data, open(path, "w"), indent=1)
PY
}

# ---------------------------------------------------------------- 2. GPU tests (matrix first)
T=$(cap 150 270)
timeout -k 5 "$T" python3 -m pytest -q -p no:cacheprovider -rs tests/rlsc_kernels/test_gpu.py \
    -k "regime_matrix_on_gpu or sync_free_route" > "$OUT/matrix.log" 2>&1
rc=$?
note "regime matrix on GPU rc=$rc (cap ${T}s): $(tail -n 1 "$OUT/matrix.log")"
evidence regime_matrix "$rc" "$(tail -n 1 "$OUT/matrix.log")"
# every other gpu-marked test: the single pass in real bf16, the no-host-sync check, the two sweeps
T=$(cap 120 240)
timeout -k 5 "$T" python3 -m pytest -q -m gpu ${RLSC_TEST_ARGS:-tests} -p no:cacheprovider -rs \
    -k "not regime_matrix_on_gpu and not sync_free_route" > "$OUT/tests.log" 2>&1
rc=$?
note "gpu tests rc=$rc (cap ${T}s): $(tail -n 1 "$OUT/tests.log")"
evidence gpu_tests "$rc" "$(tail -n 1 "$OUT/tests.log")"
SP_FAILED=$(grep -cE "^FAILED .*single_pass" "$OUT/tests.log")
evidence single_pass_gpu_tests "$SP_FAILED" "failed single-pass GPU tests: $SP_FAILED (0 and rc 0 above = correct on this device)"

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
compare "A1 (headline: ${HEAD_NAME} 16x1024)" 100 200 --heads "$HEAD_NAME" --seq-lens 1024 --impls "$HEADLINE_IMPLS"
compare "A2 (headline, more impls)" 70 170 --heads "$HEAD_NAME" --seq-lens 1024 --impls "$HEADLINE_MORE"
[ -f "$SCRATCH/compare.json" ] && cp "$SCRATCH/compare.json" "$OUT/compare.json"
# the numbers that decide the CUDA default path: single pass vs two sweeps, same rows, this device
timeout 20 python3 - "$OUT/compare.json" "$EVIDENCE" <<'PY' >> "$OUT/compare.log" 2>&1
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["results"]
except Exception as e:  # noqa: BLE001
    rows = []
pick = {r["impl"]: r for r in rows if r.get("op") == "rlsc_fwd_bwd" and r.get("N") == 16384}
sp, ts = pick.get("rlsc-triton-single-pass", {}), pick.get("rlsc-triton-two-sweep", {})
data = json.load(open(sys.argv[2]))
data["default_path"] = {"single_pass_ms": sp.get("median_ms"), "two_sweep_ms": ts.get("median_ms"),
                        "single_pass_err": sp.get("max_rel_err"), "two_sweep_err": ts.get("max_rel_err"),
                        "gemm_ms": pick.get("matmul-floor", {}).get("median_ms")}
json.dump(data, open(sys.argv[2], "w"), indent=1)
print("default path evidence:", data["default_path"])
PY
note "default-path evidence: $(tail -n 1 "$OUT/compare.log")"

# ---------------------------------------------------------------- 4. trainer smoke, each sampler
if [ -d .gpucheck/tiny ]; then
    for SAMPLER in static compact dynamic; do
        (( $(left) < 140 )) && break
        T=$(cap 60 120)
        OUT="$OUT/smoke-$SAMPLER" PREC="--sampler $SAMPLER" timeout -k 5 "$T" bash benchmarks/gpu_trainer_smoke.sh \
            > "$OUT/smoke-$SAMPLER.log" 2>&1
        rc=$?
        note "trainer smoke sampler=$SAMPLER rc=$rc (cap ${T}s): $(grep -E 'train rc|eval rc' "$OUT/smoke-$SAMPLER.log" | tr '\n' ' ')"
        evidence "sampler_$SAMPLER" "$rc" "$(grep -E 'train rc|eval rc|s/step|tok/s' "$OUT/smoke-$SAMPLER.log" | tail -n 3 | tr '\n' ' ')"
    done
else
    note "trainer smoke skipped: .gpucheck/tiny not carried (see benchmarks/gpu_trainer_smoke.sh)"
fi

# ---------------------------------------------------------------- 5. whole RLSC steps under 24 / 16 GB (issue 11)
# sample + update at the Qwen2.5-Math-1.5B shape, ours vs naive, full vs LoRA r16, 1024 / 3072 tokens,
# then generation (generate / dynamic / static+CUDA graphs) and the update with/without Liger; rows
# are written as they finish, rows not started by --time-budget-s are skipped (RLSC_MEMORY_ARGS: extra)
if (( $(left) > 150 )); then
    T=$(cap 240 40)
    timeout -k 5 "$T" python3 -m benchmarks.memory_budget --time-budget-s $(( T - 90 )) --rollouts --liger \
        --out "$OUT/memory_budget.json" --png "$OUT/memory_budget.png" ${RLSC_MEMORY_ARGS:-} > "$OUT/memory_budget.log" 2>&1
    rc=$?
    note "memory budget rc=$rc (cap ${T}s): $(grep -E '^# In ' "$OUT/memory_budget.log")"
    evidence memory_budget "$rc" "$(grep -E '^# In ' "$OUT/memory_budget.log" | tr '\n' ' ')"
fi

# ---------------------------------------------------------------- 6. as time allows
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
if (( $(left) > 120 )); then
    compare "B (${HEAD_NAME} 16x3072)" 80 40 --heads "$HEAD_NAME" --seq-lens 3072 --impls "$LONG_IMPLS" --ops rlsc_fwd_bwd,logprobs_fwd
fi
if (( $(left) > 150 )); then
    T=$(cap 110 40)
    timeout -k 5 "$T" python3 -m benchmarks.train_step --out "$OUT/train_step.json" ${RLSC_TRAIN_ARGS:-} > "$OUT/train_step.log" 2>&1
    note "train step rc=$? (cap ${T}s): $(grep -c '"variant"' "$OUT/train_step.log") variants"
fi
# GRPO-style scoring pass through a random Qwen2.5-1.5B, 16 x 1024: TRL's kernel vs ours (issue 9)
if (( $(left) > 150 )); then
    T=$(cap 120 40)
    timeout -k 5 "$T" python3 -m benchmarks.trl_head --device cuda --shape qwen2.5-1.5b --target-ms 2000 \
        --out "$OUT/trl_head.json" > "$OUT/trl_head.log" 2>&1
    note "trl head rc=$? (cap ${T}s): $(grep -c '"impl"' "$OUT/trl_head.log") rows"
fi

# ---------------------------------------------------------------- 6b. the rest of the comparison
# (a fresh process resumes after a sticky CUDA error, which ends compare.py with code 3)
for attempt in 1 2 3; do
    (( $(left) < 60 )) && break
    compare "D (rest, attempt $attempt)" $(( $(left) - 30 )) 30
    [ "$RC" -eq 3 ] || break
done

# ---------------------------------------------------------------- 7. report
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
