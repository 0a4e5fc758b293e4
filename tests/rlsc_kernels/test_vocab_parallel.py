"""vocab_parallel=: the head split over 2 and 3 gloo ranks (torchrun, CPU) against the
single-process op and the float64 oracle; bytes all-reduced per token; bad input raising the
same error on every rank (instead of one rank raising and the others hanging in a collective).

Each world size is one torchrun launch running every case (vocab_parallel_worker.py); the
tests below compare its saved results with the single-process op computed here.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlsc_kernels as rk
from rlsc_kernels.backends import native_available

from .oracle import TOL, small_blocks
from .vocab_parallel_worker import run_case

pytestmark = pytest.mark.interpreter

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
N, D, V = 37, 50, 301  # none a multiple of a block size
#: Uneven slices per rank, in a permuted rank order for 3 ranks (rank 0 holds the top slice).
SHARDS = {2: [(0, 120), (120, V)], 3: [(211, V), (0, 50), (50, 211)]}
CHECK_TABLE_COLUMNS = 9  # vocab_parallel.check_values: bounds, count, checksum, target range, 3 finite flags


def _inputs(seed, *, bias=True, n=N, ignore_frac=0.2, logit_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = {
        "hidden": torch.randn(n, D, generator=gen, dtype=torch.float64),
        "weight": torch.randn(V, D, generator=gen, dtype=torch.float64) * (logit_scale / D**0.5),
        "targets": torch.randint(0, V, (n,), generator=gen),
        "grad_logp": torch.randn(n, generator=gen, dtype=torch.float64),
        "grad_entropy": torch.randn(n, generator=gen, dtype=torch.float64),
    }
    if bias:
        x["bias"] = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5
    x["targets"][torch.rand(n, generator=gen) < ignore_frac] = -100
    return x


def _logprobs_case(name, seed, *, dtype=torch.float32, backend="torch", temperature=0.7, bias=True, **extra):
    return dict(name=name, op="logprobs", inputs=_inputs(seed, bias=bias), dtype=dtype, backend=backend,
                temperature=temperature, **extra)


def _rlsc_case(name, seed, weighting, reduction, *, padded=False):
    x = _inputs(seed, ignore_frac=0.1)
    S = 4
    if padded:  # [B, T] rows with a prompt and padding around each completion
        B, T = S, 9
        x = _inputs(seed, n=B * T, ignore_frac=0.1)
        x["hidden"] = x["hidden"].reshape(B, T, D)
        x["targets"] = x["targets"].reshape(B, T)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            mask[b, 1 + b:T - b] = True
        x["completion_mask"] = mask
    else:
        gen = torch.Generator().manual_seed(seed)
        x["seq_index"] = torch.sort(torch.cat([torch.arange(S), torch.randint(0, S, (N - S,), generator=gen)])).values
    # The first token of each sequence is scored, so no sequence is empty.
    first = (x["completion_mask"].long().argmax(1) + torch.arange(S) * x["targets"].shape[-1] if padded
             else torch.searchsorted(x["seq_index"], torch.arange(S)))
    x["targets"].view(-1)[first] = torch.arange(S) * 70
    if weighting == "tensor":
        x["weighting"] = torch.rand(S, generator=torch.Generator().manual_seed(seed)).float()
    return dict(name=name, op="rlsc", inputs=x, dtype=torch.float32, backend="torch", temperature=0.5,
                weighting=weighting, reduction=reduction)


def _cases(world):
    shards = SHARDS[world]
    cases = [
        _logprobs_case("torch-fp32-bias-T0.7", 1),
        _logprobs_case("torch-fp16-T1.3", 2, dtype=torch.float16, temperature=1.3, bias=False),
        _logprobs_case("torch-bf16-bias-T0.5", 3, dtype=torch.bfloat16, temperature=0.5),
        _logprobs_case("torch-fp64-bias-T0.9", 4, dtype=torch.float64, temperature=0.9),
        _logprobs_case("reference-fp32-bias-T1.0", 5, backend="reference", temperature=1.0),
        _logprobs_case("triton-fp32-bias-T0.6", 6, backend="triton", temperature=0.6, options=small_blocks()),
        _logprobs_case("triton-fp16-fused-backward", 11, dtype=torch.float16, backend="triton", temperature=0.8,
                       options=small_blocks("fused")),
        _logprobs_case("no-entropy-fp32", 7, return_entropy=False, options={"check_values": False}),
    ]
    if native_available():  # the native backend's two sweeps; "auto" picks it on CPU
        cases.append(_logprobs_case("native-fp32-bias-T0.8", 12, backend="native", temperature=0.8))
        cases.append(dict(_rlsc_case("rlsc-auto-backend", 31, "rlsc", "sum"), backend="auto"))
    # An ignore_index that is also a vocabulary id (here: a local id of every slice).
    case = _logprobs_case("ignore-index-is-a-vocab-id", 8, options={"ignore_index": 5})
    y = case["inputs"]["targets"]
    y[y == -100] = 5
    y[:3] = torch.tensor([s for s, _ in shards][:3] + [130] * (3 - world))  # first ids of the slices
    y[3:6] = torch.tensor([s + 5 for s, _ in shards][:3] + [135] * (3 - world))  # local id 5 of each slice
    cases.append(case)
    for i, weighting in enumerate(["rlsc", "rlsc-l1", "entropy", "length", "tensor"]):
        cases.append(_rlsc_case(f"rlsc-{weighting}", 20 + i, weighting, ["mean", "sum"][i % 2]))
    cases.append(dict(_rlsc_case("rlsc-padded-form-module", 30, "rlsc", "mean", padded=True), module=True))
    # linear_token_stats (rlsc_kernels/label_free.py): self-certainty's pieces merged over the ranks
    cases.append(dict(_logprobs_case("token-stats-fp32-bias-T0.7", 13), op="token_stats"))
    cases.append(dict(_logprobs_case("token-stats-fp64-softcap", 14, dtype=torch.float64, temperature=0.9,
                                     options={"softcap": 2.0}), op="token_stats"))
    cases.append(dict(_logprobs_case("token-stats-bf16-T1.2", 15, dtype=torch.bfloat16, temperature=1.2, bias=False),
                      op="token_stats"))
    # a per-token temperature tensor (rlsc_kernels/temperature.py): grouped by value (bias), scaled (no bias)
    per_token_t = torch.tensor([0.5, 0.9, 1.4])[torch.arange(N) % 3]
    cases.append(_logprobs_case("per-token-temperature-bias", 16, temperature=per_token_t))
    cases.append(dict(_logprobs_case("token-stats-per-token-temperature", 17, temperature=per_token_t, bias=False),
                      op="token_stats"))
    cases[1]["inputs"]["targets"] = cases[1]["inputs"]["targets"].int()
    empty = _logprobs_case("empty-batch", 9)
    for k in ("hidden", "targets", "grad_logp", "grad_entropy"):
        empty["inputs"][k] = empty["inputs"][k][:0]
    cases.append(empty)
    for case in cases:
        case["shards"] = shards
    # The vocabulary split over a subgroup (ranks 0 and 2 of 3; ranks 0 and 1 of 2).
    sub = _logprobs_case("subgroup", 10)
    sub["group_ranks"] = [0, world - 1]
    sub["shards"] = [(0, 150), (150, V)]
    cases.append(sub)
    # Bad input: each must raise the same error on every rank.
    bad_target = _logprobs_case("bad-target", 40)
    bad_target["inputs"]["targets"][7] = V
    bad_target["shards"] = shards
    gap = _logprobs_case("bad-layout", 41)
    gap["shards"] = [(0, 100), (150, V)] if world == 2 else [(200, V), (0, 50), (60, 200)]
    nan = _logprobs_case("nan-in-one-slice", 42)
    top_start = max(s for s, _ in shards)
    nan["inputs"]["weight"][top_start + 3, 7] = float("nan")
    nan["shards"] = shards
    single_pass = _rlsc_case("single-pass-refused", 43, "rlsc", "mean")
    single_pass["options"] = {"path": "single-pass"}
    double = dict(_logprobs_case("double-backward", 44), op="double-backward")
    for case in (single_pass, double):
        case["shards"] = shards
    return cases + [bad_target, gap, nan, single_pass, double]


CASE_NAMES = [c["name"] for c in _cases(2)]
BAD_CASES = ("bad-target", "bad-layout", "nan-in-one-slice", "single-pass-refused", "double-backward")
OK_CASES = [n for n in CASE_NAMES if n not in BAD_CASES]


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    """world size -> (cases by name, per-rank results by name), one torchrun launch each, lazily."""
    runs = {}

    def get(world):
        if world not in runs:
            tmp = tmp_path_factory.mktemp(f"vp{world}")
            cases = _cases(world)
            torch.save(cases, tmp / "cases.pt")
            env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   str(WORKER), str(tmp / "cases.pt"), str(tmp)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
            assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            per_rank = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
            runs[world] = ({c["name"]: c for c in cases},
                           {c["name"]: [per_rank[r][i] for r in range(world)] for i, c in enumerate(cases)})
        return runs[world]

    return get


def _gathered(case, ranks):
    """Rank 0's replicated outputs, with dweight / dbias assembled from every rank's slice; asserts
    that the replicated outputs (log-probs, loss, dhidden, ...) are identical on every rank."""
    ranks = [res for res in ranks if not res.get("skipped")]
    for r, res in enumerate(ranks):
        assert res["error"] is None, f"rank {r}: {res['error']}"
    out = dict(ranks[0]["outputs"])
    for r, res in enumerate(ranks):
        for k, v in res["outputs"].items():
            if k not in ("dweight", "dbias"):
                assert torch.equal(v, out[k]), f"{k} differs between rank 0 and rank {r}"
    for k in ("dweight", "dbias"):
        if k in out:
            full = torch.full((V,) + tuple(out[k].shape[1:]), float("nan"), dtype=torch.float64)
            for (start, stop), res in zip(case["shards"], ranks):
                full[start:stop] = res["outputs"][k]
            out[k] = full
    return out


_SINGLE_PROCESS = {}


def _single_process(case):
    """(float64 oracle, the single-process op, PyTorch in the case's dtype), shared by the world
    sizes where the case's inputs are the same."""
    key = (case["name"], case["inputs"]["targets"].numpy().tobytes())
    if key not in _SINGLE_PROCESS:
        _SINGLE_PROCESS[key] = (run_case(case, dtype=torch.float64, backend="reference"), run_case(case),
                                run_case(case, backend="reference"))
    return _SINGLE_PROCESS[key]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", OK_CASES)
def test_vocab_parallel_matches_single_process_op_and_oracle(world_runs, world, name):
    """Every output and gradient (each rank's dweight / dbias slice) within the error of the
    single-process op in the same dtype (and of PyTorch in that dtype) of the float64 oracle,
    plus a small tolerance; float64 inputs agree to 1e-10."""
    cases, results = world_runs(world)
    case = cases[name]
    vp = _gathered(case, results[name])
    exact, single, same_dtype = _single_process(case)
    assert vp.keys() == exact.keys()
    for k in exact:
        if exact[k].numel() == 0:
            assert vp[k].numel() == 0, k
            continue
        scale = exact[k].abs().max().item()
        err = (vp[k] - exact[k]).abs().max().item()
        if case["dtype"] == torch.float64:
            assert err <= 1e-10 * max(scale, 1.0), f"{k}: {err:.3e}"
            continue
        err_single = (single[k] - exact[k]).abs().max().item()
        err_torch = (same_dtype[k] - exact[k]).abs().max().item()
        bound = max(err_single, err_torch) + TOL[case["dtype"]] * scale
        assert err <= bound, f"{k}: error {err:.3e} > single-process {err_single:.3e} / torch {err_torch:.3e} + tol"
    if case["op"] == "logprobs":
        ignored = case["inputs"]["targets"] == case.get("options", {}).get("ignore_index", -100)
        assert ignored.any() or name == "empty-batch"
        assert (vp["logp"][ignored] == 0).all() and (vp["dhidden"][ignored] == 0).all()


@pytest.mark.parametrize("world", [2, 3])
def test_bytes_all_reduced_per_token(world_runs, world):
    """Forward: one MAX of N fp32 and one SUM of 3N fp32 (2N without entropy): 16 (12) bytes per
    token; backward: one SUM of the fp32 dhidden, 4 D bytes per token; plus, with
    check_values=True, one small int64 table per call (independent of N)."""
    cases, results = world_runs(world)
    table = [("SUM", "int64", world * CHECK_TABLE_COLUMNS, 8)]
    for name, checks, per_token_stats in (("torch-fp32-bias-T0.7", table, 16), ("no-entropy-fp32", [], 12)):
        n = cases[name]["inputs"]["targets"].numel()
        for r, res in enumerate(results[name]):
            calls = res["calls"]
            assert calls == checks + [("MAX", "float32", n, 4), ("SUM", "float32", (per_token_stats // 4 - 1) * n, 4),
                                      ("SUM", "float32", n * D, 4)], f"rank {r}: {calls}"
            per_token = sum(numel * size for _, _, numel, size in calls[len(checks):]) / n
            assert per_token == per_token_stats + 4 * D


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name,message", [
    ("bad-target", f"targets holds ids outside [0, {V})"),
    ("bad-layout", "must tile [0, V) without gaps or overlaps"),
    ("nan-in-one-slice", "weight contains NaN or inf"),
    ("single-pass-refused", "path='single-pass' does not split the vocabulary"),
    ("double-backward", "backward is not differentiable"),
])
def test_bad_input_raises_the_same_error_on_every_rank(world_runs, world, name, message):
    _, results = world_runs(world)
    errors = [res["error"] for res in results[name]]
    assert all(e is not None and message in e for e in errors), errors
    assert len(set(errors)) == 1, errors


def test_vocab_parallel_rejects_bad_bounds():
    with pytest.raises(ValueError, match="0 <= start < stop"):
        rk.VocabParallel(5, 5)
    with pytest.raises(ValueError, match="0 <= start < stop"):
        rk.VocabParallel(-1, 5)
    with pytest.raises(TypeError, match="VocabParallel.stop must be an int"):
        rk.VocabParallel(0, 5.0)


def test_vocab_parallel_checks_the_slice_shape_and_needs_torch_distributed():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="weight must hold this rank's slice \\[10, 30\\) of the head, i.e. 20 rows"):
        rk.linear_logprobs(h, w, y, vocab_parallel=rk.VocabParallel(10, 30))
    with pytest.raises(TypeError, match="vocab_parallel must be None or an rlsc_kernels.VocabParallel"):
        rk.linear_logprobs(h, w, y, vocab_parallel=(0, 10))
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
            rk.linear_logprobs(h, w, y, vocab_parallel=rk.VocabParallel(0, 10))
