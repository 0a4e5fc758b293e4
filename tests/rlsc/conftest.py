"""Fixtures: a tiny character-level tokenizer with a chat template and a tiny random Llama, saved
to a directory so they load through the same path as a user's local model."""
from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(tok, seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # EOS logit 0: likely enough that some short completions end on their own
        model.lm_head.weight[tok.eos_token_id].mul_(0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_prompts(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("prompts") / "tiny.jsonl"
    with open(path, "w") as fh:
        for i in range(6):
            fh.write(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n")
    return path


def train_killed_at_step(cfg, step: int, monkeypatch) -> None:
    """Runs rlsc.train.train(cfg) and kills it (KeyboardInterrupt) when it starts training step
    `step` (1-based), as a crash would: what it wrote before stays on disk."""
    import rlsc.train as train_mod

    real_step, calls = train_mod.rlsc_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "rlsc_step", dying_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(cfg, log=lambda m: None)
    finally:
        monkeypatch.setattr(train_mod, "rlsc_step", real_step)
