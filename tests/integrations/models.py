"""Tiny randomly initialised Hugging Face causal LMs for the integration tests, and the oracle:
the model's own logits turned into next-token log-probs / entropies."""
from __future__ import annotations

import torch
import transformers

VOCAB = 101  # not a multiple of any block size


def tiny_model(kind: str = "llama", *, dtype=torch.float64, seed: int = 0, **config):
    """A 2-layer random model of the given family (llama, qwen2, cohere, granite, gemma2)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "gemma2":
        common.update(head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=None)
    if kind == "cohere":
        common.update(logit_scale=0.37)
    if kind == "granite":
        common.update(logits_scaling=2.5)
    common.update(config)
    cls = {"llama": "Llama", "qwen2": "Qwen2", "cohere": "Cohere", "granite": "Granite", "gemma2": "Gemma2"}[kind]
    cfg = getattr(transformers, f"{cls}Config")(**common)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).to(dtype)
    if not cfg.tie_word_embeddings:
        # Untied heads start as an independent random matrix with a bias-free Linear.
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model


def batch(B: int = 3, T: int = 11, *, seed: int = 1, prompt: int = 4):
    """input_ids [B, T], attention_mask (right padding of varying length) and labels with the
    prompt and the padding at -100, as a GRPO-style completion scoring pass builds them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    lengths = torch.tensor([T - (i % 3) * 2 for i in range(B)])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return ids, mask, labels


def oracle(model, ids, mask, labels, *, temperature=1.0):
    """(log_probs [B, T-1], entropy [B, T-1]) from the model's own full logits; 0 at -100."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / temperature
    logp_all = torch.log_softmax(logits, -1)
    y = labels[:, 1:]
    valid = y != -100
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy
