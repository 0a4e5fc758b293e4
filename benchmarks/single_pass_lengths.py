"""Issue 19's measurement: the single pass at every sequence length against three full-size GEMMs.

For each shape (sequences x tokens) the RLSC loss's forward + backward by the single pass
(path="single-pass": on CPU the native backend, on CUDA the Triton one) and the three GEMMs of
the same shapes at full size (z = h W^T [N, V], dH = z W, dW = z^T h; no chunking, no softmax)
are timed alternately in one process (A, B, A, B, ...: load from other processes hits both
alike), after one warm-up round. The GEMM-equivalents of the single pass are counted by the
matrix products that reach the dispatcher (benchmarks/flop_count.py) in the warm-up round, and
its chunk layout (whole / split, rows) is recorded with the plan's extra memory bound.

    python -m benchmarks.single_pass_lengths --out benchmarks/results/single-pass-lengths-cpu.json
    python -m benchmarks.single_pass_lengths --device cuda --head qwen2.5-math-7b --dtype bfloat16 \\
        --shapes 16x3072 --out single-pass-lengths-cuda.json        # the GPU row (gpu_check.sh)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from rlsc.provenance import git_commit

from .compare import _versions, device_name
from .flop_count import GemmCounter
from .inputs import HEADS, make_inputs
from .timing import cleanup, peak_memory_mb


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def three_gemms(h, W):
    """The floor: the single pass's three products at full size (fp32 outputs for 16-bit inputs
    on CUDA, as the single pass computes them)."""
    with torch.no_grad():
        if h.dtype != torch.float32 and h.is_cuda:
            z = torch.mm(h, W.T, out_dtype=torch.float32)
            zg = z.to(h.dtype)
            dH = torch.mm(zg, W, out_dtype=torch.float32)
            dW = torch.mm(zg.T, h, out_dtype=torch.float32)
        else:
            z = h @ W.T
            dH = z @ W
            dW = z.T @ h
    return dH, dW


def single_pass(inp, h, W, backend):
    import rlsc_kernels as rk

    out = rk.linear_rlsc_loss(h, W, inp.targets, seq_index=inp.seq_index, num_sequences=inp.n_seqs,
                              temperature=inp.temperature, backend=backend, path="single-pass", check_values=False)
    out.loss.backward()
    return out.loss.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--head", default="smollm2-135m", choices=sorted(HEADS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shapes", default="16x64,2x1024,1x4096", help="comma-separated SEQSxTOKENS")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from rlsc_kernels import single_pass as sp
    from rlsc_kernels.backends import native, triton_single_pass

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backend = "triton" if device.type == "cuda" else "native"
    budget = triton_single_pass.BUFFER_BYTES if backend == "triton" else native.BUFFER_BYTES
    D, V = HEADS[args.head]
    load_before = os.getloadavg()
    rows = []
    for shape in args.shapes.split(","):
        S, L = (int(x) for x in shape.split("x"))
        t0 = time.time()
        inp = make_inputs(V, D, S, L, dtype=dtype, device=device)
        print(f"# {shape}: inputs in {time.time() - t0:.0f} s, entropy {inp.mean_entropy:.3f}", flush=True)
        N = S * L
        plan = sp.plan([L] * S, V, D, dtype, budget, True)
        h = inp.hidden.detach().requires_grad_()
        W = inp.weight.detach().requires_grad_()
        times = {"single-pass": [], "three-gemms": []}
        cpu_times = {"single-pass": [], "three-gemms": []}
        gemm_eq = None
        for r in range(args.rounds + 1):
            for name in times:
                cleanup(device)
                h.grad = W.grad = None
                counter = GemmCounter() if (r == 0 and name == "single-pass") else None
                _sync(device)
                s, s_cpu = time.perf_counter(), time.process_time()
                if counter is not None:
                    with counter:
                        single_pass(inp, h, W, backend)
                else:
                    out = single_pass(inp, h, W, backend) if name == "single-pass" else three_gemms(h, W)
                    del out
                _sync(device)
                dt, dt_cpu = time.perf_counter() - s, time.process_time() - s_cpu
                if counter is not None:
                    gemm_eq = counter.gemm_equivalents(N, V, D)
                if r > 0:
                    times[name].append(dt)
                    cpu_times[name].append(dt_cpu)
                print(f"{shape} round {r} {name}: {dt:.3f} s (process CPU {dt_cpu:.3f} s)" + (f" ({gemm_eq:.3f} GEMM-eq)" if counter else ""),
                      flush=True)
        h.grad = W.grad = None
        mem_sp, _ = peak_memory_mb(lambda: single_pass(inp, h, W, backend), device)
        h.grad = W.grad = None
        mem_3, _ = peak_memory_mb(lambda: three_gemms(h, W), device)
        ratios = [a / b for a, b in zip(times["single-pass"], times["three-gemms"])]
        cpu_ratios = [a / b for a, b in zip(cpu_times["single-pass"], cpu_times["three-gemms"])]
        row = {"shape": shape, "n_seqs": S, "seq_len": L, "N": N, "V": V, "D": D, "dtype": args.dtype,
               "backend": backend, "layout": plan.layout, "chunk_rows": plan.rows, "chunks": len(plan.chunks),
               "open_accumulator_bound_mb": plan.open_bytes / 2**20, "buffer_bytes": budget,
               "gemm_equivalents": gemm_eq, "ratio_median": statistics.median(ratios), "ratios": ratios,
               "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
               "peak_mem_mb": {"single-pass": mem_sp, "three-gemms": mem_3}}
        for name, ts in times.items():
            ts_sorted = sorted(ts)
            row[name] = {"median_s": statistics.median(ts), "min_s": ts_sorted[0], "max_s": ts_sorted[-1], "times_s": ts,
                         "process_cpu_s": cpu_times[name]}
        rows.append(row)
        print(f"{shape}: single pass {row['single-pass']['median_s']:.3f} s, three GEMMs "
              f"{row['three-gemms']['median_s']:.3f} s, ratio (median of rounds) {row['ratio_median']:.3f} "
              f"(process CPU time: {row['cpu_ratio_median']:.3f}), "
              f"{gemm_eq:.3f} GEMM-eq, {plan.layout} x{len(plan.chunks)}", flush=True)
        del inp, h, W
    doc = {"device": device_name(device), "threads": torch.get_num_threads(), "versions": _versions(),
           "commit": git_commit(), "date": datetime.date.today().isoformat(),
           "utc": datetime.datetime.utcnow().isoformat(timespec="seconds"),
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "note": args.note,
           "rounds": args.rounds, "head": args.head,
           "method": "alternating single-pass / three full-size GEMMs per round after one warm-up round; "
                     "ratio = median over rounds of the per-round ratio of wall times (cpu_ratio: of the "
                     "process's CPU time, less sensitive to other processes on a shared machine); "
                     "GEMM-equivalents counted in the warm-up",
           "peak_mem_note": "CPU: resident-set growth during one call; CUDA: max_memory_allocated above the start",
           "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
