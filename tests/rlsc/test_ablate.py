"""`rlsc ablate` on a tiny random Llama: cells written atomically, a rerun resumes, the report's fields."""
from __future__ import annotations

import itertools
import json
import math
import os

import pytest

from rlsc import cli
from rlsc.ablate import METHODS, ROW_FIELDS, build_report, cell_path, permutation_p, run_ablation

TINY = {"max_new_tokens": 6, "k": 4, "num_samples": 3, "steps": 1, "micro_batch_size": 3, "lr": 1e-3,
        "filter_eps": "exact"}
QUIET = dict(log=lambda m: None)


def test_every_trainer_weighting_and_baseline_is_a_method():
    from rlsc.config import TRAINER_WEIGHTINGS

    assert set(TRAINER_WEIGHTINGS) <= set(METHODS)
    assert {"greedy", "T0.1", "T0.2", "T0.3", "base", "rlsc-alpha0.5", "rlsc-steps20"} <= set(METHODS)
    assert METHODS["rlsc-alpha0.5"][1]["alpha"] == 0.5 and METHODS["rlsc-steps20"][1]["steps"] == 20


def test_cells_written_rerun_resumes_and_report_has_fields(tiny_model_dir, tiny_prompts, tmp_path):
    out = tmp_path / "ablate"
    task = str(tiny_prompts)
    kw = dict(tasks=[task], methods=["greedy", "rlsc"], seeds=[0], out_dir=out, model=str(tiny_model_dir),
              overrides=TINY, max_questions=3, **QUIET)
    first = run_ablation(**kw)
    assert sorted(first["ran"]) == [(task, "greedy", 0), (task, "rlsc", 0)] and first["skipped"] == []
    paths = [cell_path(out, task, m, 0) for m in ("greedy", "rlsc")]
    cells = [json.loads(p.read_text()) for p in paths]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.pt"))  # atomic writes, no checkpoints kept
    rlsc_cell = cells[1]
    assert rlsc_cell["trains"] and rlsc_cell["settings"]["steps"] == 1 and rlsc_cell["train"]["loss"] is not None
    m = rlsc_cell["metrics"]
    assert m["questions"] == 3 and {"pass@1", "pass@2", "pass@4", "maj@4", "greedy_accuracy"} <= set(m)
    assert 0 <= m["pass@1"] <= m["pass@2"] <= m["pass@4"] <= 1
    assert m["token_entropy"] is None or (math.isfinite(m["token_entropy"]) and m["token_entropy"] >= 0)
    greedy = cells[0]["metrics"]
    assert greedy["pass@1"] == greedy["pass@4"] == greedy["maj@4"] == greedy["greedy_accuracy"]

    mtimes = [p.stat().st_mtime_ns for p in paths]
    second = run_ablation(**kw)
    assert second["ran"] == [] and len(second["skipped"]) == 2
    assert [p.stat().st_mtime_ns for p in paths] == mtimes

    paths[1].unlink()  # a cell lost (or never finished): only it is run again
    third = run_ablation(**kw)
    assert third["ran"] == [(task, "rlsc", 0)] and third["skipped"] == [(task, "greedy", 0)]

    report = build_report(out, tmp_path / "results" / "ablate-tiny")
    assert {r["method"] for r in report["rows"]} == {"greedy", "rlsc"}
    for row in report["rows"]:
        assert set(ROW_FIELDS) <= set(row)
        assert {"pass@2", "pass@4", "pass@1_sd"} <= set(row) and row["seeds"] == [0]
    assert report["commits"] and report["machines"] and report["wall_seconds"] > 0
    md = (tmp_path / "results" / "ablate-tiny.md").read_text()
    assert "| rlsc |" in md and "maj@k" in md and "token_entropy" in md
    assert (tmp_path / "results" / "ablate-tiny.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results" / "ablate-tiny.json").read_text())["cells"] == 2


def test_cli_ablate_rejects_bad_arguments_before_loading(tmp_path, capsys):
    assert cli.main(["ablate", "--methods", "rlsc,nope", "--output-dir", str(tmp_path)]) == 2
    assert "--methods" in capsys.readouterr().err
    assert cli.main(["ablate", "--seeds", "a", "--output-dir", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert cli.main(["ablate", "--report", "--output-dir", str(tmp_path / "none")]) == 2
    assert "no finished cells" in capsys.readouterr().err
    assert cli.main(["ablate", "--set", "alpha=-1", "--output-dir", str(tmp_path)]) == 2
    assert "--alpha" in capsys.readouterr().err


def test_plan_runs_main_rows_on_every_seed_and_the_rest_on_the_first():
    from rlsc.ablate import MAIN_METHODS, plan

    cells = plan(["t"], ["greedy", "base", "rlsc", "T0.2", "rlsc-steps20"], [3, 5])
    assert cells == [("t", "greedy", 3), ("t", "base", 3), ("t", "base", 5), ("t", "rlsc", 3), ("t", "rlsc", 5),
                     ("t", "T0.2", 3), ("t", "rlsc-steps20", 3)]
    assert len(plan(["t"], ["greedy", "T0.2"], [3, 5], all_seeds=True)) == 4
    assert "greedy" not in MAIN_METHODS and {"base", "rlsc", "length", "group"} <= set(MAIN_METHODS)
    assert len(plan(["a", "b"], list(METHODS), [0, 1])) == 2 * (len(METHODS) + len(MAIN_METHODS))


def _row(method, p1, p16, sd=None):
    return {"task": "t", "method": method, "k": 16, "pass@1": p1, "pass@16": p16, "pass@1_sd": sd}


def test_verdict_names_rows_that_beat_rlsc_on_pass1_without_losing_pass16():
    from rlsc.ablate import format_report, verdict

    rows = [_row("rlsc", 0.50, 0.80, 0.02), _row("length", 0.55, 0.80, 0.05), _row("entropy", 0.60, 0.79),
            _row("T0.2", 0.45, 0.90), _row("greedy", None, None)]
    v = verdict(rows)
    assert [b["method"] for b in v["beats_reference"]] == ["length"]
    b = v["beats_reference"][0]
    assert abs(b["d_pass@1"] - 0.05) < 1e-12 and b["d_pass@16"] == 0 and b["pass@1_noise"] == 0.05
    assert verdict(rows[1:]) is None  # no rlsc row: nothing to compare with
    assert verdict([_row("rlsc", 0.5, 0.8), _row("group", 0.4, 0.9)])["beats_reference"] == []
    for r in rows:
        r.update(seeds=[0], settings={"temperature": 0.5, "steps": 0 if r["method"].startswith("T") else 10})
    v = verdict(rows)
    assert [(b["method"], b["trained"]) for b in v["beats_reference"]] == [("length", True)]
    rows.append(_row("base", 0.52, 0.95) | {"seeds": [0], "settings": {"temperature": 0.5, "steps": 0}})
    v = verdict(rows)
    md = format_report({"rows": rows, "verdicts": {"t": v}, "cells": 6, "commits": ["c"], "machines": ["m"],
                        "cell_seconds": 1.0, "wall_seconds": 1.0})
    assert "Trained variants with a higher mean pass@1 than rlsc and a mean pass@16 no lower: length (pass@1 +0.050" in md
    assert "Untrained baselines with a higher mean pass@1 than rlsc and a mean pass@16 no lower: base (pass@1 +0.020" in md
    md = format_report({"rows": rows[:1], "verdicts": {"t": verdict(rows[:1])}, "cells": 1, "commits": ["c"],
                        "machines": ["m"], "cell_seconds": 1.0, "wall_seconds": 1.0})
    assert "Trained variants with a higher mean pass@1 than rlsc and a mean pass@16 no lower: none." in md


def test_jobs_run_tasks_in_worker_processes_and_resume(tiny_model_dir, tiny_prompts, tmp_path, capsys):
    import shutil

    second = tmp_path / "second.jsonl"
    shutil.copy(tiny_prompts, second)
    out = tmp_path / "ablate"
    argv = ["ablate", "--tasks", f"{tiny_prompts},{second}", "--methods", "greedy,base", "--seeds", "0,1",
            "--jobs", "2", "--output-dir", str(out), "--results", str(tmp_path / "res" / "a"),
            "--model", str(tiny_model_dir), "--max-questions", "2",
            *[x for key, value in TINY.items() for x in ("--set", f"{key}={value}")]]
    assert cli.main(argv) == 0
    written = sorted(p.relative_to(out / "cells").as_posix() for p in (out / "cells").rglob("*.json"))
    # two tasks; base (a main row) on both seeds, greedy on the first only
    assert len(written) == 6 and sum("/greedy/" in w for w in written) == 2
    runs = [json.loads(line) for line in open(out / "runs.jsonl")]
    threads = max(1, (os.cpu_count() or 1) // 2)  # cores split between the two workers
    assert len(runs) == 2 and all(r["cells_run"] == 3 and f", {threads} threads" in r["machine"] for r in runs)
    report = json.loads((tmp_path / "res" / "a.json").read_text())
    assert report["cells"] == 6 and {r["method"] for r in report["rows"]} == {"greedy", "base"}
    assert cli.main(argv) == 0  # everything finished: the workers skip every cell
    assert [json.loads(line)["cells_run"] for line in open(out / "runs.jsonl")][2:] == [0, 0]


def test_cli_ablate_rejects_bad_jobs_and_threads(tmp_path, capsys):
    assert cli.main(["ablate", "--jobs", "0", "--output-dir", str(tmp_path)]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert cli.main(["ablate", "--threads", "-1", "--output-dir", str(tmp_path)]) == 2
    assert "--threads" in capsys.readouterr().err


def test_rlsc_at_alpha_zero_is_rlsc_l1():
    """The ablation reports the alpha-0 row as rlsc-l1: same loss, weights and gradients."""
    import torch

    import rlsc_kernels as rk

    torch.manual_seed(0)
    h = (0.1 * torch.randn(37, 24)).requires_grad_()
    w = (0.1 * torch.randn(8, 24)).requires_grad_()
    t = torch.randint(0, 8, (37,))
    seq = torch.arange(37) * 15 // 37  # 15 sequences of 2-3 tokens: p_old well above 0
    outs = []
    for weighting, alpha in (("rlsc", 0.0), ("rlsc-l1", 0.1)):
        out = rk.linear_rlsc_loss(h, w, t, seq_index=seq, num_sequences=15, temperature=0.7, alpha=alpha,
                                  weighting=weighting)
        out.loss.backward()
        outs.append((out.loss.detach(), out.seq_weight.detach(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    assert float(outs[0][1].min()) > 1e-3  # weights far from 0: the comparison has teeth
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    with_alpha = rk.linear_rlsc_loss(h, w, t, seq_index=seq, num_sequences=15, temperature=0.7, alpha=0.1)
    assert not torch.allclose(with_alpha.seq_weight, outs[0][1])


def test_label_free_preset_plans_every_objective_and_baseline_on_five_seeds():
    from rlsc.ablate import PRESETS, plan
    from rlsc.config import OBJECTIVES

    preset = PRESETS["label-free"]
    assert preset["set"] == {"precision": "fp32"} and preset["output_dir"].startswith("benchmarks/results/")
    assert set(OBJECTIVES) <= set(preset["methods"]) and {"greedy", "T0.2", "base"} <= set(preset["methods"])
    assert all(METHODS[o][1] == {"objective": o} for o in OBJECTIVES if o != "rlsc")
    cells = plan(["t"], preset["methods"], list(preset["seeds"]), main=preset["main"])
    assert [c for c in cells if c[1] == "greedy"] == [("t", "greedy", 0)]  # no seed changes greedy decoding
    assert all(sum(c[1] == m for c in cells) == 5 for m in preset["methods"] if m != "greedy")


def test_report_counts_collapsed_seeds_against_the_untrained_row(tmp_path):
    from rlsc.ablate import write_json_atomic

    def cell(method, seed, p1, trains):
        return {"task": "t", "method": method, "seed": seed, "trains": trains,
                "settings": {"temperature": 0.5, "k": 2, "steps": 10 if trains else 0},
                "metrics": {"pass@1": p1, "pass@2": p1, "maj@2": p1, "greedy_accuracy": p1},
                "train_seconds": 1.0, "eval_seconds": 1.0, "commit": "x", "machine": "m"}
    for seed, (base, rlsc) in enumerate([(0.4, 0.5), (0.4, 0.01), (0.4, 0.19)]):
        write_json_atomic(cell_path(tmp_path, "t", "base", seed), cell("base", seed, base, False))
        write_json_atomic(cell_path(tmp_path, "t", "rlsc", seed), cell("rlsc", seed, rlsc, True))
    report = build_report(tmp_path, tmp_path / "r")
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["rlsc"]["collapsed"] == 2 and rows["base"]["collapsed"] is None  # 0.01, 0.19 < 0.5 * 0.4
    assert rows["rlsc"]["per_seed_pass@1"] == [0.5, 0.01, 0.19] and rows["base"]["p_vs_base"] is None
    # of the 20 ways to split the six values 3 + 3, a difference in means of at least |0.2333 - 0.4| needs
    # a group summing to >= 1.2 or <= 0.7: the three 0.4s (1 way), two 0.4s with 0.5 (3), one 0.4 with
    # 0.01 and 0.19 (3), and 0.5, 0.01, 0.19 (1)
    assert rows["rlsc"]["p_vs_base"] == 8 / 20
    md = (tmp_path / "r.md").read_text()
    assert "| 2 |" in md and "| rlsc | 0.50 / 0.01 / 0.19 |" in md


def test_permutation_p_counts_the_splits_at_least_as_extreme():
    # 1, 2, 3 against 4, 5, 6: of the C(6, 3) = 20 splits only the observed one and its mirror
    # reach a difference in means of 3
    assert permutation_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == 2 / 20
    assert permutation_p([0.3, 0.3], [0.3, 0.3]) == 1.0
    # 5 seeds against 5: the smallest p-value possible, 2 of C(10, 5) = 252
    assert permutation_p([0.9] * 5, [0.1, 0.2, 0.3, 0.2, 0.1]) == 2 / 252
    xs, ys = [0.05, 0.47, 0.21, 0.61, 0.49], [0.29, 0.24, 0.24, 0.28, 0.26]
    brute = [abs(sum(a) / 5 - (sum(xs + ys) - sum(a)) / 5) for a in itertools.combinations(xs + ys, 5)]
    observed = abs(sum(xs) / 5 - sum(ys) / 5)
    assert permutation_p(xs, ys) == sum(d >= observed - 1e-12 for d in brute) / len(brute)
    assert permutation_p([0.5], [0.1, 0.2]) is None and permutation_p([0.5] * 11, [0.1] * 10) is None


def test_lora_cells_run_one_after_another(tiny_model_dir, tiny_prompts, tmp_path):
    """`--set lora_rank=N`: the first cell leaves a PeftModel behind; the next cell starts from the
    base model's initial weights again (it crashed on the weights' key names)."""
    pytest.importorskip("peft")
    out = tmp_path / "ablate"
    task = str(tiny_prompts)
    res = run_ablation(tasks=[task], methods=["rlsc", "rlsc-l1"], seeds=[0], out_dir=out, model=str(tiny_model_dir),
                       overrides=dict(TINY, lora_rank=2), max_questions=2, **QUIET)
    assert sorted(m for _, m, _ in res["ran"]) == ["rlsc", "rlsc-l1"]
    cells = [json.loads(cell_path(out, task, m, 0).read_text()) for m in ("rlsc", "rlsc-l1")]
    assert all(c["train"]["loss"] is not None for c in cells)
