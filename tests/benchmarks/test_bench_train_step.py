"""The training-step benchmark runs on CPU with a tiny model and both steps compute the same loss."""
import json

import pytest

from benchmarks import train_step


def test_naive_and_fused_steps_compute_the_same_loss(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "t.json"
    train_step.main(["--model", "tiny", "--layers", "1", "--n-seqs", "2", "--completion-len", "8", "--prompt-len", "4",
                     "--reps", "1", "--device", "cpu", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["naive"].get("error") is None and rows["fused"].get("error") is None
    assert rows["fused"]["loss"] == pytest.approx(rows["naive"]["loss"], rel=1e-4)
    assert rows["naive"]["median_ms"] > 0
