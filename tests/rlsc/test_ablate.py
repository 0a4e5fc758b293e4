"""`rlsc ablate` on a tiny random Llama: cells written atomically, a rerun resumes, the report's fields."""
from __future__ import annotations

import json
import math

from rlsc import cli
from rlsc.ablate import METHODS, ROW_FIELDS, build_report, cell_path, run_ablation

TINY = {"max_new_tokens": 6, "k": 4, "num_samples": 3, "steps": 1, "micro_batch_size": 3, "lr": 1e-3,
        "filter_eps": "exact"}
QUIET = dict(log=lambda m: None)


def test_every_trainer_weighting_and_baseline_is_a_method():
    from rlsc.config import TRAINER_WEIGHTINGS

    assert set(TRAINER_WEIGHTINGS) <= set(METHODS)
    assert {"greedy", "T0.1", "T0.2", "T0.3", "base", "rlsc-alpha0", "rlsc-alpha0.5", "rlsc-steps20"} <= set(METHODS)
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


def test_token_entropy_matches_one_prefix_at_a_time(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsc.ablate import token_entropy
    from rlsc.sampling import chat_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [{"question": "What is 3 + 4?", "samples": ["7", "It is 7.", ""]},
               {"question": "Q?", "samples": ["abc 12"]}]
    T = 0.7
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            prompt = tok(chat_prompt(tok, rec["question"], "{question}"), add_special_tokens=False)["input_ids"]
            for s in rec["samples"]:
                ids = prompt + tok(s, add_special_tokens=False)["input_ids"]
                for t in range(len(prompt), len(ids)):  # the distribution that produced token t
                    logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double() / T
                    p = torch.softmax(logits, -1)
                    total += float(-(p * p.log()).sum())
                    count += 1
    got = token_entropy(model, tok, records, "{question}", T)
    assert count == 1 + 8 + 6 and abs(got - total / count) < 1e-4
    assert token_entropy(model, tok, [{"question": "Q?", "samples": []}], "{question}", T) is None
