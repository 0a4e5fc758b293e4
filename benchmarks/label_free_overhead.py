"""What self-certainty costs on top of the op: linear_token_stats (logp, entropy, self-certainty)
against linear_logprobs(return_entropy=True), forward + backward, timed alternately in one process
(so machine load hits both alike), median and spread of --rounds.

    python benchmarks/label_free_overhead.py --tokens 512 --head smollm2-135m --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = {"smollm2-135m": (576, 49152), "qwen2.5-1.5b": (1536, 151936)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--head", default="smollm2-135m", choices=sorted(HEADS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default="")
    args = p.parse_args()

    import torch

    import rlsc_kernels as rk
    from rlsc.ablate import git_commit, machine

    torch.set_num_threads(args.threads)
    D, V = HEADS[args.head]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (args.tokens,), generator=g)

    def logprobs():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = rk.linear_logprobs(hh, ww, y, return_entropy=True, backend=args.backend, filter_eps=None)
        (logp.sum() + ent.sum()).backward()

    def token_stats():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        st = rk.linear_token_stats(hh, ww, y, backend=args.backend, filter_eps=None)
        (st.logp.sum() + st.entropy.sum() + st.self_certainty.sum()).backward()

    fns = {"linear_logprobs+entropy": logprobs, "linear_token_stats": token_stats}
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    result = {"tokens": args.tokens, "head": args.head, "D": D, "V": V, "dtype": "float32", "threads": args.threads,
              "backend": args.backend, "rounds": args.rounds,
              "seconds": {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in times.items()},
              "commit": git_commit(), "machine": machine(), "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    a, b = (result["seconds"][n]["median"] for n in fns)
    result["overhead_median"] = b / a - 1
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
