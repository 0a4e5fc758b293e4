"""Issue 8's CPU measurement, interleaved: the RLSC loss forward + backward at the SmolLM2 head
(16 x 256 tokens, fp32) by naive Algorithm 1, the single pass's three GEMMs alone, the native
single pass, the PyTorch single pass and the PyTorch two-sweep path, each timed in rounds
(impl A, B, C, ... then again) so that load from other processes hits every row alike, then peak
memory once per impl. Rows come from benchmarks/impls.py; timing and memory from timing.py.

    python -m benchmarks.cpu_single_pass --threads 1 --rounds 3 --out benchmarks/results/compare-cpu-single-pass.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from rlsc.provenance import git_commit

from . import impls as I
from .compare import _versions, device_name
from .inputs import HEADS, make_inputs
from .timing import cleanup, peak_memory_mb

ORDER = ("torch-naive", "matmul-floor-3", "rlsc-native", "rlsc-single-pass", "rlsc-torch-two-sweep")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--impls", default=",".join(ORDER))
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    D, V = HEADS["smollm2-135m"]
    t0 = time.time()
    inp = make_inputs(V, D, args.n_seqs, args.seq_len, dtype=torch.float32, device=device)
    print(f"# inputs in {time.time() - t0:.0f} s; entropy {inp.mean_entropy:.3f}", flush=True)
    names = args.impls.split(",")
    todo = [n for n in names if I.IMPLS[n].unavailable("rlsc_fwd_bwd", device) is None]
    h = inp.hidden.detach().requires_grad_()
    W = inp.weight.detach().requires_grad_()
    times = {n: [] for n in todo}
    paths = {}
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        for n in todo:
            cleanup(device)
            h.grad = W.grad = None
            s = time.perf_counter()
            out = I.IMPLS[n].fwd_bwd(inp, h, W)
            dt = time.perf_counter() - s
            del out
            if r > 0:
                times[n].append(dt)
            paths[n] = I.IMPLS[n].describe_path(inp)
            print(f"round {r} {n}: {dt:.2f} s", flush=True)
    rows = []
    for n in todo:
        cleanup(device)
        h.grad = W.grad = None
        mem, out = peak_memory_mb(lambda: I.IMPLS[n].fwd_bwd(inp, h, W), device)
        del out
        ts = sorted(times[n])
        rows.append({"impl": n, "op": "rlsc_fwd_bwd", "V": V, "D": D, "N": inp.hidden.shape[0], "dtype": "float32",
                     "median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1], "times_s": times[n],
                     "peak_mem_mb": mem, "code_path": paths[n]})
        print(f"{n}: median {rows[-1]['median_s']:.2f} s [{ts[0]:.2f}, {ts[-1]:.2f}], peak {mem:.0f} MB", flush=True)
    doc = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "versions": _versions(), "commit": git_commit(), "date": datetime.date.today().isoformat(),
           "utc": datetime.datetime.utcnow().isoformat(timespec="seconds"), "note": args.note,
           "rounds": args.rounds, "peak_mem_note": "resident-set growth of the process during one call",
           "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
