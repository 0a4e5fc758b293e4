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

--probe-every K is the label-free counterpart (rlsc.guard.Probe): a fixed PROBE set, the first
--probe-questions questions of --probe-split (their answers are never read), is sampled --probe-k
times at the training temperature before the first step; each question's majority answer then
(math-verify equivalence, as maj@k) becomes its pseudo-label. Every K steps the probe set is
sampled again, from its own seeded stream (the same draws each time; the training stream is
restored, so the training run is unchanged), and the step's metrics row gets
    probe_majority   share of the probe samples whose answer equals their question's pseudo-label
                     (a label-free pass@1 against the model's own starting consensus)
    probe_agreement  share of a question's samples in its current majority, averaged
    probe_surprisal  mean -log p per token of the probe samples (a sample estimate of token entropy)
    probe_tokens     mean probe completion length
Per-step diagnostics judge one training question's 16 samples, a different question each step;
the probe judges the same questions every time, so its changes are changes of the model. Rules
on probe metrics (x: times the value before the first step) are checked after each probe, and a
stop keeps the weights the probe judged (the step's update applied). The best weights by
probe_majority (ties: the earlier; the starting weights included) are kept in
output_dir/probe_best_checkpoint.pt (+ .json); output_dir/probe.json holds the pseudo-labels and
the start, so a resumed run keeps them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

#: the diagnostics a rule may name (written by rlsc/objectives.py into every metrics row)
GUARD_METRICS = ("token_entropy", "self_certainty", "agreement", "completion_tokens", "weight_underflow")
#: the probe's metrics (Probe, every --probe-every steps)
PROBE_METRICS = ("probe_majority", "probe_agreement", "probe_surprisal", "probe_tokens")
BEST_CHECKPOINT = "best_checkpoint.pt"
PROBE_BEST_CHECKPOINT = "probe_best_checkpoint.pt"
PROBE_STATE = "probe.json"
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
        if metric not in GUARD_METRICS + PROBE_METRICS:
            raise ValueError(f"--stop-when: unknown metric {metric!r}; known: {', '.join(GUARD_METRICS + PROBE_METRICS)}")
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(f"--stop-when: threshold of {part.strip()!r} must be finite")
        rules.append(Rule(metric, op, value, rel == "x"))
    return rules


class Guard:
    """The stop rule's state: first values and how many checks in a row each rule has held.

    A check sees the metrics of one measurement: a step's diagnostics, or a probe's metrics (then
    the first value is the probe before the first step). A rule whose metric a check does not
    carry keeps its streak, so per-step and probe rules count their own measurements."""

    def __init__(self, rules: list[Rule], patience: int = 1, history: list[dict] | None = None):
        if patience < 1:
            raise ValueError(f"--stop-patience expects an integer >= 1, got {patience}")
        self.rules = rules
        self.patience = patience
        self.first: dict[str, float] = {}
        self.streak = {str(r): 0 for r in rules}
        for row in history or []:  # a resumed run: replay the logged diagnostics
            self.check_logged(row)

    def check_logged(self, row: dict) -> None:
        """Replays one metrics.jsonl row: its step's diagnostics and, if it has them, its probe's
        (the rules of one never see the other's metrics, so one check equals the two made live)."""
        if not row.get("guard_stop"):
            measured = {m: row[m] for m in GUARD_METRICS + PROBE_METRICS if m in row}
            if measured:
                self.check(measured)

    def set_start(self, metrics: dict) -> None:
        """The probe before the first step: the baselines of relative probe rules; no rule is checked."""
        for m in PROBE_METRICS:
            if metrics.get(m) is not None:
                self.first.setdefault(m, float(metrics[m]))

    def threshold(self, rule: Rule) -> float | None:
        if not rule.relative:
            return rule.threshold
        base = self.first.get(rule.metric)
        return None if base is None else rule.threshold * base

    def check(self, diag: dict) -> str | None:
        """Records one step's diagnostics; returns why to stop (a sentence), or None to go on.
        The first step sets the baselines of relative rules and never stops on them."""
        new = {m for m in GUARD_METRICS + PROBE_METRICS if m not in self.first and diag.get(m) is not None}
        for m in new:
            self.first[m] = float(diag[m])
        fired = []
        for rule in self.rules:
            if rule.metric not in diag:
                continue  # not measured by this check
            limit = None if rule.relative and rule.metric in new else self.threshold(rule)
            value = diag.get(rule.metric)
            holds = (limit is not None and value is not None and math.isfinite(value)
                     and (value < limit if rule.op == "<" else value > limit))
            key = str(rule)
            self.streak[key] = self.streak[key] + 1 if holds else 0
            if self.streak[key] >= self.patience:
                fired.append(f"{rule.metric} = {value:.4g} {rule.op} {limit:.4g} ({key}) for {self.streak[key]} step(s)")
        return "; ".join(fired) if fired else None


def guard_from_config(cfg, history: list[dict], probe_start: dict | None = None) -> Guard | None:
    """The run's Guard (None without --stop-when), with the probe's start and a resumed run's rows replayed."""
    rules = parse_rules(cfg.stop_when)
    if not rules:
        return None
    guard = Guard(rules, cfg.stop_patience)
    guard.set_start(probe_start or {})
    for row in history:  # a resumed run: replay the logged diagnostics and probes
        guard.check_logged(row)
    return guard


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


def save_best(out_dir: Path, model, info: dict, name: str = BEST_CHECKPOINT) -> Path:
    """Atomically writes the trained tensors and `info` to out_dir/name (+ the same name .json)."""
    import torch

    from .checkpoint import trainable_state, write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    for target, write in ((path, lambda fh: torch.save({"model": trainable_state(model), **info}, fh)),
                          (path.with_suffix(".json"), lambda fh: fh.write(json.dumps(info, indent=2).encode()))):
        write_atomic(target, write)
    return path


def load_best(out_dir: Path, model, name: str = BEST_CHECKPOINT) -> dict:
    """Loads the best weights kept by --eval-every (name: PROBE_BEST_CHECKPOINT, by --probe-every)
    into `model`; returns their step and metrics."""
    import torch

    payload = torch.load(Path(out_dir) / name, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["model"].items():
            params[name].copy_(value)
    return {k: v for k, v in payload.items() if k != "model"}


def _majority(keys: list[str | None]) -> tuple[str | None, int]:
    """(the most frequent answer key, its count); unparsed answers do not vote; ties: seen first."""
    votes: dict[str, int] = {}
    for k in keys:
        if k is not None:
            votes[k] = votes.get(k, 0) + 1
    if not votes:
        return None, 0
    top = max(votes.values())
    return next(k for k in keys if k is not None and votes[k] == top), top


def pseudo_label(texts: list[str], finished: list[bool]) -> dict | None:
    """One probe question's pseudo-label from its starting samples: the majority answer, stored as
    the first sample giving it ({"text", "finished"}: re-parsed on resume); None when none parsed."""
    from .grading import answer_keys, extract_answer

    keys = answer_keys([extract_answer(t, f) for t, f in zip(texts, finished)])
    winner, _ = _majority(keys)
    if winner is None:
        return None
    i = keys.index(winner)
    return {"text": texts[i], "finished": finished[i]}


def probe_metrics(labels: list[dict | None], texts: list[list[str]], finished: list[list[bool]],
                  sampled_logp: list[float], n_tokens: list[int]) -> dict:
    """The probe's metrics (module docstring) from each question's samples (texts[q], finished[q]),
    its pseudo-label (labels[q]) and every sample's log p and length. probe_majority is None when
    no question has a pseudo-label."""
    from .grading import answer_keys, extract_answer

    majority, agreement = [], []
    for label, q_texts, q_finished in zip(labels, texts, finished):
        parsed = [extract_answer(t, f) for t, f in zip(q_texts, q_finished)]
        agreement.append(_majority(answer_keys(parsed))[1] / max(len(parsed), 1))
        if label is not None:  # the label first: answers equal to it share its key
            keys = answer_keys([extract_answer(label["text"], label["finished"])] + parsed)
            majority.append(sum(k == keys[0] for k in keys[1:]) / max(len(parsed), 1))
    total = sum(n_tokens)
    return {"probe_majority": sum(majority) / len(majority) if majority else None,
            "probe_agreement": sum(agreement) / max(len(agreement), 1),
            "probe_surprisal": -sum(sampled_logp) / max(total, 1),
            "probe_tokens": total / max(len(n_tokens), 1)}


class Probe:
    """--probe-every: label-free probe metrics on a fixed question set, keeping the best weights
    by probe_majority (module docstring)."""

    def __init__(self, cfg, out_dir: Path, log=print, resumed: bool = False):
        from .data import default_template, load_problems

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.problems = load_problems(cfg.prompts, split=cfg.probe_split, limit=cfg.probe_questions)
        self.template = cfg.prompt_template or default_template(cfg.prompts)
        self.log = log
        self.state: dict = {}  # questions, labels, start, best
        path = self.out_dir / PROBE_STATE
        if resumed:
            if not path.is_file():
                raise FileNotFoundError(f"--probe-every: resuming needs the probe's pseudo-labels in {path}; "
                                        "it is missing (was the run started without --probe-every?)")
            self.state = json.loads(path.read_text())
            ids = [p.id for p in self.problems]
            if self.state["questions"] != ids:
                raise ValueError(f"--probe-every: {path} holds pseudo-labels of other questions than "
                                 f"--probe-split {cfg.probe_split!r} / --probe-questions {cfg.probe_questions}")

    @property
    def start(self) -> dict | None:
        return self.state.get("start")

    def _sample(self, model, tokenizer, autocast_dtype):
        """Each probe question's texts and finished flags, and every sample's log p and length."""
        import torch

        from .checkpoint import rng_state, set_rng_state
        from .sampling import decode_completions, sample

        state = rng_state()
        was_training = model.training
        texts, finished, logp, n_tokens = [], [], [], []
        try:
            torch.manual_seed(self.cfg.seed + 2)  # the same stream at every probe, apart from --eval-every's
            for p in self.problems:
                r = sample(model, tokenizer, [p], template=self.template, num_samples=self.cfg.probe_k,
                           max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                           autocast_dtype=autocast_dtype, sampler=self.cfg.sampler)
                texts.append(decode_completions(tokenizer, r))
                finished.append((~r.capped).tolist())
                logp += r.sampled_logp.double().tolist()
                n_tokens += r.completion_lengths.tolist()
        finally:
            set_rng_state(state)
            model.train(was_training)
        return texts, finished, logp, n_tokens

    def evaluate(self, model, tokenizer, step: int, autocast_dtype=None) -> dict:
        """Samples the probe set; at step 0 fixes the pseudo-labels. Keeps the weights when their
        probe_majority is the best so far; returns the probe_* metrics for the row."""
        texts, finished, logp, n_tokens = self._sample(model, tokenizer, autocast_dtype)
        if step == 0:  # a fresh run: a best kept by an earlier run in this directory is not this run's
            for stale in (PROBE_BEST_CHECKPOINT, Path(PROBE_BEST_CHECKPOINT).with_suffix(".json").name):
                (self.out_dir / stale).unlink(missing_ok=True)
            labels = [pseudo_label(t, f) for t, f in zip(texts, finished)]
            self.state = {"questions": [p.id for p in self.problems], "labels": labels, "best": None}
        m = probe_metrics(self.state["labels"], texts, finished, logp, n_tokens)
        if step == 0:
            self.state["start"] = m
            if m["probe_majority"] is None:
                self.log("probe: no probe question has a parsed answer before the first step; probe_majority "
                         "cannot be measured (no pseudo-labels)")
        out = dict(m)
        best = self.state.get("best")
        if m["probe_majority"] is not None and (best is None or m["probe_majority"] > best["score"]):
            self.state["best"] = {"step": step, "score": m["probe_majority"], "metric": "probe_majority",
                                  "metrics": m}
            save_best(self.out_dir, model, self.state["best"], PROBE_BEST_CHECKPOINT)
            out["probe_best"] = True
        self._write_state()
        best = self.state["best"]
        self.log(f"probe at step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if v is not None)
                 + (f"  (best: step {best['step']}, {best['score']:.3f})" if best else ""))
        return out

    def _write_state(self) -> None:
        from .checkpoint import write_atomic

        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out_dir / PROBE_STATE, lambda fh: fh.write(json.dumps(self.state, indent=2).encode()))
