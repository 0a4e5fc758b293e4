"""The embedded SmolLM2-135M-Instruct end to end, briefly: load, sample, one RLSC step, eval."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rlsc.config import RLSCConfig
from rlsc.data import load_problems
from rlsc.evaluate import evaluate_problems
from rlsc.sampling import decode_completions, sample
from rlsc.step import LossOptions, rlsc_update

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    pytest.importorskip("gguf")
    from rlsc.models import embedded_model_path

    try:
        embedded_model_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    from rlsc.train import load

    return load(RLSCConfig(model="embedded", device="cpu", precision="fp32"), log=lambda m: None)


def test_embedded_model_samples_and_takes_one_rlsc_step(embedded):
    model, tok = embedded.model, embedded.tokenizer
    problems = load_problems("builtin:demo", "train", limit=1)
    torch.manual_seed(0)
    r = sample(model, tok, problems, template="{question}", num_samples=3, max_new_tokens=12, temperature=0.5)
    assert r.completion_ids.shape[0] == 3 and r.completion_mask[:, 0].all()
    assert all(isinstance(t, str) for t in decode_completions(tok, r))
    trained = copy.deepcopy(model)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-5)
    stats = rlsc_update(trained, opt, r, LossOptions(micro_batch_size=2))
    assert math.isfinite(stats.loss) and (stats.seq_logp < 0).all()
    assert stats.n_tokens.tolist() == r.completion_lengths.tolist()
    moved = any(not torch.equal(p, q) for p, q in zip(trained.parameters(), model.parameters()))
    assert moved


def test_model_loaded_from_gguf_saves_with_save_pretrained_and_reloads(embedded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsc.train import save_final

    save_final(embedded.model, embedded.tokenizer, tmp_path / "final")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    AutoTokenizer.from_pretrained(tmp_path / "final")
    assert torch.equal(again.lm_head.weight, embedded.model.lm_head.weight)


def test_embedded_model_eval_reports_all_metrics(embedded):
    problems = load_problems("builtin:demo", "test", limit=2)
    torch.manual_seed(0)
    res = evaluate_problems(embedded.model, embedded.tokenizer, problems, template="{question}", k=2,
                            temperature=0.5, max_new_tokens=16, batch_questions=2, log=lambda m: None)
    assert res["questions"] == 2
    for key in ("greedy_accuracy", "pass@1", "pass@2", "maj@2"):
        assert 0.0 <= res[key] <= 1.0
