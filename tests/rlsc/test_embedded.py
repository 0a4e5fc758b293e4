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


def test_the_converted_folder_is_the_gguf_model(embedded, tmp_path, monkeypatch):
    """'embedded' loads from its one-time conversion (rlsc.models.convert_embedded): the same
    weights, logits, tokenizer and EOS as the GGUF file loaded directly; a fresh cache converts
    again, atomically, and a second call reuses the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsc.models import convert_embedded, embedded_converted_dir, embedded_model_path
    from rlsc.sampling import eos_token_ids

    assert embedded.model.name_or_path == str(embedded_converted_dir())
    gguf = embedded_model_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    direct_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = embedded.model.state_dict()
    for name, value in direct.state_dict().items():
        assert torch.equal(ours[name], value), name
    ids = torch.tensor([[1, 520, 33, 4000, 12, 99]])
    with torch.no_grad():
        assert torch.equal(embedded.model(input_ids=ids).logits, direct(input_ids=ids).logits)
    text = "<|im_start|>user\nWhat is 7 * 8? \\boxed{56}<|im_end|>"
    assert embedded.tokenizer(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert embedded.tokenizer.chat_template == direct_tok.chat_template
    assert eos_token_ids(embedded.model, embedded.tokenizer) == eos_token_ids(direct, direct_tok)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh = convert_embedded()
    assert fresh.parent == tmp_path / "rlsc-kernels" and (fresh / "config.json").is_file()
    assert [p.name for p in fresh.parent.iterdir()] == [fresh.name]      # no temporary left behind
    mtime = (fresh / "config.json").stat().st_mtime_ns
    assert convert_embedded() == fresh and (fresh / "config.json").stat().st_mtime_ns == mtime
