"""The collapse guard on a real collapsing run: the demo's RLSC cell on builtin:demo, seed 1
(`rlsc ablate` measured pass@1 0.354 untrained and 0.01 after 10 steps on it).

One process, one loaded model, the ablation cell's settings (rlsc/ablate.py base_config: embedded
SmolLM2-135M, T 0.5, 16 samples, lr 1e-5, alpha 0.1, 48-token cap, one question per step):
  1. the unguarded run: 10 steps, every step's label-free diagnostics in metrics.jsonl;
  2. the guarded run from the same initial weights and seed with --stop-when RULE (fixed before
     the run): it stops before the update of the step whose samples trip the rule, so it keeps
     the weights after stop - 1 updates (its diagnostics up to the stop equal the unguarded run's:
     checked);
  3. pass@1 / pass@k / maj@k on the first --eval-questions held-out questions (k samples each,
     its own RNG stream, rlsc.guard.HeldOutEval) of the initial weights, the guarded run's kept
     weights and the unguarded run's final weights.
Also replays other candidate rules on the unguarded diagnostics (where each would have stopped).

    python benchmarks/guard_collapse.py --out runs/guard-collapse      # ~15-40 min on 2 busy cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULE = "token_entropy<0.5x"  # fixed before the run: stop once the token entropy has halved
DIAG = ("token_entropy", "self_certainty", "agreement", "completion_tokens", "weight_underflow")


def replay(rule: str, rows: list[dict], patience: int = 1) -> int | None:
    """The step whose update the guard would not apply (None: it never fires)."""
    from rlsc.guard import Guard, parse_rules

    guard = Guard(parse_rules(rule), patience)
    for row in rows:
        if guard.check(row) is not None:
            return row["step"]
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/guard-collapse")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--task", default="builtin:demo")
    p.add_argument("--weighting", default="rlsc")
    p.add_argument("--objective", default="rlsc")
    p.add_argument("--eval-questions", type=int, default=12)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on oversubscribed cores)")
    p.add_argument("--rule", default=RULE)
    p.add_argument("--results", default="benchmarks/results/guard-collapse")
    p.add_argument("--guarded-only", action="store_true",
                   help="only the guarded run with --rule and the evaluation of its kept weights (another rule on the "
                        "same seed, after a full run): writes RESULTS.json with those alone")
    args = p.parse_args()

    import torch

    from rlsc.ablate import base_config, git_commit, machine
    from rlsc.guard import HeldOutEval
    from rlsc.plot import read_metrics
    from rlsc.train import load, train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0, load_before = time.time(), os.getloadavg()
    cfg = base_config().updated({
        "prompts": args.task, "seed": args.seed, "weighting": args.weighting, "objective": args.objective,
        "eval_max_questions": args.eval_questions, "k": args.k, "threads": args.threads})
    loaded = load(cfg)
    initial = {n: t.detach().clone() for n, t in loaded.model.state_dict().items()}
    held_out = HeldOutEval(cfg, out / "eval")
    evals = {}

    def evaluate(label, step):
        loaded.model.eval()
        m = held_out.evaluate(loaded.model, loaded.tokenizer, step, loaded.autocast_dtype)
        evals[label] = {"after_updates": step, **{k[5:]: v for k, v in m.items() if k.startswith("eval_") and k != "eval_best"}}
        print(f"{label}: {evals[label]}", file=sys.stderr, flush=True)

    if args.guarded_only:
        train(cfg.updated({"output_dir": str(out / "guarded"), "stop_when": args.rule}), loaded=loaded)
        grows = read_metrics(out / "guarded" / "metrics.jsonl")
        stop = next((r["step"] for r in grows if r.get("guard_stop")), None)
        evaluate("guarded_kept", (stop - 1) if stop else cfg.steps)
        result = {"task": args.task, "seed": args.seed, "objective": args.objective, "weighting": args.weighting,
                  "rule": args.rule, "eval": {"split": cfg.eval_split, "questions": args.eval_questions, "k": args.k},
                  "guard_stop_step": stop, "guard_reason": next((r["guard_stop"] for r in grows if r.get("guard_stop")), None),
                  "steps": [{"step": r["step"], **{k: r.get(k) for k in DIAG}} for r in grows],
                  "evals": evals, "wall_seconds": round(time.time() - t0), "commit": git_commit(), "machine": machine(),
                  "load_average_before": [round(x, 2) for x in load_before],
                  "load_average_after": [round(x, 2) for x in os.getloadavg()],
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(args.results + ".json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    evaluate("initial", 0)
    train(cfg.updated({"output_dir": str(out / "unguarded")}), loaded=loaded)
    rows = read_metrics(out / "unguarded" / "metrics.jsonl")
    evaluate("unguarded_end", cfg.steps)

    loaded.model.load_state_dict(initial)
    train(cfg.updated({"output_dir": str(out / "guarded"), "stop_when": args.rule}), loaded=loaded)
    grows = read_metrics(out / "guarded" / "metrics.jsonl")
    stop = next((r["step"] for r in grows if r.get("guard_stop")), None)
    evaluate("guarded_kept", (stop - 1) if stop else cfg.steps)

    result = {
        "task": args.task, "seed": args.seed, "objective": args.objective, "weighting": args.weighting,
        "rule": args.rule, "settings": {k: getattr(cfg, k) for k in ("temperature", "num_samples", "lr", "alpha",
                                                                       "steps", "max_new_tokens", "model")},
        "eval": {"split": cfg.eval_split, "questions": args.eval_questions, "k": args.k, "temperature": cfg.temperature},
        "steps": [{"step": r["step"], **{k: r.get(k) for k in DIAG}, "mean_seq_logp": r.get("mean_seq_logp")}
                  for r in rows],
        "evals": evals,
        "guard_stop_step": stop,
        "guard_reason": next((r["guard_stop"] for r in grows if r.get("guard_stop")), None),
        "replayed_stop_step": replay(args.rule, rows),
        "guarded_diagnostics_equal_unguarded": all(
            abs(a["token_entropy"] - b["token_entropy"]) <= 1e-9 * max(1.0, abs(b["token_entropy"]))
            for a, b in zip(grows, rows)),
        "other_rules": {r: replay(r, rows) for r in ("token_entropy<0.75x", "token_entropy<0.5x", "token_entropy<0.25x",
                                                     "self_certainty>1.5x", "agreement>0.9", "completion_tokens<0.5x",
                                                     "weight_underflow>0.5")},
        "wall_seconds": round(time.time() - t0), "commit": git_commit(), "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results + ".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
