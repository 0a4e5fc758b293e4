"""The collapse guard on a real collapsing run: the demo's RLSC cell on builtin:demo, seed 1
(`rlsc ablate` measured pass@1 0.354 untrained and 0.01 after 10 steps on it).

Trains the ablation cell's settings (rlsc/ablate.py base_config: embedded SmolLM2-135M, T 0.5,
16 samples, lr 1e-5, alpha 0.1, 48-token cap, one question per step) for 10 steps WITHOUT a stop
rule, with --eval-every 1 on the first --eval-questions held-out questions (k samples each), so
that metrics.jsonl holds every step's label-free diagnostics and eval.jsonl the pass@1 after every
step. The evaluation uses its own RNG stream, so the training run is the one a plain run takes.
The rule (fixed before the run) is then replayed on the logged diagnostics with rlsc.guard.Guard,
exactly as `--stop-when RULE` decides during training (before the update of the step it fires
on): the guarded run's weights are those after `stop_step - 1` updates, whose pass@1 is in eval.jsonl.
`--guarded` also runs the guarded training itself to confirm it stops where the replay says.

    python benchmarks/guard_collapse.py --out runs/guard-collapse          # ~15-25 min on 2 busy cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULE = "token_entropy<0.5x"  # fixed before the run: stop once token entropy has halved


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
    p.add_argument("--eval-questions", type=int, default=8)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rule", default=RULE)
    p.add_argument("--guarded", action="store_true", help="also run the guarded training (no evaluation)")
    p.add_argument("--results", default="benchmarks/results/guard-collapse")
    args = p.parse_args()

    from rlsc.ablate import base_config, git_commit, machine
    from rlsc.train import train

    out = Path(args.out)
    cfg = base_config().updated({
        "prompts": args.task, "seed": args.seed, "weighting": args.weighting, "output_dir": str(out / "unguarded"),
        "eval_every": 1, "eval_max_questions": args.eval_questions, "k": args.k, "save_final_model": False})
    load_before = os.getloadavg()
    t0 = time.time()
    if not (out / "unguarded" / "eval.jsonl").is_file() or len(open(out / "unguarded" / "eval.jsonl").readlines()) < cfg.steps + 1:
        train(cfg)
    rows = [json.loads(x) for x in open(out / "unguarded" / "metrics.jsonl") if x.strip()]
    evals = {r["step"]: r for r in (json.loads(x) for x in open(out / "unguarded" / "eval.jsonl") if x.strip())}
    stop = replay(args.rule, rows)
    result = {
        "task": args.task, "seed": args.seed, "weighting": args.weighting, "rule": args.rule,
        "eval": {"questions": args.eval_questions, "k": args.k, "temperature": cfg.temperature, "split": cfg.eval_split},
        "steps": [{"step": r["step"], **{k: r.get(k) for k in ("token_entropy", "self_certainty", "agreement",
                                                               "completion_tokens", "weight_underflow")},
                   "pass@1_after": evals.get(r["step"], {}).get("pass@1")} for r in rows],
        "pass@1_start": evals[0]["pass@1"],
        "guard_stop_step": stop,
        "pass@1_kept": evals[stop - 1]["pass@1"] if stop else evals[max(evals)]["pass@1"],
        "pass@1_unguarded_end": evals[max(evals)]["pass@1"],
        "other_rules": {r: replay(r, rows) for r in ("token_entropy<0.75x", "token_entropy<0.5x", "token_entropy<0.25x",
                                                     "self_certainty>2x", "agreement>0.9", "completion_tokens<0.5x")},
    }
    if args.guarded:
        gcfg = cfg.updated({"output_dir": str(out / "guarded"), "eval_every": 0, "stop_when": args.rule})
        train(gcfg)
        grows = [json.loads(x) for x in open(out / "guarded" / "metrics.jsonl") if x.strip()]
        result["guarded_run"] = {"stopped_at": next((r["step"] for r in grows if r.get("guard_stop")), None),
                                 "reason": next((r["guard_stop"] for r in grows if r.get("guard_stop")), None),
                                 "same_diagnostics_as_unguarded": all(
                                     abs(a["token_entropy"] - b["token_entropy"]) < 1e-6 for a, b in zip(grows, rows))}
    result.update({"wall_seconds": round(time.time() - t0), "commit": git_commit(), "machine": machine(),
                   "load_average_before": [round(x, 2) for x in load_before],
                   "load_average_after": [round(x, 2) for x in os.getloadavg()],
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results + ".json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
