"""The collapse guard: a stop rule on label-free diagnostics, and held-out evaluation that keeps the best weights.

Every step's samples are scored before the update (rlsc/objectives.py) and metrics.jsonl gets,
for every objective: token_entropy, self_certainty, agreement (share of a question's samples that
give its majority answer), completion_tokens and weight_underflow. Label-free training sharpens the
model and then, past a model-dependent point, collapses (short, identical, confident answers);
these numbers move before the accuracy does.

--stop-when takes comma-separated rules METRIC<THRESHOLD or METRIC>THRESHOLD over those metrics;
a threshold ending in "x" is relative to the metric's value at the run's first step, e.g.
    --stop-when "token_entropy<0.5x,agreement>0.95"
When any rule has held for --stop-patience steps in a row, the run stops BEFORE applying that
step's update (the step's samples came from the current weights, so these are the weights the
rule judged), writes its checkpoint and final model, and says which rule fired.

--eval-every K (where the prompt source has answers) evaluates pass@1 / pass@k / maj@k on the
held-out split (--eval-split, first --eval-max-questions questions) before the first step, every
K steps and after the last, into output_dir/eval.jsonl (and the step's metrics row, as eval_*); the evaluation draws from its own seeded RNG stream and restores the training one, so it
does not change the training run. The best weights by pass@1 (ties: the earlier) are kept in
output_dir/best_checkpoint.pt, written atomically (temporary file, fsync, rename), with its step
and metrics; best_checkpoint.json says the same in text.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

#: the diagnostics a rule may name (written by rlsc/objectives.py into every metrics row)
GUARD_METRICS = ("token_entropy", "self_certainty", "agreement", "completion_tokens", "weight_underflow")
BEST_CHECKPOINT = "best_checkpoint.pt"
EVAL_LOG = "eval.jsonl"
_RULE = re.compile(r"^\s*([a-z_]+)\s*([<>])\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(x?)\s*$")


@dataclass(frozen=True)
class Rule:
    metric: str
    op: str              # "<" or ">"
    threshold: float
    relative: bool       # threshold times the metric's first-step value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}{'x' if self.relative else ''}"


def parse_rules(text: str) -> list[Rule]:
    """The rules of a --stop-when string (empty: none); ValueError naming the bad part."""
    rules = []
    for part in (p for p in text.split(",") if p.strip()):
        m = _RULE.match(part)
        if not m:
            raise ValueError(f"--stop-when: {part.strip()!r} is not METRIC<NUMBER or METRIC>NUMBER "
                             f"(NUMBER may end in x: relative to the first step)")
        metric, op, number, rel = m.groups()
        if metric not in GUARD_METRICS:
            raise ValueError(f"--stop-when: unknown metric {metric!r}; known: {', '.join(GUARD_METRICS)}")
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(f"--stop-when: threshold of {part.strip()!r} must be finite")
        rules.append(Rule(metric, op, value, rel == "x"))
    return rules


class Guard:
    """The stop rule's state: first-step values and how many steps in a row each rule has held."""

    def __init__(self, rules: list[Rule], patience: int = 1, history: list[dict] | None = None):
        if patience < 1:
            raise ValueError(f"--stop-patience expects an integer >= 1, got {patience}")
        self.rules = rules
        self.patience = patience
        self.first: dict[str, float] = {}
        self.streak = {str(r): 0 for r in rules}
        for row in history or []:  # a resumed run: replay the logged diagnostics
            if all(m in row and row[m] is not None for m in GUARD_METRICS) and not row.get("guard_stop"):
                self.check(row)

    def threshold(self, rule: Rule) -> float | None:
        if not rule.relative:
            return rule.threshold
        base = self.first.get(rule.metric)
        return None if base is None else rule.threshold * base

    def check(self, diag: dict) -> str | None:
        """Records one step's diagnostics; returns why to stop (a sentence), or None to go on.
        The first step sets the baselines of relative rules and never stops on them."""
        new = {m for m in GUARD_METRICS if m in diag and m not in self.first and diag[m] is not None}
        for m in new:
            self.first[m] = float(diag[m])
        fired = []
        for rule in self.rules:
            limit = None if rule.relative and rule.metric in new else self.threshold(rule)
            value = diag.get(rule.metric)
            holds = (limit is not None and value is not None and math.isfinite(value)
                     and (value < limit if rule.op == "<" else value > limit))
            key = str(rule)
            self.streak[key] = self.streak[key] + 1 if holds else 0
            if self.streak[key] >= self.patience:
                fired.append(f"{rule.metric} = {value:.4g} {rule.op} {limit:.4g} ({key}) for {self.streak[key]} step(s)")
        return "; ".join(fired) if fired else None


def guard_from_config(cfg, history: list[dict]) -> Guard | None:
    rules = parse_rules(cfg.stop_when)
    return Guard(rules, cfg.stop_patience, history) if rules else None


class HeldOutEval:
    """--eval-every: pass@1 / pass@k / maj@k on the held-out split, keeping the best weights."""

    def __init__(self, cfg, out_dir: Path, log=print):
        from .data import default_template, load_problems

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.problems = load_problems(cfg.prompts, split=cfg.eval_split, limit=cfg.eval_max_questions)
        if not any(p.answer for p in self.problems):
            raise ValueError(f"--eval-every needs answers on the held-out split {cfg.eval_split!r} of {cfg.prompts}; "
                             "it has none")
        self.template = cfg.prompt_template or default_template(cfg.prompts)
        self.temperature = cfg.eval_temperature if cfg.eval_temperature > 0 else cfg.temperature
        self.log = log
        best = self.out_dir / "best_checkpoint.json"
        self.best = json.loads(best.read_text()) if best.is_file() else None

    def evaluate(self, model, tokenizer, step: int, autocast_dtype=None) -> dict:
        """Evaluates, keeps the weights if they are the best so far; returns eval_* metrics for the row."""
        import torch

        from .checkpoint import rng_state, set_rng_state
        from .evaluate import evaluate_problems

        state = rng_state()
        was_training = model.training
        model.eval()
        try:
            torch.manual_seed(self.cfg.seed + 1)  # the same stream at every evaluation
            m = evaluate_problems(model, tokenizer, self.problems, template=self.template, k=self.cfg.k,
                                  temperature=self.temperature, max_new_tokens=self.cfg.max_new_tokens,
                                  batch_questions=self.cfg.eval_batch_questions, autocast_dtype=autocast_dtype,
                                  log=lambda *_: None, label=f"held-out step {step}", sampler=self.cfg.sampler)
        finally:
            set_rng_state(state)
            model.train(was_training)
        keys = [k for k in m if k.startswith(("pass@", "maj@")) or k == "greedy_accuracy"]
        out = {f"eval_{k}": m[k] for k in keys}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / EVAL_LOG, "a") as fh:
            fh.write(json.dumps({"step": step, **{k: m[k] for k in keys}, "seconds": m.get("seconds")}) + "\n")
        score = m.get("pass@1", m["greedy_accuracy"])
        if self.best is None or score > self.best["score"]:
            self.best = {"step": step, "score": score, "metric": "pass@1" if "pass@1" in m else "greedy_accuracy",
                         "metrics": {k: m[k] for k in keys}}
            save_best(self.out_dir, model, self.best)
            out["eval_best"] = True
        self.log(f"held-out eval at step {step}: " + "  ".join(f"{k} {m[k]:.3f}" for k in keys)
                 + f"  (best: step {self.best['step']}, {self.best['score']:.3f})")
        return out


def save_best(out_dir: Path, model, info: dict) -> Path:
    """Atomically writes the trained tensors and `info` to out_dir/best_checkpoint.pt (+ .json)."""
    import torch

    from .checkpoint import trainable_state, write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BEST_CHECKPOINT
    for target, write in ((path, lambda fh: torch.save({"model": trainable_state(model), **info}, fh)),
                          (out_dir / "best_checkpoint.json", lambda fh: fh.write(json.dumps(info, indent=2).encode()))):
        write_atomic(target, write)
    return path


def load_best(out_dir: Path, model) -> dict:
    """Loads the best weights kept by --eval-every into `model`; returns their step and metrics."""
    import torch

    payload = torch.load(Path(out_dir) / BEST_CHECKPOINT, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["model"].items():
            params[name].copy_(value)
    return {k: v for k, v in payload.items() if k != "model"}
