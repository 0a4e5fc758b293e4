"""Compare our fused op with the implementations people would use instead, in one run.

Each row: one op (logprobs_fwd or rlsc_fwd_bwd) by one implementation on one head and token
count, with realistic inputs (benchmarks/inputs.py): median time and spread, peak memory above
the inputs, and the max relative error against a float64 reference on the first tokens.

Rows run in priority order (the headline shape, Qwen2.5-Math-7B head at N = 16 x 1024, with
the core implementations first; then its other implementations; then the other shapes), and
the JSON is rewritten after every row, so a time budget (--budget-s) or a kill leaves every
finished row on disk. A failing row (OOM, missing package, exception) is an error row, never
the end of the run. --resume continues an earlier run: finished rows are kept, and the row that
was running when the process died is recorded as an error and skipped.

    python -m benchmarks.compare                                   # GPU: everything, bf16
    python -m benchmarks.compare --device cpu --heads smollm2-135m --seq-lens 64 --dtype float32
    python -m benchmarks.compare --budget-s 200 --out $OUT/compare.json --resume
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from rlsc.provenance import git_commit

from . import impls as I
from .inputs import HEADS, TEMPERATURE, default_target_entropy, make_inputs
from .timing import cleanup, peak_memory_mb, time_call

HEADLINE = ("qwen2.5-math-7b", 1024)
HEAD_RANK = {"qwen2.5-math-7b": 0, "qwen2.5-math-1.5b": 1, "smollm2-135m": 2}
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
ROW_KEYS = ("op", "impl", "V", "D", "N", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "max_rel_err")


def parse_head(spec: str) -> tuple[str, int, int]:
    """'qwen2.5-math-7b' or 'name:D:V' -> (name, D, V)."""
    if spec in HEADS:
        D, V = HEADS[spec]
        return spec, D, V
    parts = spec.split(":")
    if len(parts) != 3:
        raise SystemExit(f"unknown head {spec!r}: use one of {sorted(HEADS)} or name:D:V")
    return parts[0], int(parts[1]), int(parts[2])


def plan_rows(heads, seq_lens, impls, ops):
    """[(head, D, V, seq_len, op, impl)] in priority order (see the module docstring)."""
    shapes = [(h, L) for h in heads for L in seq_lens]
    headline = (HEADLINE[0], HEADLINE[1]) if any(h[0] == HEADLINE[0] for h in heads) and HEADLINE[1] in seq_lens else None
    headline = next((s for s in shapes if (s[0][0], s[1]) == headline), shapes[0])
    L0 = headline[1]
    others = sorted((s for s in shapes if s != headline),
                    key=lambda s: (round(abs(math.log(s[1] / L0)), 6), -s[1], HEAD_RANK.get(s[0][0], 9)))
    core = [i for i in impls if i in I.CORE_IMPLS]
    late = [i for i in impls if i in I.LATE_IMPLS]
    extra = [i for i in impls if i not in I.CORE_IMPLS and i not in I.LATE_IMPLS]
    ops = sorted(ops, key=lambda o: o != "rlsc_fwd_bwd")
    order = []
    for group_shapes, group_impls in (([headline], core), ([headline], extra), (others, core), (others, extra),
                                      ([headline] + others, late)):
        for (name, D, V), L in group_shapes:
            for op in ops:
                for impl in group_impls:
                    if I.IMPLS[impl].fn(op) is None:
                        continue  # e.g. matmul-floor has no backward
                    order.append((name, D, V, L, op, impl))
    return order


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "trl"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["torch"] = torch.__version__
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _row_id(row) -> tuple:
    return (row["head"], row["N"], row["op"], row["impl"])


def _write(doc, path: Path, copy_to: Path | None = None):
    """Atomic rewrite of path (and a plain copy to copy_to, the published file, if given)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    if copy_to is not None and copy_to != path:
        shutil.copyfile(path, copy_to)


def _error_text(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM: " + str(e).split("\n")[0][:200]
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:400]


def cuda_usable(device) -> bool:
    try:
        torch.cuda.synchronize(device)
        return float((torch.ones(1, device=device) + 1).item()) == 2.0
    except Exception:  # noqa: BLE001
        return False


def reference_outputs(ref_inp, ops):
    """float64 references, computed on the inputs' device and kept on the CPU (no GPU memory during rows)."""
    out = {}
    if "logprobs_fwd" in ops:
        with torch.no_grad():
            out["logprobs_fwd"] = I.reference_logprobs(ref_inp).cpu()
    if "rlsc_fwd_bwd" in ops:
        out["rlsc_fwd_bwd"] = tuple(t.cpu() for t in I.reference_fwd_bwd(ref_inp))
    return out


def rel_errors(impl, op, ref_inp, ref) -> dict:
    """{name: max relative error} of impl on the reference slice against the float64 reference."""
    if op == "logprobs_fwd":
        with torch.no_grad():
            return {"logp": I.max_rel_err(impl.logprobs(ref_inp), ref)}
    h = ref_inp.hidden.detach().requires_grad_()
    W = ref_inp.weight.detach().requires_grad_()
    loss, dH, dW = impl.fwd_bwd(ref_inp, h, W)
    return {"loss": I.max_rel_err(loss, ref[0]), "dH": I.max_rel_err(dH, ref[1]), "dW": I.max_rel_err(dW, ref[2])}


def run_row(impl, op, inp, ref_inp, ref, device, target_ms) -> dict:
    """Measures one row; every failure becomes an 'error' entry instead of an exception."""
    res = {"median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mem_mb": None, "max_rel_err": None}
    errors = []
    if ref is not None and not impl.name.startswith("matmul-floor"):
        try:
            errs = rel_errors(impl, op, ref_inp, ref)
            res["max_rel_err"] = max(errs.values())
            res["rel_err"] = errs
        except Exception as e:  # noqa: BLE001
            errors.append("reference check: " + _error_text(e))
        cleanup(device)
    if op == "logprobs_fwd":
        def fn():
            with torch.no_grad():
                return impl.logprobs(inp)
    else:
        h = inp.hidden.detach().requires_grad_()
        W = inp.weight.detach().requires_grad_()

        def fn():
            return impl.fwd_bwd(inp, h, W)
    try:
        res.update(time_call(fn, device, target_ms=target_ms))
        cleanup(device)
        res["peak_mem_mb"], out = peak_memory_mb(fn, device)
        del out
    except Exception as e:  # noqa: BLE001
        errors.append(_error_text(e))
        if not isinstance(e, torch.cuda.OutOfMemoryError):
            traceback.print_exc(limit=4)
        del e
    res["code_path"] = impl.describe_path(inp)
    cleanup(device)
    if errors:
        res["error"] = "; ".join(errors)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--dtype", default="auto", help="bfloat16 (GPU default), float16, float32 (CPU default)")
    ap.add_argument("--heads", default=None, help="comma list of %s or name:D:V" % ",".join(HEADS))
    ap.add_argument("--seq-lens", default=None, help="completion length per sequence, comma list (GPU: 1024,3072,256)")
    ap.add_argument("--n-seqs", type=int, default=16, help="sequences per batch (N = n_seqs * seq_len)")
    ap.add_argument("--impls", default=None, help="comma list of " + ",".join(I.IMPLS))
    ap.add_argument("--ops", default=",".join(I.OPS))
    ap.add_argument("--ref-tokens", type=int, default=256, help="tokens in the float64 reference slice")
    ap.add_argument("--ref-seqs", type=int, default=4, help="sequences the reference slice is split into")
    ap.add_argument("--target-entropy", type=float, default=None, help="mean token entropy at T (default: measured)")
    ap.add_argument("--target-ms", type=float, default=None, help="timed milliseconds per row (GPU 1000, CPU 2000)")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no new row after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/compare-<device>.json)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and run the rest")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="keep the working JSON and the in-progress marker here and copy the JSON to --out after "
                         "every row (so --out's folder only ever holds the finished JSON)")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. 'CPU, small shapes')")
    args = ap.parse_args(argv)
    t_start = time.time()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
    heads = [parse_head(h) for h in (args.heads or (",".join(HEADS) if cuda else "smollm2-135m")).split(",")]
    seq_lens = [int(x) for x in (args.seq_lens or ("1024,3072,256" if cuda else "64")).split(",")]
    default_impls = [n for n in list(I.CORE_IMPLS) + list(I.EXTRA_IMPLS)
                     if (cuda and n != "rlsc-torch") or (not cuda and not I.IMPLS[n].needs_cuda)]
    impl_names = args.impls.split(",") if args.impls else default_impls
    for n in impl_names:
        if n not in I.IMPLS:
            raise SystemExit(f"unknown impl {n!r}; known: {', '.join(I.IMPLS)}")
    ops = args.ops.split(",")
    target_ms = args.target_ms or (1000.0 if cuda else 2000.0)
    target_entropy = args.target_entropy if args.target_entropy is not None else default_target_entropy()
    out = args.out or Path(__file__).parent / "results" / f"compare-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out
    if args.scratch is not None:
        args.scratch.mkdir(parents=True, exist_ok=True)
        work = args.scratch / out.name
    marker = work.with_suffix(work.suffix + ".inprogress")

    doc = None
    if args.resume:
        for src in (work, out):
            try:
                doc = json.loads(src.read_text())
                break
            except (OSError, ValueError):
                continue
    if doc is None:
        doc = {"device": device_name(device), "torch": torch.__version__, "triton": _versions().get("triton"),
               "commit": git_commit(), "date": datetime.date.today().isoformat(), "label": args.label,
               "versions": _versions(), "temperature": TEMPERATURE, "alpha": I.ALPHA,
               "target_entropy": target_entropy, "n_seqs": args.n_seqs,
               "reference": f"float64 on the first {args.ref_tokens} tokens as {args.ref_seqs} sequences; "
                            "max_rel_err = max|x - ref| / max|ref|, worst of loss/dH/dW for rlsc_fwd_bwd",
               "peak_mem_note": "torch.cuda.max_memory_allocated delta" if cuda else
                                "approximate: resident-set growth of the process during one call",
               "results": []}
    done = {_row_id(r) for r in doc["results"]}
    if args.resume and marker.exists():
        row = json.loads(marker.read_text())
        if _row_id(row) not in done:
            row.update({k: None for k in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "max_rel_err")})
            row["error"] = "the run ended during this row (killed at its time limit or crashed); skipped on resume"
            doc["results"].append(row)
            done.add(_row_id(row))
        marker.unlink()
    _write(doc, work, out)

    plan = [p for p in plan_rows(heads, seq_lens, impl_names, ops) if (p[0], args.n_seqs * p[3], p[4], p[5]) not in done]
    current, inp, ref_inp, refs = None, None, None, None
    failed_inputs = {}  # shape -> why its input generation failed (not retried in this process)
    not_run = []
    for name, D, V, L, op, impl_name in plan:
        N = args.n_seqs * L
        if time.time() - t_start > args.budget_s:
            not_run.append(f"{name} N={N} {op} {impl_name}")
            continue
        impl = I.IMPLS[impl_name]
        row = {"head": name, "op": op, "impl": impl_name, "V": V, "D": D, "N": N, "dtype": str(dtype).replace("torch.", "")}
        why = impl.unavailable(op, device) or failed_inputs.get((name, D, V, L))
        if why is None and current != (name, D, V, L):
            inp = ref_inp = refs = None
            cleanup(device)
            try:
                t0 = time.time()
                inp = make_inputs(V, D, args.n_seqs, L, dtype=dtype, device=device, target_entropy=target_entropy)
                ref_inp = inp.slice(args.ref_tokens, args.ref_seqs)
                refs = reference_outputs(ref_inp, ops)
                print(f"# inputs {name} N={N}: logit scale {inp.logit_scale:.3f}, mean entropy "
                      f"{inp.mean_entropy:.3f} nats at T={inp.temperature} ({time.time() - t0:.1f} s incl. reference)",
                      flush=True)
                current = (name, D, V, L)
            except Exception as e:  # noqa: BLE001
                current, inp = None, None
                why = failed_inputs[(name, D, V, L)] = "input generation: " + _error_text(e)
                traceback.print_exc(limit=4)
        if why is not None:
            row.update({k: None for k in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "max_rel_err")})
            row["error"] = why
        else:
            marker.write_text(json.dumps(row))
            t0 = time.time()
            row.update(run_row(impl, op, inp, ref_inp, refs.get(op), device, target_ms))
            row["input_entropy"] = round(inp.mean_entropy, 4)
            row["wall_s"] = round(time.time() - t0, 1)
        doc["results"].append(row)
        doc["elapsed_s"] = round(time.time() - t_start, 1)
        _write(doc, work, out)
        if marker.exists():
            marker.unlink()
        print(format_row(row), flush=True)
        if cuda and row.get("error") and not cuda_usable(device):
            # A sticky CUDA error (illegal address, device assert) fails every later call in this
            # process: stop here; a --resume in a fresh process goes on with the next row.
            print("# CUDA context unusable after this row; exiting with code 3 (resume to continue)", flush=True)
            return 3
    doc["not_run"] = not_run
    _write(doc, work, out)
    if not_run:
        print(f"# time budget reached: {len(not_run)} rows not run", flush=True)
    print(f"# wrote {out} ({len(doc['results'])} rows, {time.time() - t_start:.0f} s)")


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_row(r) -> str:
    s = (f"{r['head']:>18} N={r['N']:<6} {r['op']:<13} {r['impl']:<18} median {_fmt(r['median_ms'], '9.2f')} ms "
         f"[{_fmt(r['p20_ms'], '.2f')}, {_fmt(r['p80_ms'], '.2f')}]  peak {_fmt(r['peak_mem_mb'], '8.0f')} MB  "
         f"err {_fmt(r['max_rel_err'], '.2e')}")
    if r.get("error"):
        s += "  ERROR " + r["error"][:160]
    return s


if __name__ == "__main__":
    sys.exit(main())
