"""Times the Triton sweeps at several block sizes on one shape (GPU only), to choose what ships.

    python -m benchmarks.tune_blocks --V 152064 --D 3584 --N 16384 --out tune.json

Each candidate ("block_n,block_v,block_d,warps,stages") is passed to the op per call through its
block_configs= keyword (rlsc_kernels.BlockConfigs), the backward strategy through backward=; the forward is timed alone (no grad), the backward as
forward + backward of the RLSC loss minus the forward. Median and 20/80 % quantiles of
triton.testing.do_bench (CUDA events, warm-up excluded).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

FORWARD = ["64,256,64,8,3", "128,128,64,8,3", "128,128,64,8,4", "128,256,64,16,3"]
# (strategy, grad-logits / fused tile config, matmul config, matmul K step)
BACKWARD = [
    ("sliced", "128,128,32,8,2", "128,0,128,8,3", 64),
    ("sliced", "128,128,64,8,3", "128,0,128,8,3", 64),
    ("sliced", "128,128,32,8,2", "128,0,256,8,3", 64),
    ("sliced", "128,128,32,8,2", "128,0,128,8,4", 64),
    ("fused", "128,128,32,8,2", "", 0),
]


def _config(text: str):
    """ "block_n,block_v,block_d,warps,stages[,group_n]" -> rlsc_kernels.KernelConfig."""
    import rlsc_kernels as rk

    return rk.KernelConfig(*(int(x) for x in text.split(",")))


def realistic_inputs(N, D, V, logit_scale, temperature, device="cuda", seed=0):
    """hidden ~ N(0, 1), W ~ N(0, logit_scale^2 / D), targets sampled from softmax(z / T) chunk by chunk."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, D, device=device, generator=gen).to(torch.bfloat16)
    w = (torch.randn(V, D, device=device, generator=gen) * (logit_scale / D**0.5)).to(torch.bfloat16)
    y = torch.empty(N, dtype=torch.long, device=device)
    ent = []
    with torch.no_grad():
        for n0 in range(0, N, 1024):
            z = (h[n0:n0 + 1024] @ w.T).float() / temperature
            p = torch.softmax(z, -1)
            y[n0:n0 + 1024] = torch.multinomial(p, 1, generator=gen).squeeze(1)
            ent.append(-(p * torch.log_softmax(z, -1)).sum(-1))
    return h, w, y, torch.cat(ent).mean().item()


def _peer_timings(h, w, y, seq, T, mm):
    """Cut Cross-Entropy doing the same weighted loss, when installed (a first point of comparison;
    benchmarks/compare.py is the full side-by-side)."""
    import triton.testing

    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        print(f"cce not available: {exc!r}")
        return []
    rows = []
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    S = int(seq.max()) + 1

    def run():
        nll = linear_cross_entropy(hh / T, ww, y, reduction="none")  # -logp per token
        seq_logp = torch.zeros(S, device=h.device).index_add(0, seq, -nll.float())
        weight = seq_logp.detach().exp() + 0.1
        (-(weight * seq_logp).sum() / S).backward()

    try:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        q = triton.testing.do_bench(run, warmup=100, rep=600, quantiles=[0.5, 0.2, 0.8], grad_to_none=[hh, ww])
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append({"kind": "fwd+bwd", "config": "cce", "median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2],
                     "peak_extra_mb": peak})
        print(f"fwd+bwd  cce (default filter){'':<24} {q[0]:8.2f} ms ({q[0] / mm:.2f}x GEMM) peak+{peak:.0f} MB")
    except Exception as exc:
        print(f"cce ERROR {exc!r}"[:300])
    return rows


def main(argv=None):
    import triton.testing

    import rlsc_kernels as rk

    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--D", type=int, default=3584)
    ap.add_argument("--V", type=int, default=152064)
    ap.add_argument("--logit-scale", type=float, default=12.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=150.0)
    args = ap.parse_args(argv)
    start = time.time()
    T = 0.5
    h, w, y, entropy = realistic_inputs(args.N, args.D, args.V, args.logit_scale, T)
    seq = torch.arange(args.N, device="cuda") // max(1, args.N // 16)
    flops = 2 * args.N * args.V * args.D
    mm = triton.testing.do_bench(lambda: h @ w.T, warmup=10, rep=50, return_mode="median")
    print(f"mean token entropy at T={T}: {entropy:.3f} nats; logits GEMM {mm:.2f} ms ({flops / mm / 1e9:.0f} TFLOP/s)")
    rows = [{"kind": "matmul", "config": "torch", "median_ms": mm}]

    def fwd(blocks):
        def run():
            with torch.no_grad():
                rk.linear_logprobs(h, w, y, temperature=T, backend="triton", check_values=False, block_configs=blocks)
        return run

    ww = w.detach().clone().requires_grad_()
    hh = h.detach().clone().requires_grad_()

    def fwd_bwd(filter_eps, strategy, blocks):
        # grad_matmul="triton" where a filter is asked for: only the block-sparse matmuls skip tiles
        # (on the library matmuls filter_eps="auto" is exact).
        grad_matmul = "triton" if strategy == "sliced" and filter_eps is not None else "library"

        def run():
            out = rk.linear_rlsc_loss(hh, ww, y, seq_index=seq, temperature=T, backend="triton", filter_eps=filter_eps,
                                      backward=strategy, grad_matmul=grad_matmul, check_values=False,
                                      block_configs=blocks)
            out.loss.backward()
        return run

    for cfg in FORWARD:
        if time.time() - start > args.budget_s:
            break
        blocks = rk.BlockConfigs(forward=_config(cfg))
        try:
            q = triton.testing.do_bench(fwd(blocks), warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
            rows.append({"kind": "forward", "config": cfg, "median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]})
            print(f"forward  {cfg:<18} {q[0]:8.2f} ms  ({q[0] / mm:.2f}x GEMM)", flush=True)
        except Exception as exc:  # record and go on
            rows.append({"kind": "forward", "config": cfg, "error": repr(exc)[:300]})
            print(f"forward  {cfg:<18} ERROR {exc!r}"[:300], flush=True)
    for strategy, cfg, mm_cfg, block_k in BACKWARD:
        for filter_eps in ("auto", None):
            if time.time() - start > args.budget_s:
                break
            tile = _config(cfg)
            blocks = rk.BlockConfigs(grad_logits=tile, backward=tile, matmul=_config(mm_cfg) if mm_cfg else None,
                                     matmul_block_k=block_k or None)
            label = f"{strategy} {cfg} mm={mm_cfg or '-'} k={block_k}"
            try:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                q = triton.testing.do_bench(fwd_bwd(filter_eps, strategy, blocks), warmup=100, rep=600, quantiles=[0.5, 0.2, 0.8],
                                            grad_to_none=[hh, ww])
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                rows.append({"kind": "fwd+bwd", "config": label, "filter": str(filter_eps), "median_ms": q[0],
                             "p20_ms": q[1], "p80_ms": q[2], "peak_extra_mb": peak})
                print(f"fwd+bwd  {label:<48} filter={str(filter_eps):<5} {q[0]:8.2f} ms ({q[0] / mm:.2f}x GEMM) "
                      f"peak+{peak:.0f} MB", flush=True)
            except Exception as exc:
                rows.append({"kind": "fwd+bwd", "config": label, "filter": str(filter_eps), "error": repr(exc)[:300]})
                print(f"fwd+bwd  {label:<48} ERROR {exc!r}"[:300], flush=True)
    rows += _peer_timings(h, w, y, seq, T, mm)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "N": args.N, "D": args.D, "V": args.V,
                       "entropy": entropy, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
