"""The trainer's invariant, across the configurations users run: what the sampler says it sampled
with is what the loss scores.

For each case a tiny random model is built from a config (family x attention implementation x
precision), completions are drawn by one of the decode loops (rlsc.sampling.sample records the
sampler's own log p of each completion: the sum of the log-probabilities it drew its tokens
with), and both engines score them: the thin trainer (rlsc.step.sequence_logprobs, in train mode
with dropout off, as a step runs) and the TRL engine (the model's forward with `rlsc=`, as its
compute_loss runs). Checked: each sample's scored L_s equals the sampler's log p within the
precision's tolerance; the two engines agree; scoring the same rollouts twice gives identical
numbers (no dropout left on). The TRL engine's own sampler (transformers' generate under
rlsc.trl_engine.sampling_as_scored) is checked the same way.

The product (8 families x 3 attention implementations x 3 precisions x 3 samplers x 2 engines =
432 cells) is sampled as a pairwise covering design: the 24 (family, attention) cells each take
precision index (i + j) mod 3 and sampler index (i + 2 j) mod 3 (family i, attention j), so every
pair of values of any two factors occurs, and both engines score every case; two more cases put the
static loop under FlashAttention-2 masking in bf16 and bf16 autocast (the configuration of the bug
this module was written for). On a GPU with flash-attn installed, the real FlashAttention-2 runs
the same checks (test_real_flash_attention_2_on_gpu). The module (40 tests on CPU) took 109 s
on 2 CPU cores shared with other jobs (load average ~8).

Tolerances (per sample, in nats), from the rounding that legitimately differs between a KV-cache
forward and a full forward of the body (the head's logits are computed identically: fp32 from the
same 16-bit inputs): fp32 1e-4 (measured on these 10-token samples: 8e-6); bf16 weights (the
body's residual stream rounded to bf16 at every layer) 0.03 (measured 0.006); bf16 autocast (fp32
residual stream, bf16 matmuls) 0.02 (measured 8e-6 on CPU; GPU kernels may round a 1-row and a
full-sequence matmul differently). A sampler drawing from 16-bit logits misses them by nats: the
`llama-offset` model (a large logit offset common to the vocabulary, as real LMs have) gave 1.7
nats per sample through generate without the fp32 head, 3.0 through the samplers while their head
matmul still ran under autocast. The two engines run the same computation: they agree to 1e-5
(fp32) / 1e-3 (16-bit) relative.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from rlsc.data import Problem
from rlsc.sampling import sample
from rlsc.step import LossOptions, sequence_logprobs, train_mode_without_dropout
from rlsc.trl_engine import _Request, add_rlsc_forward

import fa2_emulation
from conftest import make_tokenizer

FAMILIES = ("llama", "qwen2", "gpt2", "opt", "gemma2-softcap", "cohere-scaled", "llama-base", "llama-attn-dropout")
ATTENTIONS = ("eager", "sdpa", fa2_emulation.NAME)
PRECISIONS = ("fp32", "bf16", "bf16-autocast")
SAMPLERS = ("dynamic", "compact", "static")
T = 0.7
TOLERANCE = {"fp32": 1e-4, "bf16": 0.03, "bf16-autocast": 0.02}
PROBLEMS = [Problem("a", "What is 12 * 7?", "84", "t"), Problem("b", "Hi", "", "t")]


def base_tokenizer():
    """The chat tokenizer without a chat template, adding a BOS by default (as Llama's does)."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok.chat_template = None
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)])
    return tok


def build(family: str, attention: str, tok):
    """A tiny random causal LM of `family` with attention implementation `attention` (fp32, eval)."""
    import transformers as tf

    fa2_emulation.register()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llama_like = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    if family in ("llama", "llama-base"):
        cfg = tf.LlamaConfig(**llama_like)
    elif family == "llama-offset":
        cfg = tf.LlamaConfig(tie_word_embeddings=False, **llama_like)
    elif family == "llama-attn-dropout":
        cfg = tf.LlamaConfig(attention_dropout=0.3, **llama_like)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**llama_like)
    elif family == "gemma2-softcap":
        cfg = tf.Gemma2Config(head_dim=8, final_logit_softcapping=2.0, sliding_window=512, **llama_like)
    elif family == "cohere-scaled":
        cfg = tf.CohereConfig(logit_scale=0.25, **llama_like)
    elif family == "gpt2":   # attn/resid/embd dropout 0.1 by default
        cfg = tf.GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=4, **ids)
    elif family == "opt":    # dropout and attention_dropout 0.1 (functional dropout)
        cfg = tf.OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=512, dropout=0.1, attention_dropout=0.1, **ids)
    else:
        raise ValueError(family)
    if family == "gemma2-softcap" and attention == "sdpa":
        attention = "eager"    # transformers has no SDPA for Gemma 2 (the pair is covered by eager instead)
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attention)
    with torch.no_grad():
        head = model.get_output_embeddings()
        if family == "gemma2-softcap":
            head.weight.mul_(20.0)     # logits well beyond the cap: the soft-cap bends them
        elif family == "cohere-scaled":
            head.weight.mul_(4.0)
        else:
            head.weight.mul_(3.0)      # a peaked distribution: a wrong sampler shows
        head.weight[tok.eos_token_id].mul_(0.5)
        if family == "llama-offset":   # a large logit offset common to the vocabulary, as real LMs have:
            model.model.norm.weight[0] = 60.0          # softmax ignores it, 16-bit logits do not
            head.weight[:, 0] = 4.0
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def _amp(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()


def _setup(family, attention, precision, sampler, device="cpu"):
    tok = base_tokenizer() if family == "llama-base" else make_tokenizer()
    model = build(family, attention, tok).to(device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    autocast_dtype = torch.bfloat16 if precision == "bf16-autocast" else None
    torch.manual_seed(1)
    rollouts = sample(model, tok, PROBLEMS, template="{question}", num_samples=3, max_new_tokens=10, temperature=T,
                      autocast_dtype=autocast_dtype, sampler=sampler)
    return tok, model, rollouts, autocast_dtype


def _thin_scores(model, rollouts, autocast_dtype):
    opts = LossOptions(temperature=T, micro_batch_size=4, autocast_dtype=autocast_dtype)
    train_mode_without_dropout(model)
    try:
        return [sequence_logprobs(model, rollouts, opts) for _ in range(2)]
    finally:
        model.eval()


def _trl_scores(model, rollouts, precision):
    add_rlsc_forward(model)
    settings = dict(temperature=T, alpha=0.1, backend="auto", filter_eps=None)
    model.train()   # the TRL trainer's model is in train mode; its dropout is off (disable_dropout)
    try:
        with torch.no_grad(), _amp(precision):
            return [model(rlsc=_Request(rollouts, "score", settings=settings)) for _ in range(2)]
    finally:
        model.eval()


def _check(rollouts, thin, trl, precision):
    assert torch.equal(thin[0], thin[1]), "the thin trainer's repeated scoring differs"
    assert torch.equal(trl[0], trl[1]), "the TRL engine's repeated scoring differs"
    sampled = rollouts.sampled_logp.float().cpu()
    scored = thin[0].float().cpu()
    gap = (sampled - scored).abs()
    assert float(gap.max()) <= TOLERANCE[precision], (precision, sampled, scored)
    rel = 1e-5 if precision == "fp32" else 1e-3
    torch.testing.assert_close(trl[0].float().cpu(), scored, rtol=rel, atol=rel)
    return float(gap.max())


def _cases():
    cases = []
    for i, family in enumerate(FAMILIES):
        for j, attention in enumerate(ATTENTIONS):
            cases.append((family, attention, PRECISIONS[(i + j) % 3], SAMPLERS[(i + 2 * j) % 3]))
    cases += [("llama", fa2_emulation.NAME, "bf16", "static"), ("qwen2", fa2_emulation.NAME, "bf16-autocast", "static")]
    return cases


@pytest.mark.parametrize("family, attention, precision, sampler", _cases())
def test_sampled_log_p_is_what_both_engines_score(family, attention, precision, sampler):
    tok, model, rollouts, autocast_dtype = _setup(family, attention, precision, sampler)
    assert int(rollouts.completion_mask.sum()) >= 12, "the samples must have tokens to score"
    if family == "llama-base":   # no chat template: the prompt starts with the tokenizer's BOS, once
        rows = [ids[mask].tolist() for ids, mask in zip(rollouts.prompt_ids, rollouts.prompt_mask)]
        assert all(r[0] == tok.bos_token_id and r[1] != tok.bos_token_id for r in rows), rows
    thin = _thin_scores(model, rollouts, autocast_dtype)
    trl = _trl_scores(model, rollouts, precision)
    _check(rollouts, thin, trl, precision)


def test_the_design_covers_every_pair_of_factors():
    cases = _cases()
    factors = (FAMILIES, ATTENTIONS, PRECISIONS, SAMPLERS)
    for a in range(4):
        for b in range(a + 1, 4):
            seen = {(c[a], c[b]) for c in cases}
            assert len(seen) == len(factors[a]) * len(factors[b]), (a, b)


def test_fa2_emulation_equals_sdpa_on_the_dynamic_loop():
    """The emulation is trusted only where FA2 is right: on the dynamic loop it draws the same
    tokens with the same log-probabilities as SDPA (left-padded prompts of two lengths)."""
    out = {}
    for attention in ("sdpa", fa2_emulation.NAME):
        _, _, rollouts, _ = _setup("llama", attention, "fp32", "dynamic")
        out[attention] = rollouts
    a, b = out.values()
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.sampled_logp, b.sampled_logp, rtol=1e-5, atol=1e-5)


def test_an_all_ones_mask_over_a_static_cache_is_caught_by_the_emulation():
    """The bug of the old static loop, reproduced under the emulation: a prefill with an all-ones
    mask as long as the cache (FA2 drops it and attends bottom-right over every slot) gives other
    logits than the model's; with the loop's mask (1 on written slots only) they agree."""
    from transformers import StaticCache

    tok = make_tokenizer()
    model = build("llama", fa2_emulation.NAME, tok)
    ids = torch.tensor([[tok.bos_token_id, 20, 21, 22, 23]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0, -1]
        for mask, same in ((torch.ones(1, 64, dtype=torch.long), False), (torch.ones(1, 5, dtype=torch.long), True)):
            cache = StaticCache(config=model.config, max_cache_len=64)
            got = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[0, -1]
            assert torch.allclose(got, ref, atol=1e-5) == same


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bf16_autocast_samples_from_fp32_logits_under_a_large_logit_offset(sampler):
    """A model whose logits share a large offset (|z| ~ 1e3): bf16 logits of a 16-bit lm_head would
    be off by ~2 nats per token; the samplers' fp32 FusedHead logits are the ones the loss scores."""
    tok, model, rollouts, autocast_dtype = _setup("llama-offset", "sdpa", "bf16-autocast", sampler)
    thin = _thin_scores(model, rollouts, autocast_dtype)
    trl = _trl_scores(model, rollouts, "bf16-autocast")
    _check(rollouts, thin, trl, "bf16-autocast")


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_lora_on_the_head_samples_what_the_loss_scores(precision):
    """PEFT LoRA on lm_head (and q_proj), adapters non-zero: the samplers draw through the adapter
    exactly as the loss scores it, inside or outside autocast."""
    pytest.importorskip("peft")
    from rlsc.models import apply_lora

    tok = make_tokenizer()
    model = apply_lora(build("llama-offset", "sdpa", tok), rank=4, alpha=8.0, target_modules="lm_head,q_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    autocast_dtype = torch.bfloat16 if precision == "bf16-autocast" else None
    torch.manual_seed(1)
    rollouts = sample(model, tok, PROBLEMS, template="{question}", num_samples=3, max_new_tokens=10, temperature=T,
                      autocast_dtype=autocast_dtype, sampler="compact")
    thin = _thin_scores(model, rollouts, autocast_dtype)
    trl = _trl_scores(model, rollouts, precision)
    _check(rollouts, thin, trl, precision)


@pytest.mark.parametrize("family, precision", [("llama", "fp32"), ("gemma2-softcap", "bf16-autocast"),
                                               ("cohere-scaled", "bf16"), ("gpt2", "bf16-autocast"),
                                               ("llama-offset", "bf16-autocast"), ("llama-offset", "bf16")])
def test_trl_generation_samples_from_what_the_loss_scores(family, precision):
    """The TRL engine's own sampler: transformers' generate with the engine's GenerationConfig,
    under the loss's autocast and sampling_as_scored (fp32 FusedHead logits, the checkpoint's
    generation_config set aside). Its log p of each sample (from the scores generate returns) is
    what the engine's loss scores."""
    from transformers import GenerationConfig

    from rlsc.sampling import Rollouts, chat_prompt, completion_mask_from_ids, encode_prompts, left_pad
    from rlsc.trl_engine import NEUTRAL_SAMPLING, sampling_as_scored

    tok = make_tokenizer()
    model = build(family, "eager" if family.startswith("gemma2") else "sdpa", tok)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    ids, mask = left_pad(encode_prompts(tok, [chat_prompt(tok, p.question, "{question}") for p in PROBLEMS]),
                         tok.pad_token_id, "cpu")
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    gc = GenerationConfig(do_sample=True, temperature=T, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **NEUTRAL_SAMPLING)
    compute = torch.bfloat16 if precision != "fp32" else None
    torch.manual_seed(2)
    with torch.no_grad(), _amp(precision), sampling_as_scored(model, compute):
        out = model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=gc, output_scores=True,
                             return_dict_in_generate=True)
    completion = out.sequences[:, ids.shape[1]:]
    token_logp = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, completion[:, t, None]).squeeze(-1)
                              for t, s in enumerate(out.scores)], 1)
    cmask, capped = completion_mask_from_ids(completion, [tok.eos_token_id])
    rollouts = Rollouts(ids, mask, completion.masked_fill(~cmask, tok.pad_token_id), cmask, capped,
                        torch.arange(len(ids)), (token_logp * cmask).sum(-1))
    thin = _thin_scores(model, rollouts, torch.bfloat16 if precision == "bf16-autocast" else None)
    trl = _trl_scores(model, rollouts, precision)
    _check(rollouts, thin, trl, precision)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_real_flash_attention_2_on_gpu(sampler, precision):
    """The real FlashAttention-2 (GPU only; run by benchmarks/gpu_check.sh where a GPU is lent)."""
    pytest.importorskip("flash_attn")
    tok, model, rollouts, autocast_dtype = _setup("llama", "flash_attention_2", precision, sampler, device="cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast_dtype is not None else contextlib.nullcontext()
    thin = _thin_scores(model, rollouts, autocast_dtype)
    add_rlsc_forward(model)
    with torch.no_grad(), amp:
        trl = [model(rlsc=_Request(rollouts, "score", settings=dict(temperature=T, alpha=0.1, backend="auto",
                                                                    filter_eps=None))) for _ in range(2)]
    _check(rollouts, thin, trl, precision)
