"""Markdown table, target check and PNG chart from the comparison's JSON (and the training step's).

    python -m benchmarks.report benchmarks/results/compare-cuda.json [--train train_step.json]
        [--md table.md] [--png chart.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

IMPL_ORDER = ("rlsc-triton", "rlsc-triton-single-pass", "rlsc-triton-single-pass-2seq", "rlsc-triton-two-sweep",
              "rlsc-triton-exact", "rlsc-triton-filtered", "rlsc-torch", "cce", "trl", "liger-scaled-ce", "liger",
              "torch-linear-ce", "torch-compile", "torch-chunked", "torch-naive", "matmul-floor")
HEADLINE = ("qwen2.5-math-7b", 16384)


def _f(x, spec, none="-"):
    return none if x is None else format(x, spec)


def _ok(r):
    return r.get("median_ms") is not None


def ours(rows) -> str:
    names = {r["impl"] for r in rows if _ok(r)}
    return "rlsc-triton" if "rlsc-triton" in names else "rlsc-torch"


def _sort_key(r):
    order = IMPL_ORDER.index(r["impl"]) if r["impl"] in IMPL_ORDER else len(IMPL_ORDER)
    return (-r["D"] * r["V"], r["N"], r["op"] != "rlsc_fwd_bwd", order)


def table(doc) -> str:
    rows = sorted(doc["results"], key=_sort_key)
    me = ours(rows)
    lines = [f"| head | N | op | impl | median ms | p20-p80 ms | peak MB | max rel err | time / {me} | note |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    base = {(r["head"], r["N"], r["op"]): r["median_ms"] for r in rows if r["impl"] == me and _ok(r)}
    for r in rows:
        b = base.get((r["head"], r["N"], r["op"]))
        ratio = r["median_ms"] / b if b and _ok(r) else None
        note = (r.get("error") or r.get("code_path") or "").replace("|", "/")[:90]
        lines.append(f"| {r['head']} | {r['N']} | {r['op']} | {r['impl']} | {_f(r['median_ms'], '.2f')} | "
                     f"{_f(r['p20_ms'], '.2f')}-{_f(r['p80_ms'], '.2f')} | {_f(r['peak_mem_mb'], '.0f')} | "
                     f"{_f(r['max_rel_err'], '.1e')} | {_f(ratio, '.2f')} | {note} |")
    return "\n".join(lines)


def _pick(rows, head, N, op, impl):
    return next((r for r in rows if (r["head"], r["N"], r["op"], r["impl"]) == (head, N, op, impl)), None)


def targets(doc, train=None) -> list[tuple[str, str, str]]:
    """[(target, measured, verdict)] for the issue's targets (headline shape; verdict PASS/MISS/n/a)."""
    rows = doc["results"]
    head, N = HEADLINE
    out = []

    def ratio_check(text, op, a, b, field, limit, op_b=None):
        ra, rb = _pick(rows, head, N, op, a), _pick(rows, head, N, op_b or op, b)
        if ra is None or ra.get(field) is None:
            out.append((text, f"{a}: not measured", "n/a"))
        elif rb is None or rb.get(field) is None:
            why = (rb or {}).get("error") or "not measured"
            verdict = "PASS" if why.startswith("OOM") else "n/a"
            out.append((text, f"{b}: {why[:60]}", verdict))
        else:
            q = ra[field] / rb[field] if rb[field] else float("inf")
            out.append((text, f"{ra[field]:.1f} / {rb[field]:.1f} = {q:.2f}x", "PASS" if q <= limit else "MISS"))

    ratio_check("rlsc_fwd_bwd time <= 0.8x cce", "rlsc_fwd_bwd", "rlsc-triton", "cce", "median_ms", 0.8)
    ratio_check("rlsc_fwd_bwd time <= 0.5x liger", "rlsc_fwd_bwd", "rlsc-triton", "liger", "median_ms", 0.5)
    ratio_check("rlsc_fwd_bwd peak mem <= 1.1x cce", "rlsc_fwd_bwd", "rlsc-triton", "cce", "peak_mem_mb", 1.1)
    ratio_check("rlsc_fwd_bwd peak mem <= 0.2x torch-naive", "rlsc_fwd_bwd", "rlsc-triton", "torch-naive", "peak_mem_mb", 0.2)
    ratio_check("logprobs_fwd time <= 1.2x matmul-floor", "logprobs_fwd", "rlsc-triton", "matmul-floor", "median_ms", 1.2)
    # issue 8: the RLSC loss in at most 3.3 logits-GEMM times (the single pass's three GEMMs + epilogues)
    ratio_check("rlsc_fwd_bwd time <= 3.3x one GEMM", "rlsc_fwd_bwd", "rlsc-triton", "matmul-floor", "median_ms", 3.3,
                op_b="logprobs_fwd")
    if _pick(rows, head, N, "rlsc_fwd_bwd", "rlsc-triton-single-pass") is not None:
        ratio_check("single pass time <= 3.3x one GEMM", "rlsc_fwd_bwd", "rlsc-triton-single-pass", "matmul-floor",
                    "median_ms", 3.3, op_b="logprobs_fwd")
        ratio_check("single pass peak mem <= 1.1x cce", "rlsc_fwd_bwd", "rlsc-triton-single-pass", "cce",
                    "peak_mem_mb", 1.1)
    if train and train.get("results"):
        tr = {r["variant"]: r for r in train["results"]}
        n, f = tr.get("naive") or {}, tr.get("fused") or {}
        if n.get("peak_mem_mb") and f.get("peak_mem_mb"):
            q = f["peak_mem_mb"] / n["peak_mem_mb"]
            out.append(("train step peak mem >= 40% less", f"{f['peak_mem_mb']:.0f} / {n['peak_mem_mb']:.0f} MB = {q:.2f}x",
                        "PASS" if q <= 0.6 else "MISS"))
            q = n["median_ms"] / f["median_ms"]
            out.append(("train step >= 1.3x faster", f"{n['median_ms']:.0f} / {f['median_ms']:.0f} ms = {q:.2f}x",
                        "PASS" if q >= 1.3 else "MISS"))
        elif f.get("peak_mem_mb") and (n.get("error") or "").startswith("OOM"):
            out.append(("train step peak mem >= 40% less", f"fused {f['peak_mem_mb']:.0f} MB; naive OOM", "PASS"))
            out.append(("train step >= 1.3x faster", "naive OOM", "n/a"))
        else:
            why = n.get("error") or f.get("error") or "no GPU peak memory (CPU run?)"
            out.append(("train step", why[:80], "n/a"))
    return out


def train_table(train) -> str:
    lines = ["| variant | median ms | p20-p80 ms | peak MB | loss | note |", "|---|---:|---:|---:|---:|---|"]
    for r in train["results"]:
        lines.append(f"| {r['variant']} | {_f(r.get('median_ms'), '.1f')} | {_f(r.get('p20_ms'), '.1f')}-"
                     f"{_f(r.get('p80_ms'), '.1f')} | {_f(r.get('peak_mem_mb'), '.0f')} | {_f(r.get('loss'), '.4g')} | "
                     f"{(r.get('error') or '')[:90]} |")
    return "\n".join(lines)


def markdown(doc, train=None) -> str:
    parts = [f"# Benchmark results: {doc['device']}", "",
             f"{doc.get('label') or ''}", "",
             f"torch {doc['torch']}, triton {doc['triton']}, commit {doc['commit']}, {doc['date']}; "
             f"T = {doc.get('temperature')}, alpha = {doc.get('alpha')}, inputs with mean token entropy "
             f"{doc.get('target_entropy')} nats; versions {json.dumps(doc.get('versions', {}))}.", "",
             f"Reference: {doc.get('reference', '')}. Peak memory: {doc.get('peak_mem_note', '')}.", ""]
    t = targets(doc, train)
    if any(v != "n/a" for _, _, v in t):
        parts += ["## Targets (Qwen2.5-Math-7B head, N = 16384)", "", "| target | measured | verdict |", "|---|---|---|"]
        parts += [f"| {a} | {b} | {c} |" for a, b, c in t] + [""]
    parts += ["## Ops", "", table(doc), ""]
    if doc.get("not_run"):
        parts += [f"Not run (time budget): {len(doc['not_run'])} rows.", ""]
    if train:
        cfg = train.get("config", {})
        parts += ["## Training step", "", f"{train.get('device', '')}; config {json.dumps(cfg)}", "", train_table(train), ""]
    return "\n".join(parts)


def chart(doc, path: Path, train=None) -> bool:
    """Time and peak memory per impl for the headline shape (or the largest measured). False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    rows = doc["results"]
    shapes = sorted({(r["head"], r["N"], r["D"] * r["V"]) for r in rows if _ok(r)}, key=lambda s: (-s[2], -s[1]))
    if not shapes:
        return False
    head, N = next(((h, n) for h, n, _ in shapes if (h, n) == HEADLINE), shapes[0][:2])
    ncols = 3 if train and train.get("results") else 2
    fig, axes = plt.subplots(2, ncols, figsize=(5.2 * ncols, 7.5), squeeze=False)
    for j, op in enumerate(("rlsc_fwd_bwd", "logprobs_fwd")):
        sel = sorted((r for r in rows if r["head"] == head and r["N"] == N and r["op"] == op), key=_sort_key)
        names = [r["impl"] for r in sel]
        for i, (field, label) in enumerate((("median_ms", "median time (ms)"), ("peak_mem_mb", "peak memory above inputs (MB)"))):
            ax = axes[i][j]
            vals = [r.get(field) or 0 for r in sel]
            colors = ["tab:red" if n.startswith("rlsc") else "tab:gray" if n == "matmul-floor" else "tab:blue" for n in names]
            ax.barh(range(len(sel)), vals, color=colors)
            ax.set_yticks(range(len(sel)), names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, max(vals + [1]) * 1.18)  # linear from 0, room for the labels
            for k, r in enumerate(sel):
                if r.get(field) is None:
                    ax.text(0.01, k, (r.get("error") or "n/a")[:40], transform=ax.get_yaxis_transform(), va="center", fontsize=7)
                else:
                    ax.text(r[field], k, f" {r[field]:.0f}" if r[field] >= 10 else f" {r[field]:.2f}", va="center", fontsize=7)
            ax.set_title(f"{op}: {label}", fontsize=9)
    if ncols == 3:
        tr = train["results"]
        for i, (field, label) in enumerate((("median_ms", "step time (ms)"), ("peak_mem_mb", "peak memory (MB)"))):
            ax = axes[i][2]
            ax.barh([r["variant"] for r in tr], [r.get(field) or 0 for r in tr],
                    color=["tab:red" if r["variant"] == "fused" else "tab:blue" for r in tr])  # ours in red, as above
            ax.set_title(f"training step: {label}", fontsize=9)
    fig.suptitle(f"{doc['device']} - {head}, N = {N}, {rows[0]['dtype']} ({doc['date']}, {doc['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(doc, train=None) -> str:
    """Short text: targets, the headline shape's rows, the training step; and the error/not-run counts."""
    rows = doc["results"]
    head, N = HEADLINE
    sel = [r for r in rows if (r["head"], r["N"]) == (head, N)] or rows[:20]
    sub = dict(doc, results=sel)
    lines = [f"{doc['device']} | torch {doc['torch']} | triton {doc['triton']} | commit {doc['commit']}", ""]
    lines += [f"{v:6} {a}: {b}" for a, b, v in targets(doc, train)] + [""]
    lines += [table(sub), ""]
    n_err = sum(1 for r in rows if r.get("error"))
    lines.append(f"{len(rows)} rows ({n_err} with errors), {len(doc.get('not_run', []))} not run for time")
    if train:
        lines += ["", train_table(train)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    ap.add_argument("--train", type=Path, default=None, help="training-step JSON (benchmarks.train_step)")
    ap.add_argument("--md", type=Path, default=None, help="default: the JSON path with .md")
    ap.add_argument("--png", type=Path, default=None, help="default: the JSON path with .png")
    ap.add_argument("--summary", action="store_true", help="print only the targets, the headline rows and the "
                    "training step (no files written)")
    args = ap.parse_args(argv)
    doc = json.loads(args.json.read_text())
    train = json.loads(args.train.read_text()) if args.train and args.train.exists() else None
    if args.summary:
        print(summary(doc, train))
        return
    md = args.md or args.json.with_suffix(".md")
    png = args.png or args.json.with_suffix(".png")
    md.write_text(markdown(doc, train))
    drew = chart(doc, png, train)
    print(markdown(doc, train))
    print(f"# wrote {md}" + (f" and {png}" if drew else " (no chart: matplotlib missing)"))


if __name__ == "__main__":
    main()
