"""The label-free probe of the collapse guard (--probe-every, rlsc.guard.Probe): pseudo-labels and
probe metrics on known texts, probe rules beside per-step rules, the probe in the training loop
(does not change the run, stops after the probe with the weights it judged, keeps the best weights,
a resumed run keeps the pseudo-labels and the rule's streak)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rlsc.checkpoint as ckpt
from rlsc.config import RLSCConfig
from rlsc.guard import (PROBE_BEST_CHECKPOINT, PROBE_METRICS, PROBE_STATE, Guard, guard_from_config, load_best,
                        parse_rules, probe_metrics, pseudo_label)
from rlsc.train import train

from conftest import train_killed_at_step
from test_train import TIMING_FIELDS, tiny_config


def test_pseudo_label_is_the_majority_answer_by_math_verify_equivalence():
    texts = ["so \\boxed{7}", "\\boxed{12}", "it is 12.0, so \\boxed{12.0}", "\\boxed{7}", "\\boxed{12}"]
    label = pseudo_label(texts, [True] * 5)
    assert label == {"text": "\\boxed{12}", "finished": True}  # 12, 12.0, 12 outvote 7, 7
    # ties go to the answer seen first; a cut-off completion without a box has no answer
    assert pseudo_label(["\\boxed{3}", "\\boxed{4}", "4"], [True, True, False])["text"] == "\\boxed{3}"
    assert pseudo_label(["no answer here", "none"], [False, False]) is None


def test_probe_metrics_count_agreement_with_the_starting_majority_not_the_current_one():
    labels = [{"text": "\\boxed{12}", "finished": True}, None]
    texts = [["\\boxed{12.0}", "\\boxed{5}", "\\boxed{5}", "\\boxed{12}"],   # 2 of 4 give the pseudo-label
             ["\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "cut off"]]         # no pseudo-label: not in probe_majority
    finished = [[True] * 4, [True, True, True, False]]
    m = probe_metrics(labels, texts, finished, sampled_logp=[-1.0, -2.0, -3.0, -4.0] * 2, n_tokens=[2, 3, 4, 1] * 2)
    assert m["probe_majority"] == 0.5
    assert m["probe_agreement"] == (2 / 4 + 2 / 4) / 2        # current majorities: 5 (2 of 4), 1 (2 of 4)
    assert m["probe_surprisal"] == pytest.approx(20.0 / 20)  # -sum log p / tokens
    assert m["probe_tokens"] == 20 / 8
    assert probe_metrics([None], [["x"]], [[True]], [-1.0], [1])["probe_majority"] is None


def test_probe_rules_are_relative_to_the_start_and_keep_their_streak_across_step_checks():
    g = Guard(parse_rules("probe_majority<0.9x,token_entropy<0.5x"), patience=2)
    g.set_start({"probe_majority": 0.8, "probe_agreement": 0.5})
    step = {"token_entropy": 0.4, "self_certainty": 1.0, "agreement": 0.3, "completion_tokens": 30.0,
            "weight_underflow": 0.2}
    assert g.check(step) is None                       # a step's check: the probe rule's streak stays 0
    assert g.check({"probe_majority": 0.7}) is None    # 0.7 < 0.72: streak 1
    assert g.check(step) is None                       # a step between two probes does not reset it
    reason = g.check({"probe_majority": 0.71})
    assert reason is not None and "probe_majority" in reason and "0.72" in reason
    # the start itself never counts toward a rule, even an absolute one it satisfies
    g = Guard(parse_rules("probe_tokens>0"))
    g.set_start({"probe_tokens": 5.0})
    assert g.streak == {"probe_tokens>0": 0}


def test_probe_flags_are_validated():
    with pytest.raises(ValueError, match="--stop-when rule\\(s\\) probe_majority<0.9x need --probe-every > 0"):
        RLSCConfig(stop_when="probe_majority<0.9x").validate("train")
    with pytest.raises(ValueError, match="--probe-k expects an integer >= 2"):
        RLSCConfig(probe_every=1, probe_k=1).validate("train")
    with pytest.raises(ValueError, match="--probe-questions"):
        RLSCConfig(probe_every=1, probe_questions=0).validate("train")
    with pytest.raises(ValueError, match="--probe-every expects an integer >= 0"):
        RLSCConfig(probe_every=-1).validate("train")
    with pytest.raises(ValueError, match="engine thin"):
        RLSCConfig(probe_every=1, engine="trl").validate("train")
    RLSCConfig(probe_every=2, stop_when="probe_majority<0.9x,agreement>0.95").validate("train")


def _training_rows(path):
    drop = set(TIMING_FIELDS) | set(PROBE_METRICS) | {"probe_best", "peak_memory_mb"}
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in open(path) if x.strip()]


def _probe_config(model_dir, prompts, out, **kw):
    return tiny_config(model_dir, prompts, out, probe_every=1, probe_split="train", probe_questions=3, probe_k=3, **kw)


def test_probe_does_not_change_the_training_run_and_keeps_its_best_weights(tiny_model_dir, tiny_prompts, tmp_path):
    plain = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "plain", steps=3)
    train(plain, log=lambda m: None)
    summary = train(_probe_config(tiny_model_dir, tiny_prompts, tmp_path / "probe", steps=3), log=lambda m: None)
    assert _training_rows(tmp_path / "plain" / "metrics.jsonl") == _training_rows(tmp_path / "probe" / "metrics.jsonl")
    a, b = ckpt.load_checkpoint(tmp_path / "plain"), ckpt.load_checkpoint(tmp_path / "probe")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), "the probe changed the training run"
    rows = [json.loads(x) for x in open(tmp_path / "probe" / "metrics.jsonl")]
    assert all(set(PROBE_METRICS) <= set(r) for r in rows)
    state = json.loads((tmp_path / "probe" / PROBE_STATE).read_text())
    assert len(state["labels"]) == len(state["questions"]) == 3 and set(state["start"]) == set(PROBE_METRICS)
    if state["best"] is not None:  # the tiny random model may give no parsed answer at all
        scores = [(0, state["start"]["probe_majority"])] + [(r["step"], r["probe_majority"]) for r in rows]
        top = max(s for _, s in scores if s is not None)
        assert state["best"]["step"] == next(st for st, s in scores if s == top) == summary["probe_best"]["step"]
        from rlsc.models import load_model
        model = load_model(str(tiny_model_dir), device=torch.device("cpu"), precision="fp32")
        assert load_best(tmp_path / "probe", model, PROBE_BEST_CHECKPOINT)["step"] == state["best"]["step"]


def test_probe_rule_stops_after_the_probe_with_the_weights_it_judged(tiny_model_dir, tiny_prompts, tmp_path):
    # probe_tokens > 0 always holds: with patience 2 the run stops after the probe of step 2
    cfg = _probe_config(tiny_model_dir, tiny_prompts, tmp_path / "g", steps=4, stop_when="probe_tokens>0",
                        stop_patience=2, checkpoint_every=0)
    train(cfg, log=lambda m: None)
    rows = [json.loads(x) for x in open(tmp_path / "g" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and "probe_tokens" in rows[1]["guard_stop"]
    two = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "two", steps=2, checkpoint_every=0)
    train(two, log=lambda m: None)
    stopped, after_two = ckpt.load_checkpoint(tmp_path / "g"), ckpt.load_checkpoint(tmp_path / "two")
    assert stopped["step"] == 2
    for name, value in after_two["model"].items():  # the probe judged the weights after step 2's update
        assert torch.equal(stopped["model"][name], value), name


def test_resumed_run_keeps_the_pseudo_labels_and_the_rules_streak(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch):
    kw = dict(steps=4, stop_when="probe_tokens>0", stop_patience=2, checkpoint_every=1)
    train(_probe_config(tiny_model_dir, tiny_prompts, tmp_path / "full", **kw), log=lambda m: None)

    cut = _probe_config(tiny_model_dir, tiny_prompts, tmp_path / "cut", **kw)
    train_killed_at_step(cut, 2, monkeypatch)
    assert ckpt.load_checkpoint(tmp_path / "cut")["step"] == 1
    train(cut.updated({"resume": "yes"}), log=lambda m: None)
    # the streak of step 1's probe survived: the resumed run stops after step 2's probe, as the full one
    full_rows = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in full_rows] == [1, 2] and "guard_stop" in full_rows[1]
    drop = set(TIMING_FIELDS) | {"peak_memory_mb"}
    assert ([{k: v for k, v in r.items() if k not in drop} for r in full_rows]
            == [{k: v for k, v in json.loads(x).items() if k not in drop} for x in open(tmp_path / "cut" / "metrics.jsonl")])
    full_state, cut_state = (json.loads((tmp_path / d / PROBE_STATE).read_text()) for d in ("full", "cut"))
    assert full_state == cut_state


def test_resuming_with_a_probe_needs_its_pseudo_labels(tiny_model_dir, tiny_prompts, tmp_path):
    train(tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "r", steps=1), log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="--probe-every: resuming needs the probe's pseudo-labels"):
        train(_probe_config(tiny_model_dir, tiny_prompts, tmp_path / "r", steps=2, resume="yes"), log=lambda m: None)


def test_guard_from_config_replays_a_resumed_runs_probes_after_its_start():
    cfg = RLSCConfig(probe_every=1, stop_when="probe_majority<0.9x", stop_patience=2)
    history = [{"step": 1, "token_entropy": 0.4, "probe_majority": 0.5}]
    g = guard_from_config(cfg, history, probe_start={"probe_majority": 0.8})
    assert g.first["probe_majority"] == 0.8 and g.streak == {"probe_majority<0.9x": 1}


RECORDED = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "results").glob("guard-probe-seed*.json"))


@pytest.mark.skipif(not RECORDED, reason="the probe guard's runs are not recorded yet")
@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_recorded_probe_guard_runs_stopped_where_their_rule_says_and_kept_the_best_probe(path):
    """benchmarks/guard_probe.py on the demo (seed 1 collapses, seed 0 improves): the run stopped
    where its rule, replayed on the probes of the whole run, says, and kept the weights with the
    best probe_majority up to the stop (ties: the earlier; the start included)."""
    rec = json.loads(path.read_text())
    rows, start = rec["steps"], rec["probe_start"]
    g = Guard(parse_rules(rec["rule"]))
    g.set_start(start)
    stop = next((r["step"] for r in rows if g.check({k: r[k] for k in PROBE_METRICS}) is not None), None)
    assert stop == rec["guard_stop_step"] == rec["replayed_stop_step"]
    seen = [(0, start["probe_majority"])] + [(r["step"], r["probe_majority"]) for r in rows
                                             if stop is None or r["step"] <= stop]
    top = max(s for _, s in seen)
    assert rec["guarded_kept_step"] == next(st for st, s in seen if s == top)
    assert rec["evals"]["guarded_kept"]["after_updates"] == rec["guarded_kept_step"]
    assert rec["evals"]["initial"]["after_updates"] == 0 and rec["evals"]["unguarded_end"]["after_updates"] == 10
