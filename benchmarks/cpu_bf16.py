"""Issue 19 part 2, measured: the RLSC loss forward + backward on the native CPU backend in bf16
on the CPU's bf16 matrix units against the same backend in fp32, at the SmolLM2 head (16 x 256
tokens, V 49152, D 576), interleaved in one process (fp32, bf16, bf16-upcast, then again) so that
load from other processes hits every row alike; the load average is recorded with each call.

Rows (all `linear_rlsc_loss(backend="native", path="single-pass")`, the same input values):
  native-fp32         fp32 hidden and weight (the bf16 values, upcast once before timing)
  native-bf16         bf16 inputs, native_matmul="bf16": MKL's bf16 GEMMs, fp32 accumulation/outputs
  native-bf16-upcast  bf16 inputs, native_matmul="fp32": the fallback (fp32 GEMMs of upcast inputs)
Then, untimed, each row's accuracy on the first 2 sequences against float64 on the same values.
--head-rows R,R,... also times the sampler's head GEMM, bf16 [R, 576] x [49152, 576]^T with fp32
output: native.bf16_linear against the fp32 GEMM of the same values (median of 50 alternating calls).

    python -m benchmarks.cpu_bf16 --rounds 5 --out benchmarks/results/cpu-bf16.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import rlsc_kernels as rk
from rlsc_kernels.backends import native

from rlsc.provenance import git_commit

from .compare import _versions
from .inputs import HEADS, make_inputs

ALPHA = 0.1
ROWS = {  # name -> (input dtype, native_matmul)
    "native-fp32": (torch.float32, "auto"),
    "native-bf16": (torch.bfloat16, "bf16"),
    "native-bf16-upcast": (torch.bfloat16, "fp32"),
}


def machine() -> dict:
    out = {"cpu_count": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "Flags", "L2 cache", "L3 cache", "Hypervisor vendor"):
                out[key.strip()] = val.strip()
    except Exception as e:  # noqa: BLE001
        out["lscpu"] = f"unavailable: {e}"
    flags = set(out.get("Flags", "").split())
    out["bf16_flags"] = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    return out


def fwd_bwd(h, w, y, seq, temperature, native_matmul):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = rk.linear_rlsc_loss(h, w, y, seq_index=seq, temperature=temperature, alpha=ALPHA, reduction="mean",
                              backend="native", path="single-pass", check_values=False, native_matmul=native_matmul)
    out.loss.backward()
    return out, h.grad, w.grad


def accuracy(inp, n_seqs: int) -> dict:
    """Max abs error against float64 (same input values) on the first n_seqs sequences: token
    log-probs, and dH, dW relative to their largest entry."""
    sl = inp.slice(n_seqs * (inp.N // inp.n_seqs), n_seqs)
    h64, w64 = sl.hidden.double(), sl.weight.double()
    ref, dh_ref, dw_ref = fwd_bwd(h64, w64, sl.targets, sl.seq_index, sl.temperature, "auto")
    out = {}
    for name, (dtype, mm) in ROWS.items():
        res, dh, dw = fwd_bwd(sl.hidden.to(dtype), sl.weight.to(dtype), sl.targets, sl.seq_index, sl.temperature, mm)
        out[name] = {
            "token_logp_max_abs_err": (res.token_logp.double() - ref.token_logp).abs().max().item(),
            "dhidden_max_rel_err": ((dh.double() - dh_ref).abs().max() / dh_ref.abs().max()).item(),
            "dweight_max_rel_err": ((dw.double() - dw_ref).abs().max() / dw_ref.abs().max()).item(),
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--note", default="")
    ap.add_argument("--head-rows", default="", help="comma-separated row counts for the head GEMM timing")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    usable, why = native.bf16_gemm_status(default=False)   # the native-bf16 row opts in by native_matmul="bf16"
    if not usable:
        raise SystemExit(f"the bf16 GEMMs are not available here: {why}")
    D, V = HEADS["smollm2-135m"]
    inp = make_inputs(V, D, args.n_seqs, args.seq_len, dtype=torch.bfloat16)
    inputs = {torch.bfloat16: (inp.hidden, inp.weight), torch.float32: (inp.hidden.float(), inp.weight.float())}
    times = {n: [] for n in ROWS}
    loads = {n: [] for n in ROWS}
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        for name, (dtype, mm) in ROWS.items():
            h, w = inputs[dtype]
            s = time.perf_counter()
            out = fwd_bwd(h, w, inp.targets, inp.seq_index, inp.temperature, mm)
            dt = time.perf_counter() - s
            del out
            load = os.getloadavg()[0]
            if r > 0:
                times[name].append(dt)
                loads[name].append(load)
            print(f"round {r} {name}: {dt:.2f} s (load {load:.2f})", flush=True)
    ratios = {n: [t / f for t, f in zip(times[n], times["native-fp32"])] for n in ROWS if n != "native-fp32"}
    rows = []
    for name, (dtype, mm) in ROWS.items():
        ts = sorted(times[name])
        row = {"impl": name, "dtype": str(dtype).replace("torch.", ""), "native_matmul": mm, "V": V, "D": D,
               "N": inp.N, "median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1],
               "times_s": times[name], "load_1min": loads[name]}
        if name in ratios:
            row["ratio_to_fp32_per_round"] = ratios[name]
            row["ratio_to_fp32_median"] = statistics.median(ratios[name])
        rows.append(row)
        print(f"{name}: median {row['median_s']:.2f} s [{ts[0]:.2f}, {ts[-1]:.2f}]"
              + (f", / fp32 {row['ratio_to_fp32_median']:.2f} (per round {min(ratios[name]):.2f}-"
                 f"{max(ratios[name]):.2f})" if name in ratios else ""), flush=True)
    acc = accuracy(inp, 2)
    for name, a in acc.items():
        print(f"{name} accuracy on 2 x {args.seq_len}: " + ", ".join(f"{k} {v:.2e}" for k, v in a.items()))
    head = {int(r): head_gemm(int(r), D, V) for r in args.head_rows.split(",") if r}
    for r, h in head.items():
        print(f"head GEMM {r} x {D} x {V}: bf16_linear {h['bf16_linear_ms']:.1f} ms, fp32 {h['fp32_ms']:.1f} ms "
              f"({h['ratio']:.2f}x)")
    doc = {"machine": machine(), "bf16_gemm": why, "head_gemm": head, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "versions": _versions(), "commit": git_commit(), "date": datetime.date.today().isoformat(),
           "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "note": args.note, "rounds": args.rounds, "mean_entropy": inp.mean_entropy,
           "temperature": inp.temperature, "results": rows, "accuracy_first_2_seqs": acc}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


def head_gemm(rows: int, D: int, V: int, calls: int = 50) -> dict:
    """Median milliseconds of native.bf16_linear and of the fp32 GEMM of the same bf16 values
    (weight upcast once, outside the timing), alternating, after 10 warm-up calls of each."""
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, D, generator=g).bfloat16()
    w = (torch.randn(V, D, generator=g) * 0.05).bfloat16()
    wf = w.float()
    times = {"bf16_linear": [], "fp32": []}
    for i in range(calls + 10):
        s = time.perf_counter()
        native.bf16_linear(h, w)
        a = time.perf_counter() - s
        s = time.perf_counter()
        h.float() @ wf.T
        b = time.perf_counter() - s
        if i >= 10:
            times["bf16_linear"].append(a)
            times["fp32"].append(b)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"bf16_linear_ms": med["bf16_linear"], "fp32_ms": med["fp32"], "ratio": med["bf16_linear"] / med["fp32"]}


if __name__ == "__main__":
    main()
