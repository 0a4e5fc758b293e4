"""benchmarks/memory_budget.py runs whole RLSC steps at a tiny shape on CPU: both heads compute the
same loss, an out-of-memory update is recorded as "does not fit" and the sweep goes on to a smaller
micro-batch, and the headline picks the largest configuration that fits."""
import json

import pytest
import torch

from benchmarks import memory_budget

pytest.importorskip("transformers")

TINY = ["--shape", "tiny", "--layers", "1", "--n-samples", "4", "--prompt-len", "3", "--device", "cpu", "--reps", "1"]


def test_tiny_sweep_on_cpu_both_heads_same_loss(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "mb.json"
    memory_budget.main(TINY + ["--completion-lens", "5", "--micro-batches", "3", "--modes", "full,lora16",
                               "--out", str(out), "--rollouts", "--rollout-len", "4"])
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert len(rows) == 4 and all(r.get("error") is None and r["fits"] for r in rows), rows
    for mode in ("full", "lora16"):
        by_head = {r["head"]: r for r in rows if r["mode"] == mode}
        assert by_head["ours"]["loss"] == pytest.approx(by_head["naive"]["loss"], rel=1e-4)
        assert by_head["ours"]["gen_seconds"] > 0 and by_head["ours"]["update_seconds"] > 0
    assert {r["rollout"] for r in doc["rollouts"]} == {"generate", "dynamic", "static"}
    assert all(r.get("error") is None and r["tokens"] == 16 for r in doc["rollouts"]), doc["rollouts"]
    assert "ours trains full fine-tuning at 4 x 5 tokens with micro-batch 3" in doc["headline"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_out_of_memory_is_recorded_and_the_sweep_goes_smaller(tmp_path, monkeypatch):
    real = memory_budget.update

    def update(model, opt, loss_fn, ids, targets, prompt_len, micro_batch):
        if micro_batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, opt, loss_fn, ids, targets, prompt_len, micro_batch)

    monkeypatch.setattr(memory_budget, "update", update)
    out = tmp_path / "mb.json"
    memory_budget.main(TINY + ["--completion-lens", "4", "--micro-batches", "4,2,1", "--modes", "full",
                               "--heads", "ours", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["micro_batch"], r["fits"]) for r in rows] == [(4, False), (2, True)]  # stops at the first fit
    assert rows[0]["error"].startswith("OOM")


def test_headline_is_the_largest_configuration_that_fits():
    def row(head, mode, length, mb, fits, budget=24.0):
        return {"head": head, "mode": mode, "completion_len": length, "micro_batch": mb, "fits": fits,
                "budget_gb": budget, "n_samples": 16, "peak_mb": 20 * 1024.0, "step_seconds": 12.0}

    rows = [row("ours", "lora16", 3072, 16, True), row("ours", "full", 1024, 8, True),
            row("ours", "full", 3072, 4, False), row("ours", "full", 3072, 2, True),
            row("ours", "full", 3072, 4, True, budget=16.0),
            row("naive", "full", 1024, 1, False), row("naive", "lora16", 1024, 2, True),
            row("naive", "lora16", 3072, 1, False)]
    text = memory_budget.headline(rows, 24.0)
    assert text.startswith("In 24 GB: ")
    assert "ours trains full fine-tuning at 16 x 3072 tokens with micro-batch 2 (peak 20.0 GB" in text
    assert "naive trains LoRA r16 at 16 x 1024 tokens with micro-batch 2" in text
    assert "naive trains no configuration tried" in memory_budget.headline([row("naive", "full", 1024, 1, False)], 24.0)
