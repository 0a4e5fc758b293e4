"""`rlsc ablate` (also `python -m rlsc.ablate`): which weighting, measured against untrained baselines.

One cell is one (task, method, seed): restore the loaded model's initial weights, train it with the
trainer (rlsc/train.py) when the method trains, evaluate it on the task's held-out split with the
evaluation code (rlsc/evaluate.py), and write the cell's metrics atomically to its own JSON file.
A rerun skips the cells already written, so an interrupted ablation resumes where it stopped.
`--report` builds the table (mean and run-to-run spread over seeds) and the pass@1-against-pass@16
plot from the finished cells alone; `--probe` measures the untrained row of candidate task sets.

    rlsc ablate --jobs 2                          # hours on 2 CPU cores; rerun to resume
    rlsc ablate --report                          # table + plot from the cells written so far
    rlsc ablate --probe builtin:sub,builtin:add --probe-questions 6

Methods (the demo's settings: embedded SmolLM2-135M, T 0.5, 16 samples, lr 1e-5, 10 steps,
alpha 0.1, 48-token cap, one question per step):
  greedy, T0.1, T0.2, T0.3, base   untrained: greedy decoding, sampling at T 0.1 / 0.2 / 0.3 / 0.5
  rlsc, rlsc-l1, entropy, length, group   the trainer's weightings at alpha 0.1, 10 steps
  rlsc-alpha0.5, rlsc-steps20               the paper's weighting at alpha 0.5 / 20 steps
  (alpha 0 is the rlsc-l1 row: w = p_old + 0 is rlsc-l1's w = p_old, the same weights and gradients)

The main rows (base and the five weightings) run once per seed; the others (greedy, which no seed
changes, the lowered temperatures and the sensitivity rows) on the first seed only, unless
--all-seeds. --jobs J runs the tasks in J worker processes at once, each on cores/J threads; it
is meant for many-core machines; on 2 cores two 1-thread workers did about the same work per hour
as one 2-thread process (decoding at batch 16 is memory-bound, and the two workers compete).

The trained model of a cell lives in memory only: the trainer runs with no final model, no
optimizer state in its checkpoint, and its output directory is a temporary one removed with the
cell (the trainer still writes its one end-of-run weights checkpoint there, ~0.5 GB, deleted at once).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import OBJECTIVES, TRAINER_WEIGHTINGS, RLSCConfig
from .data import default_template, load_problems
from .evaluate import evaluate_problems
from .provenance import git_commit
from .train import load, log_to_stderr, train

DEFAULT_TASKS = ("builtin:demo", "builtin:div")
DEFAULT_SEEDS = (0, 1)

#: method -> (trains?, overrides of the base config, evaluation temperature or None for the base T)
METHODS: dict[str, tuple[bool, dict, float | None]] = {
    "greedy": (False, {}, None),
    "T0.1": (False, {}, 0.1),
    "T0.2": (False, {}, 0.2),
    "T0.3": (False, {}, 0.3),
    "base": (False, {}, None),
    **{w: (True, {"weighting": w}, None) for w in TRAINER_WEIGHTINGS},
    "rlsc-alpha0.5": (True, {"weighting": "rlsc", "alpha": 0.5}, None),
    "rlsc-steps20": (True, {"weighting": "rlsc", "steps": 20}, None),
    # RLSC's label-free siblings (rlsc/objectives.py), at the same settings
    **{o: (True, {"objective": o}, None) for o in OBJECTIVES if o != "rlsc"},
}

#: the rows that run once per seed; every other method runs on the first seed only (unless all_seeds)
MAIN_METHODS = ("base", *TRAINER_WEIGHTINGS)

#: --preset label-free: every objective and the untrained baselines, 5 seeds each (greedy, which no
#: seed changes, once); its own cells and report. Its cells live in the repository (small JSONs), so
#: a measurement of several hours on 2 cores resumes in a later checkout once they are committed;
#: fp32 (not --precision auto) so that cells measured on different CPUs are the same computation
#: (fp32 CPU runs reproduced to the printed digit across an Intel Xeon and an AMD EPYC).
PRESETS = {
    "label-free": {
        "methods": ("greedy", "T0.2", "base", "rlsc", *(o for o in OBJECTIVES if o != "rlsc")),
        "main": ("T0.2", "base", *OBJECTIVES),
        "seeds": (0, 1, 2, 3, 4),
        "output_dir": "benchmarks/results/label-free-embedded-cells",
        "results": "benchmarks/results/label-free-embedded",
        "set": {"precision": "fp32"},
        "title": "Label-free objectives: RLSC and its siblings against the untrained model",
    },
}
#: the report's heading when no preset names one
DEFAULT_TITLE = "RLSC ablation: which weighting"
#: a trained seed "collapsed" when its pass@1 is below this fraction of the untrained (base) mean pass@1
COLLAPSE_FRACTION = 0.5

#: the fields of every report row (besides pass@j for j = 1, 2, 4, ... up to k)
ROW_FIELDS = ("task", "method", "seeds", "greedy_accuracy", "pass@1", "maj@k", "mean_completion_tokens",
              "token_entropy", "train_seconds", "eval_seconds")


def base_config(model: str = "embedded", device: str = "cpu") -> RLSCConfig:
    """The demo's settings, the starting point of every cell."""
    from .demo import demo_config

    return demo_config().updated({"model": model, "device": device, "checkpoint_every": 0,
                                  "save_optimizer_state": False, "save_final_model": False, "resume": "no"})


def slug(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task)


def cell_path(out_dir: Path, task: str, method: str, seed: int) -> Path:
    return out_dir / "cells" / slug(task) / method / f"seed{seed}.json"


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_cell(path: Path) -> dict | None:
    """A finished cell, or None when it is missing or unreadable (then it is run again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_cell(loaded, initial_state: dict, base: RLSCConfig, task: str, method: str, seed: int,
             max_questions: int, log=log_to_stderr) -> dict:
    trains, overrides, eval_t = METHODS[method]
    cfg = base.updated({"prompts": task, "seed": seed, **overrides})
    temperature = eval_t if eval_t is not None else cfg.temperature
    k = 0 if method == "greedy" else cfg.k
    template = cfg.prompt_template or default_template(task)
    if hasattr(loaded.model, "get_base_model"):   # a LoRA cell before (--set lora_rank=N) left a PeftModel
        loaded.model = loaded.model.unload()         # its adapters removed, unmerged: the base model again
    model = loaded.model
    model.load_state_dict(initial_state)
    model.eval()
    train_stats, train_s = None, 0.0
    if trains:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rlsc-ablate-") as tmp:
            train(cfg.updated({"output_dir": tmp}), loaded=loaded, log=log)
            rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl") if line.strip()]
        train_s = time.perf_counter() - t0
        model = loaded.model   # with LoRA, the PeftModel the training wrapped around it
        train_stats = {key: rows[-1].get(key) for key in ("loss", "mean_seq_logp", "mean_weight",
                                                           "frac_weight_underflow", "mean_token_entropy",
                                                           "mean_completion_tokens", "skipped_steps")}
        model.eval()
    problems = load_problems(task, split="test", limit=max_questions)
    t0 = time.perf_counter()
    torch.manual_seed(seed + 1)
    with tempfile.TemporaryDirectory(prefix="rlsc-ablate-eval-") as tmp:
        samples = Path(tmp) / "samples.jsonl"
        metrics = evaluate_problems(model, loaded.tokenizer, problems, template=template, k=k, temperature=temperature,
                                    max_new_tokens=cfg.max_new_tokens, batch_questions=cfg.eval_batch_questions,
                                    autocast_dtype=loaded.autocast_dtype, log=log, samples_path=samples,
                                    label=f"{task} {method} seed {seed}", sampler=cfg.sampler, token_entropy=k > 0)
        records = [json.loads(line) for line in open(samples)]
    if k == 0:  # greedy decoding: every "sample" is the greedy answer
        lengths = [len(loaded.tokenizer(r["greedy"], add_special_tokens=False)["input_ids"]) for r in records]
        for j in sorted({j for j in (1, 2, 4, 8, 16) if j <= cfg.k} | {cfg.k}):
            metrics[f"pass@{j}"] = metrics["greedy_accuracy"]
        metrics[f"maj@{cfg.k}"] = metrics["greedy_accuracy"]
        metrics["mean_completion_tokens"] = sum(lengths) / max(len(lengths), 1)
        metrics["token_entropy"] = None
    eval_s = time.perf_counter() - t0
    return {
        "task": task, "method": method, "seed": seed, "trains": trains,
        "settings": {"temperature": temperature, "k": cfg.k, "steps": cfg.steps if trains else 0,
                     "alpha": cfg.alpha if trains else None, "weighting": cfg.weighting if trains else None,
                     "lr": cfg.lr, "num_samples": cfg.num_samples, "max_new_tokens": cfg.max_new_tokens,
                     "model": cfg.model, "questions": len(problems)},
        "metrics": metrics, "train": train_stats,
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "commit": git_commit(), "machine": machine(),
    }


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def plan(tasks, methods, seeds, all_seeds: bool = False, main=MAIN_METHODS) -> list[tuple[str, str, int]]:
    """The (task, method, seed) cells: main rows on every seed, the others on the first seed only."""
    return [(task, method, seed) for task in tasks for method in methods
            for seed in (seeds if all_seeds or method in main else seeds[:1])]


def run_ablation(*, tasks, methods, seeds, out_dir: Path, model: str = "embedded", device: str = "cpu",
                 overrides: dict | None = None, max_questions: int = 0, all_seeds: bool = False,
                 log=log_to_stderr, main=MAIN_METHODS) -> dict:
    """Runs every missing cell; returns {"ran": [...], "skipped": [...], "wall_seconds": s}."""
    t_start = time.perf_counter()
    base = base_config(model, device).updated(overrides or {})
    todo, skipped = [], []
    for task, method, seed in plan(tasks, methods, seeds, all_seeds, main):
        path = cell_path(out_dir, task, method, seed)
        (skipped if read_cell(path) is not None else todo).append((task, method, seed))
    log(f"ablation: {len(todo)} cells to run, {len(skipped)} already finished (in {out_dir})")
    ran = []
    if todo:
        loaded = load(base.updated({"prompts": todo[0][0]}), log)
        initial = {name: t.detach().clone() for name, t in loaded.model.state_dict().items()}
        for i, (task, method, seed) in enumerate(todo):
            log(f"== cell {i + 1}/{len(todo)}: {task} {method} seed {seed}")
            cell = run_cell(loaded, initial, base, task, method, seed, max_questions, log)
            write_json_atomic(cell_path(out_dir, task, method, seed), cell)
            ran.append((task, method, seed))
    wall = round(time.perf_counter() - t_start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "runs.jsonl", "a") as fh:
        fh.write(json.dumps({"commit": git_commit(), "machine": machine(), "cells_run": len(ran),
                             "cells_skipped": len(skipped), "wall_seconds": wall, "tasks": list(tasks),
                             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    return {"ran": ran, "skipped": skipped, "wall_seconds": wall}


# ------------------------------------------------------------------------------------------------
# The report, from the finished cells alone.


def _with_ext(prefix: Path, ext: str) -> Path:
    return prefix.with_name(f"{prefix.name}.{ext}")


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, sd


def permutation_p(xs: list[float], ys: list[float]) -> float | None:
    """Exact two-sided permutation p-value for a difference in means between two small samples:
    the share of the ways to split the pooled values into groups of len(xs) and len(ys) whose
    difference in means is at least as large in size as the observed one. None with fewer than
    two values in either sample (a single seed says nothing about spread) or over 20 in all."""
    if len(xs) < 2 or len(ys) < 2 or len(xs) + len(ys) > 20:
        return None
    pooled, n = xs + ys, len(xs)
    total = sum(pooled)
    observed = abs(sum(xs) / n - sum(ys) / len(ys))
    hits = sum(abs(a / n - (total - a) / len(ys)) >= observed - 1e-12
               for a in (sum(group) for group in itertools.combinations(pooled, n)))
    return hits / math.comb(len(pooled), n)


def build_report(out_dir: Path, results_prefix: Path, title: str = DEFAULT_TITLE) -> dict:
    """Aggregates the cells under out_dir into results_prefix.{json,md,png}; returns the JSON."""
    cells = [c for p in sorted((out_dir / "cells").glob("*/*/seed*.json")) if (c := read_cell(p)) is not None]
    if not cells:
        raise FileNotFoundError(f"no finished cells under {out_dir / 'cells'}: run the ablation first")
    order = {m: i for i, m in enumerate(METHODS)}
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["task"], c["method"]), []).append(c)
    rows = []
    for (task, method), group in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        ms = [c["metrics"] for c in group]
        k = group[0]["settings"]["k"]
        row = {"task": task, "method": method, "seeds": sorted(c["seed"] for c in group), "k": k,
               "settings": group[0]["settings"]}
        keys = [key for key in ms[0] if key.startswith("pass@")] + ["greedy_accuracy", "mean_completion_tokens",
                                                                     "token_entropy"]
        for key in keys:
            row[key], row[key + "_sd"] = _mean_sd([m.get(key) for m in ms])
        row["maj@k"], row["maj@k_sd"] = _mean_sd([m.get(f"maj@{k}") for m in ms])
        row["per_seed_pass@1"] = [c["metrics"].get("pass@1") for c in sorted(group, key=lambda c: c["seed"])]
        row["collapsed"] = None
        base = [c["metrics"].get("pass@1") for c in cells if c["task"] == task and c["method"] == "base"]
        base_known = bool(base) and None not in base
        row["p_vs_base"] = (permutation_p(row["per_seed_pass@1"], base) if method != "base" and base_known
                            and None not in row["per_seed_pass@1"] else None)
        if group[0].get("trains") and base_known:
            limit = COLLAPSE_FRACTION * sum(base) / len(base)
            row["collapsed"] = sum(m.get("pass@1", 0.0) < limit for m in ms)
        row["train_seconds"] = sum(c["train_seconds"] for c in group)
        row["eval_seconds"] = sum(c["eval_seconds"] for c in group)
        rows.append(row)
    verdicts = {task: verdict([r for r in rows if r["task"] == task]) for task in dict.fromkeys(r["task"] for r in rows)}
    commits = sorted({c["commit"] for c in cells})
    machines = sorted({c["machine"] for c in cells})
    cell_seconds = round(sum(c["train_seconds"] + c["eval_seconds"] for c in cells), 1)
    runs = [json.loads(line) for line in open(out_dir / "runs.jsonl")] if (out_dir / "runs.jsonl").is_file() else []
    report = {"title": title, "rows": rows, "verdicts": verdicts, "cells": len(cells), "commits": commits, "machines": machines,
              "cell_seconds": cell_seconds, "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
              "fields": list(ROW_FIELDS)}
    results_prefix.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(_with_ext(results_prefix, "json"), report)
    _with_ext(results_prefix, "md").write_text(format_report(report))
    plot_report(report, _with_ext(results_prefix, "png"))
    return report


def verdict(rows: list[dict], reference: str = "rlsc") -> dict | None:
    """Which rows of one task beat `reference` on mean pass@1 with a mean pass@k no lower.

    Each entry gives the differences and their noise scale (the larger of the two rows' seed
    spreads, None with one seed each), so a reader sees whether a win is within run-to-run noise."""
    ref = next((r for r in rows if r["method"] == reference), None)
    if ref is None or ref.get("pass@1") is None:
        return None
    top = f"pass@{ref['k']}"
    better = []
    for r in rows:
        if r is ref or r.get("pass@1") is None or r.get(top) is None:
            continue
        d1, dk = r["pass@1"] - ref["pass@1"], r[top] - ref[top]
        if d1 > 0 and dk >= 0:
            sds = [x for x in (r.get("pass@1_sd"), ref.get("pass@1_sd")) if x is not None]
            better.append({"method": r["method"], "trained": bool(r.get("settings", {}).get("steps")),
                           "d_pass@1": d1, f"d_{top}": dk, "pass@1_noise": max(sds) if sds else None})
    return {"reference": reference, "metric": top, "beats_reference": better}


def _fmt(mean, sd) -> str:
    if mean is None:
        return "-"
    if isinstance(mean, int):
        return str(mean)
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def format_report(report: dict) -> str:
    lines = [f"# {report.get('title', DEFAULT_TITLE)}", "",
             f"{report['cells']} cells; commit(s) {', '.join(report['commits'])}; machine(s) {'; '.join(report['machines'])}; "
             f"cell time {report['cell_seconds']:.0f}s (sum over cells), worker time {report['wall_seconds']:.0f}s "
             "(sum over the runs of `rlsc ablate` and its --jobs workers, which overlap in time).", "",
             "Each entry: mean ± sample standard deviation over seeds (no ± with one seed). Held-out test split; "
             "greedy rows count the greedy answer as all k samples; token entropy in nats at the row's temperature. "
             + ("The paper's weighting at alpha 0 is the rlsc-l1 row (w = p_old + 0 = p_old). "
                if any(r["method"] == "rlsc-l1" for r in report["rows"]) else "")
             + f"collapsed: trained seeds whose pass@1 fell below {COLLAPSE_FRACTION} x the untrained (base) mean pass@1. "
             "p vs base: exact two-sided permutation test of the difference in mean pass@1 from the base row over "
             "seeds (the smallest possible with 5 seeds against 5 is 2/252 = 0.008); per seed: pass@1 of seeds "
             "0, 1, 2, ... in order.", ""]
    for task in dict.fromkeys(r["task"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["task"] == task]
        passes = sorted({key for r in rows for key in r if key.startswith("pass@") and not key.endswith("_sd")},
                        key=lambda s: int(s[5:]))
        cols = ["greedy_accuracy"] + passes + ["maj@k", "mean_completion_tokens", "token_entropy", "collapsed"]
        lines += [f"## {task}", "", "| method | seeds | T | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for r in rows:
            cells = [_fmt(r.get(c), r.get(c + "_sd")) for c in cols]
            t = "greedy" if r["method"] == "greedy" else r["settings"]["temperature"]
            lines.append(f"| {r['method']} | {len(r['seeds'])} | {t} | " + " | ".join(cells) + " |")
        lines += ["", "| method | pass@1 per seed | p vs base |", "|---|---|---|"]
        for r in rows:
            per_seed = " / ".join("-" if v is None else f"{v:.2f}" for v in r.get("per_seed_pass@1", []))
            p = r.get("p_vs_base")
            lines.append(f"| {r['method']} | {per_seed} | {'-' if p is None else f'{p:.3f}'} |")
        lines.append("")
        v = report.get("verdicts", {}).get(task)
        if v:
            top = v["metric"]
            for trained, what in ((True, "Trained variants"), (False, "Untrained baselines")):
                wins = [f"{b['method']} (pass@1 {b['d_pass@1']:+.3f}, {top} {b['d_' + top]:+.3f}"
                        + (f"; seed spread of pass@1 {b['pass@1_noise']:.3f}" if b["pass@1_noise"] is not None else "")
                        + ")" for b in v["beats_reference"] if b["trained"] == trained]
                lines += [f"{what} with a higher mean pass@1 than {v['reference']} and a mean {top} no lower: "
                          + ("; ".join(wins) if wins else "none") + ".", ""]
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in report["rows"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in report["rows"] if r["task"] == task):
            top = f"pass@{r['k']}"
            if r.get("pass@1") is None or r.get(top) is None:
                continue
            ax.errorbar(r["pass@1"], r[top], xerr=r.get("pass@1_sd") or 0, yerr=r.get(top + "_sd") or 0,
                        fmt="o" if r["settings"]["steps"] else "s", capsize=2)
            ax.annotate(r["method"], (r["pass@1"], r[top]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("pass@1")
        ax.set_ylabel(f"pass@{report['rows'][0]['k']}")
        ax.set_title(f"{task} (squares: untrained)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# The probe: the untrained row of candidate task sets, on a few questions.


def probe(tasks, *, questions: int, model: str = "embedded", device: str = "cpu", overrides: dict | None = None,
          log=log_to_stderr) -> dict:
    base = base_config(model, device).updated(overrides or {})
    loaded = load(base.updated({"prompts": tasks[0]}), log)
    out = {}
    for task in tasks:
        problems = load_problems(task, split="test", limit=questions)
        torch.manual_seed(base.seed + 1)
        t0 = time.perf_counter()
        m = evaluate_problems(loaded.model, loaded.tokenizer, problems, template=base.prompt_template or default_template(task),
                              k=base.k, temperature=base.temperature, max_new_tokens=base.max_new_tokens,
                              batch_questions=base.eval_batch_questions, autocast_dtype=loaded.autocast_dtype,
                              log=log, label=f"probe {task}", sampler=base.sampler)
        out[task] = {"questions": len(problems), "temperature": base.temperature, "k": base.k,
                     "greedy_accuracy": m["greedy_accuracy"], "pass@1": m["pass@1"], f"pass@{base.k}": m[f"pass@{base.k}"],
                     f"maj@{base.k}": m[f"maj@{base.k}"], "mean_completion_tokens": m["mean_completion_tokens"],
                     "seconds": round(time.perf_counter() - t0, 1)}
        log(f"probe {task}: {json.dumps(out[task])}")
    return {"probe": out, "model": model, "commit": git_commit(), "machine": machine()}


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsc ablate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated prompt sources (held-out split)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated integer seeds")
    p.add_argument("--output-dir", default="runs/ablate", help="where the cells are written (and resumed from)")
    p.add_argument("--results", default="benchmarks/results/ablate-embedded",
                   help="prefix of the report files: PREFIX.json, PREFIX.md, PREFIX.png")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="label-free: every objective (rlsc/objectives.py) and the untrained baselines on 5 seeds, "
                        "in runs/ablate-label-free -> benchmarks/results/label-free-embedded (flags given override it)")
    p.add_argument("--report", action="store_true", help="only build the report from the finished cells")
    p.add_argument("--no-report", action="store_true", help="do not build the report after running the cells")
    p.add_argument("--probe", default="", metavar="TASKS",
                   help="measure the untrained row (greedy, pass@1, pass@k, maj@k) of these comma-separated sources")
    p.add_argument("--probe-questions", type=int, default=6, help="questions per probed task (default 6)")
    p.add_argument("--all-seeds", action="store_true",
                   help="run every method on every seed (default: only the main rows; the others on the first seed)")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the tasks in this many worker processes at once, each on cores/jobs threads (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for this process (default: torch's own)")
    p.add_argument("--max-questions", type=int, default=0, help="evaluate only the first N held-out questions (0 = all)")
    p.add_argument("--model", default="embedded", help="the model every cell starts from (default: embedded)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a base config field for every cell (e.g. --set max_new_tokens=32); repeatable")
    return p


def run_jobs(args: argparse.Namespace, tasks: list[str], jobs: int) -> None:
    """Runs the tasks round-robin in `jobs` worker processes of this command (no report each),
    each on cores // jobs threads; raises if a worker fails. Every worker resumes on its own."""
    groups = [tasks[i::jobs] for i in range(min(jobs, len(tasks)))]
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(groups))
    common = ["--methods", args.methods, "--seeds", args.seeds, "--output-dir", args.output_dir,
              "--max-questions", str(args.max_questions), "--model", args.model, "--device", args.device,
              "--threads", str(threads), "--no-report", *(["--all-seeds"] if args.all_seeds else []),
              *(["--preset", args.preset] if args.preset else []),
              *[x for pair in args.set for x in ("--set", pair)]]
    procs = [subprocess.Popen([sys.executable, "-m", "rlsc.ablate", "--tasks", ",".join(g), *common]) for g in groups]
    failed = [",".join(g) for g, proc in zip(groups, procs) if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"the worker for {'; '.join(failed)} failed (see its log above); rerun to resume")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}")
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    main_methods, title = MAIN_METHODS, DEFAULT_TITLE
    if args.preset:
        preset = PRESETS[args.preset]
        main_methods, title = preset["main"], preset.get("title", DEFAULT_TITLE)
        for name, value in (("methods", ",".join(preset["methods"])), ("seeds", ",".join(map(str, preset["seeds"]))),
                            ("output_dir", preset["output_dir"]), ("results", preset["results"])):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    try:
        overrides = {**(PRESETS[args.preset].get("set", {}) if args.preset else {}), **_overrides(args.set)}
        base_config(args.model, args.device).updated(overrides).validate("demo")
        if args.probe_questions < 1 or args.max_questions < 0:
            raise ValueError("--probe-questions expects an integer >= 1 and --max-questions an integer >= 0")
        if args.jobs < 1 or args.threads < 0:
            raise ValueError(f"--jobs expects an integer >= 1 and --threads an integer >= 0, got {args.jobs} and {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
        results = Path(args.results)
        if args.probe:
            tasks = [t for t in args.probe.split(",") if t]
            out = probe(tasks, questions=args.probe_questions, model=args.model, device=args.device, overrides=overrides)
            path = _with_ext(results, "probe.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, out)
            print(json.dumps(out, indent=2))
            return 0
        out_dir = Path(args.output_dir)
        if not args.report:
            methods = [m for m in args.methods.split(",") if m]
            unknown = [m for m in methods if m not in METHODS]
            if unknown or not methods:
                raise ValueError(f"--methods expects a comma-separated subset of {', '.join(METHODS)}, got {args.methods!r}")
            try:
                seeds = [int(s) for s in args.seeds.split(",") if s]
            except ValueError:
                seeds = []
            if not seeds:
                raise ValueError(f"--seeds expects comma-separated integers, got {args.seeds!r}")
            tasks = [t for t in args.tasks.split(",") if t]
            for task in tasks:
                load_problems(task, split="test")  # a bad source fails here, before the model loads
            if args.jobs > 1 and len(tasks) > 1:
                run_jobs(args, tasks, args.jobs)
            else:
                run_ablation(tasks=tasks, methods=methods, seeds=seeds, out_dir=out_dir, model=args.model,
                             device=args.device, overrides=overrides, max_questions=args.max_questions,
                             all_seeds=args.all_seeds, main=main_methods)
            if args.no_report:
                return 0
        report = build_report(out_dir, results, title)
        print(format_report(report))
        return 0
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"rlsc ablate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
