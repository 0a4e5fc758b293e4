"""The label-free probe guard (--probe-every, rlsc.guard.Probe) on the real collapsing run and on a
run that improves: the demo's RLSC cell on builtin:demo, seed 1 (collapses: pass@1 0.39 -> 0.00 in
benchmarks/results/guard-collapse.json) and seed 0 (the README's demo: pass@1 rises).

One process, one loaded model, the ablation cell's settings (rlsc/ablate.py base_config), per seed:
  1. the guarded run: --probe-every 1 on the first --probe-questions held-out questions (answers
     never read), --stop-when RULE (fixed before the run, written in the results file first);
  2. the unguarded run: the guarded run's checkpoint resumed without the rule up to 10 steps (the
     probe does not change the training run: tests/rlsc/test_probe.py; checked again here against
     the recorded unguarded diagnostics where they exist), so the probe is logged over the whole run;
  3. pass@1 / pass@k / maj@k WITH labels on the held-out questions AFTER the probe's (disjoint from
     it), --k samples each at the training temperature, one seeded stream: the initial weights,
     the guarded run's kept weights (best by probe_majority), its weights at the stop, the
     unguarded end, and the best by probe_majority over the whole run.

    python benchmarks/guard_probe.py --seed 1 --out runs/guard-probe     # ~10-30 min on 2 busy cores
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULE = "probe_majority<0.9x"  # fixed before the run (benchmarks/results/guard-collapse.md says why)
STEP_DIAG = ("token_entropy", "self_certainty", "agreement", "completion_tokens", "weight_underflow")
AFTER_THE_FACT = ("probe_majority<0.95x", "probe_majority<0.8x", "probe_majority<0.7x", "probe_agreement>1.2x",
                  "probe_surprisal<0.75x", "probe_surprisal<0.5x", "probe_tokens<0.75x")


def replay(rule: str, start: dict, rows: list[dict]) -> int | None:
    """The step after whose probe the rule would stop (None: never)."""
    from rlsc.guard import PROBE_METRICS, Guard, parse_rules

    guard = Guard(parse_rules(rule))
    guard.set_start(start)
    for row in rows:
        if guard.check({k: row[k] for k in PROBE_METRICS if k in row}) is not None:
            return row["step"]
    return None


def difference_from_recorded(rows: list[dict], recorded: list[dict]) -> dict:
    """Per diagnostic, the largest |a - b| / max(1, |b|) between this run's steps and a recorded
    run's (guard-collapse.json): 0 for the sample-only ones (agreement, lengths, underflow) when
    the same tokens were drawn; the scored ones also carry the arithmetic of the scoring pass."""
    return {k: max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for a, b in zip(rows, recorded)) for k in STEP_DIAG}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/guard-probe")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--task", default="builtin:demo")
    p.add_argument("--rule", default=RULE)
    p.add_argument("--probe-questions", type=int, default=8)
    p.add_argument("--probe-k", type=int, default=8)
    p.add_argument("--k", type=int, default=8, help="labelled evaluation: samples per question")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on oversubscribed cores)")
    p.add_argument("--results", default="benchmarks/results/guard-probe")
    args = p.parse_args()

    import torch

    from rlsc.ablate import base_config, git_commit, machine
    from rlsc.checkpoint import rng_state, set_rng_state
    from rlsc.data import default_template, load_problems
    from rlsc.evaluate import evaluate_problems
    from rlsc.guard import PROBE_BEST_CHECKPOINT, PROBE_METRICS, PROBE_STATE, load_best
    from rlsc.plot import read_metrics
    from rlsc.train import load, train

    torch.set_num_threads(args.threads)
    out = Path(args.out) / f"seed{args.seed}"
    t0, load_before = time.time(), os.getloadavg()
    cfg = base_config().updated({
        "prompts": args.task, "seed": args.seed, "threads": args.threads, "probe_every": 1,
        "probe_questions": args.probe_questions, "probe_k": args.probe_k, "probe_split": "test",
        "save_optimizer_state": True, "checkpoint_every": 0})
    held_out = load_problems(args.task, split="test")
    eval_problems = held_out[args.probe_questions:]  # disjoint from the probe's questions
    loaded = load(cfg)
    evals = {}

    def evaluate(label: str, after_updates: int) -> None:
        state = rng_state()
        loaded.model.eval()
        try:
            torch.manual_seed(args.seed + 1)  # the same stream for every set of weights
            m = evaluate_problems(loaded.model, loaded.tokenizer, eval_problems, template=default_template(args.task),
                                  k=args.k, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                  autocast_dtype=loaded.autocast_dtype, log=lambda *_: None, label=label,
                                  sampler=cfg.sampler)
        finally:
            set_rng_state(state)
        evals[label] = {"after_updates": after_updates,
                        **{k: v for k, v in m.items() if k.startswith(("pass@", "maj@")) or k == "greedy_accuracy"}}
        print(f"{label}: {evals[label]}", file=sys.stderr, flush=True)

    def same_weights(label: str, source: str, after_updates: int) -> None:
        evals[label] = dict(evals[source], after_updates=after_updates, same_weights_as=source)

    evaluate("initial", 0)
    guarded_dir = out / "guarded"
    train(cfg.updated({"output_dir": str(guarded_dir), "stop_when": args.rule}), loaded=loaded)
    grows = read_metrics(guarded_dir / "metrics.jsonl")
    stop_row = next((r for r in grows if r.get("guard_stop")), None)
    stop = stop_row["step"] if stop_row else None
    kept_info = json.loads((guarded_dir / PROBE_STATE).read_text())["best"]
    if stop is not None:
        evaluate("guarded_at_stop", stop)
        unguarded_dir = out / "unguarded"
        if unguarded_dir.exists():
            shutil.rmtree(unguarded_dir)
        shutil.copytree(guarded_dir, unguarded_dir)
        train(cfg.updated({"output_dir": str(unguarded_dir), "stop_when": "", "resume": "yes"}), loaded=loaded)
        evaluate("unguarded_end", cfg.steps)
    else:
        unguarded_dir = guarded_dir
        evaluate("unguarded_end", cfg.steps)
    rows = read_metrics(unguarded_dir / "metrics.jsonl")
    probe_state = json.loads((unguarded_dir / PROBE_STATE).read_text())
    full_best = probe_state["best"]

    # the kept weights (best by probe_majority when the guard stopped): evaluated unless they are
    # weights already evaluated (the same weights and evaluation stream give the same numbers)
    known = {0: "initial", cfg.steps: "unguarded_end", **({stop: "guarded_at_stop"} if stop else {})}
    for label, info, where in (("guarded_kept", kept_info, guarded_dir), ("probe_best_whole_run", full_best, unguarded_dir)):
        if info["step"] in known:
            same_weights(label, known[info["step"]], info["step"])
        else:
            load_best(where, loaded.model, PROBE_BEST_CHECKPOINT)
            evaluate(label, info["step"])
            known[info["step"]] = label

    recorded = ROOT / "benchmarks" / "results" / "guard-collapse.json"
    same_run = None
    if recorded.is_file():
        rec = json.loads(recorded.read_text())
        if rec["seed"] == args.seed and rec["task"] == args.task:
            same_run = difference_from_recorded(rows, rec["steps"])
    result = {
        "task": args.task, "seed": args.seed, "objective": cfg.objective, "weighting": cfg.weighting, "rule": args.rule,
        "settings": {k: getattr(cfg, k) for k in ("temperature", "num_samples", "lr", "alpha", "steps",
                                                   "max_new_tokens", "model", "probe_questions", "probe_k",
                                                   "probe_split", "probe_every")},
        "eval": {"split": "test", "questions": f"{args.probe_questions + 1}..{len(held_out)} (disjoint from the probe)",
                 "k": args.k, "temperature": cfg.temperature},
        "probe_start": probe_state["start"],
        "steps": [{"step": r["step"], **{k: r.get(k) for k in STEP_DIAG + PROBE_METRICS}} for r in rows],
        "evals": evals,
        "guard_stop_step": stop, "guard_reason": stop_row["guard_stop"] if stop_row else None,
        "guarded_kept_step": kept_info["step"],
        "replayed_stop_step": replay(args.rule, probe_state["start"], rows),
        "max_relative_difference_from_recorded_unguarded_run": same_run,
        "other_rules_after_the_fact": {r: replay(r, probe_state["start"], rows) for r in AFTER_THE_FACT},
        "wall_seconds": round(time.time() - t0), "commit": git_commit(), "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(f"{args.results}-seed{args.seed}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
