"""The demo's evaluation (rlsc.evaluate.evaluate_problems: greedy + 16 samples at T 0.5, 48-token
cap) on the first held-out questions of builtin:demo with the embedded SmolLM2-135M, per decode
loop (dynamic: greedy and samples in two calls, every row every step; compact: finished rows leave
the batch, greedy decoded in the samples' batch), precision (fp32, bf16-autocast) and questions
per batch (--configs LOOP:PRECISION:QUESTIONS,...), interleaved in one process (each configuration once per round) so that load from
other processes hits every row alike. Wall time and process CPU time (the latter barely moved by
other processes at --threads 1) and the load average are recorded per call.

    python -m benchmarks.eval_sampler --questions 3 --rounds 2 --threads 1 --out benchmarks/results/eval-sampler-cpu.json
    python -m benchmarks.eval_sampler --questions 24 --rounds 1 --threads 2 \
        --configs compact:fp32:1,compact:fp32:8,compact:bf16-autocast:1,compact:bf16-autocast:4,compact:bf16-autocast:8,compact:bf16-autocast:24 \
        --out benchmarks/results/eval-batch-cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from rlsc.data import default_template, load_problems
from rlsc.evaluate import evaluate_problems
from rlsc.models import load_model, load_tokenizer
from rlsc.provenance import git_commit

DEFAULT_CONFIGS = "dynamic:fp32:1,compact:fp32:1,dynamic:bf16-autocast:1,compact:bf16-autocast:1"
METRICS = ("greedy_accuracy", "pass@1", "pass@16", "maj@16", "mean_completion_tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help="comma-separated LOOP:PRECISION:QUESTIONS_PER_BATCH (loop dynamic|compact, precision fp32|bf16-autocast)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval-sampler-cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer("embedded")
    model = load_model("embedded", device=torch.device("cpu"), precision="fp32").eval()
    problems = load_problems("builtin:demo", split="test", limit=0)[:args.questions]
    configs = [(s, p, int(q)) for s, p, q in (c.split(":") for c in args.configs.split(","))]
    rows = {f"{s} {p} {q}q": [] for s, p, q in configs}
    for _ in range(args.rounds):
        for sampler, precision, questions in configs:
            torch.manual_seed(1)
            load_before = os.getloadavg()
            wall, cpu = time.perf_counter(), time.process_time()
            r = evaluate_problems(model, tok, problems, template=default_template("builtin:demo"), k=16,
                                  temperature=0.5, max_new_tokens=48, sampler=sampler, log=lambda *a: None,
                                  batch_questions=questions,
                                  autocast_dtype=torch.bfloat16 if precision == "bf16-autocast" else None)
            rows[f"{sampler} {precision} {questions}q"].append({
                "wall_seconds": round(time.perf_counter() - wall, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
                "load_before": [round(x, 2) for x in load_before], **{m: r[m] for m in METRICS}})
            print(sampler, precision, questions, rows[f"{sampler} {precision} {questions}q"][-1], flush=True)
    summary = {k: {"min_wall_seconds": min(x["wall_seconds"] for x in v), "min_cpu_seconds": min(x["cpu_seconds"] for x in v)}
               for k, v in rows.items()}
    out = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "date": datetime.date.today().isoformat(),
           "commit": git_commit(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "cpu": _cpu_name(), "torch": torch.__version__, "threads": args.threads, "questions": args.questions,
           "rounds": args.rounds, "summary": summary, "calls": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
