"""Where the Triton single pass spends its time: each stage of one chunk timed alone, and the
whole call, against one logits GEMM of the full batch.

    python -m benchmarks.single_pass_profile --out single_pass_profile.json          # GPU, 7B head, 16 x 1024
    python -m benchmarks.single_pass_profile --device cpu --head tiny:32:512 --seq-len 16   # dry run (interpreter)

Stages of one chunk (one sequence by default; --seqs-per-chunk changes it): the logits GEMM
with fp32 output, the stats kernel, the gradient kernel (in place), dH = dz W, dW += dz^T h
(fp32 accumulator). The sum over chunks of these is the single pass's floor; the whole call
adds the [S]-sized weight ops and launch gaps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from .compare import device_name, parse_head


def _timer(device):
    if device.type == "cuda":
        def run(fn, reps):
            fn()
            torch.cuda.synchronize(device)
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize(device)
                times.append(a.elapsed_time(b))
            return statistics.median(times)
    else:
        def run(fn, reps):
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--head", default="qwen2.5-math-7b", help="head name or name:D:V")
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seqs-per-chunk", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    import triton

    from rlsc_kernels.backends import triton_single_pass as tsp
    from rlsc_kernels.kernels.single_pass_grad import single_pass_grad_kernel
    from rlsc_kernels.kernels.single_pass_stats import single_pass_stats_kernel
    from rlsc_kernels.options import FusedOptions
    from rlsc_kernels.single_pass import Weigh, rlsc_single_pass

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name, D, V = parse_head(args.head)
    S, L = args.n_seqs, args.seq_len
    N, n = S * L, L * args.seqs_per_chunk
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, D, device=device, generator=gen).to(dtype)
    weight = (torch.randn(V, D, device=device, generator=gen) * (12.0 / D**0.5)).to(dtype)
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    seq = torch.arange(N, device=device) // L
    run = _timer(device)
    reps = args.reps

    h = hidden[:n]
    buf = torch.empty(n, V, dtype=torch.float32, device=device)
    grad = buf.view(dtype)[:, :V] if dtype != torch.float32 else buf
    lse, logp, coef = (torch.zeros(n, device=device) for _ in range(3))
    coef -= 1.0 / S
    dh = torch.empty(n, D, dtype=torch.float32, device=device)
    dw = torch.zeros(V, D, dtype=torch.float32, device=device)
    st, gr = tsp.STATS_CONFIG, tsp.GRAD_CONFIG
    y = targets[:n]

    def stats():
        single_pass_stats_kernel[(triton.cdiv(n, st.block_n),)](
            buf, buf, y, lse, logp, lse, lse, n, V, buf.stride(0), 2.0, -100,
            HAS_BIAS=False, HAS_ENTROPY=False, BLOCK_N=st.block_n, BLOCK_V=st.block_v, num_warps=st.num_warps)

    def grad_kernel():
        single_pass_grad_kernel[(triton.cdiv(n, gr.block_n),)](
            buf, grad, buf, y, lse, logp, coef, n, V, buf.stride(0), grad.stride(0), 2.0,
            HAS_BIAS=False, ROUND_BF16_RTNE=False, BLOCK_N=gr.block_n, BLOCK_V=gr.block_v, num_warps=gr.num_warps)

    chunk = {
        "logits_gemm_fp32_out": run(lambda: tsp._mm_fp32(h, weight.T, buf), reps),
        "stats_kernel": run(stats, reps),
        "grad_kernel": run(grad_kernel, reps),
        "dhidden_gemm": run(lambda: tsp._mm_fp32(grad, weight, dh), reps),
        "dweight_gemm_fp32_acc": run(lambda: tsp._addmm_fp32(dw, grad.T, h, False), reps),
    }
    del buf, grad, dh, dw
    full_gemm = run(lambda: hidden @ weight.T, max(3, reps // 3))
    budget = n * V * 4
    counts = [L] * S
    from rlsc_kernels.single_pass import plan_chunks

    chunks = plan_chunks(counts, n)

    def whole():
        return rlsc_single_pass(tsp, hidden, weight, None, targets, seq, chunks, Weigh("rlsc", 0.1, "mean", S),
                                FusedOptions(temperature=0.5), (True, True, False))

    whole_ms = run(whole, max(3, reps // 3))
    n_chunks = len(chunks)
    doc = {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
           "head": name, "D": D, "V": V, "N": N, "tokens_per_chunk": n, "chunks": n_chunks, "dtype": args.dtype,
           "buffer_bytes": budget, "gemm_path": tsp.gemm_path(device, dtype),
           "chunk_ms": chunk, "chunk_sum_x_chunks_ms": sum(chunk.values()) * n_chunks,
           "one_logits_gemm_ms": full_gemm, "single_pass_ms": whole_ms,
           "single_pass_over_gemm": whole_ms / full_gemm}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
