"""Samples come from exactly softmax(logits / T): nothing in the model's generation_config applies."""
from __future__ import annotations

import torch

from rlsc.data import Problem
from rlsc.sampling import chat_prompt, sample

from conftest import make_model


def _model_with_every_generation_knob(tok):
    """A tiny model whose generation_config asks for everything that would distort sampling."""
    model = make_model(tok, seed=11)
    g = model.generation_config
    g.do_sample = True
    g.repetition_penalty = 5.0
    g.no_repeat_ngram_size = 1
    g.min_length = 50
    g.min_new_tokens = 20
    g.top_k = 2
    g.top_p = 0.05
    g.typical_p = 0.2
    g.temperature = 7.0
    g.suppress_tokens = list(range(10, 40))
    g.begin_suppress_tokens = list(range(40, 60))
    g.bad_words_ids = [[t] for t in range(60, 70)]
    g.forced_bos_token_id = 5
    g.forced_eos_token_id = tok.eos_token_id
    g.encoder_repetition_penalty = 3.0
    return model


def chi2_upper_quantile(dof: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal quantile z (no scipy)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * c ** 0.5) ** 3


def _prompt_ids(tok, question):
    return tok(chat_prompt(tok, question, "{question}"), return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_samples_replay_exactly_under_a_from_scratch_softmax_sampler(tiny_tokenizer):
    """The same seed, a reference sampler that recomputes the whole forward each step and draws from
    softmax(logits / T) alone: identical tokens at every step, despite the generation config."""
    tok = tiny_tokenizer
    model = _model_with_every_generation_knob(tok)
    T, n, L = 0.7, 6, 12
    torch.manual_seed(123)
    r = sample(model, tok, [Problem("a", "What is 2 + 2?", "", "t")], template="{question}", num_samples=n,
               max_new_tokens=L, temperature=T)

    torch.manual_seed(123)
    ids = _prompt_ids(tok, "What is 2 + 2?").repeat(n, 1)
    done = torch.zeros(n, dtype=torch.bool)
    ref = []
    with torch.no_grad():
        for _ in range(r.completion_ids.shape[1]):
            logits = model(input_ids=ids).logits[:, -1].float()
            cdf = torch.softmax(logits.double() / T, -1).cumsum(-1)   # inverse CDF, one uniform per row
            tok_t = (cdf < torch.rand(n, 1, dtype=torch.float64) * cdf[:, -1:]).sum(-1)
            tok_t = tok_t.masked_fill(done, tok.pad_token_id)
            done |= tok_t == tok.eos_token_id
            ref.append(tok_t)
            ids = torch.cat([ids, tok_t[:, None]], 1)
    ref = torch.stack(ref, 1)
    assert torch.equal(r.completion_ids[r.completion_mask], ref[r.completion_mask])
    # the knobs would have been visible: tokens they forbid do occur, and no 50-token minimum
    assert (r.completion_ids[r.completion_mask] < 70).any() or (~r.capped).any()


def test_first_token_frequencies_match_softmax_over_temperature(tiny_tokenizer):
    """Many one-token samples at a fixed prompt: a chi-square test against softmax(logits / T)
    (fixed seed; the threshold is the 1e-4 upper quantile, so a correct sampler fails ~never; measured
    here: 93 for the right sampler against a threshold of 153 at 92 degrees of freedom, 341 for a
    sampler at T = 0.9 instead of 0.8, and orders of magnitude more under any knob above)."""
    tok = tiny_tokenizer
    model = _model_with_every_generation_knob(tok)
    with torch.no_grad():  # a sharper head: with a near-uniform one a wrong T would pass unseen
        model.lm_head.weight.mul_(6.0)
    T, n = 0.8, 4000
    torch.manual_seed(0)
    r = sample(model, tok, [Problem("a", "Hi", "", "t")], template="{question}", num_samples=n,
               max_new_tokens=1, temperature=T)
    with torch.no_grad():
        logits = model(input_ids=_prompt_ids(tok, "Hi")).logits[0, -1].double()
    p = torch.softmax(logits / T, -1)
    counts = torch.bincount(r.completion_ids[:, 0], minlength=p.numel()).double()
    expected = n * p
    keep = expected >= 5  # pool the rare tokens into one cell, as the test requires
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 5:  # the pooled cell is itself too small: fold it into the last kept cell
        obs, exp = torch.cat([obs[:-2], obs[-2:].sum()[None]]), torch.cat([exp[:-2], exp[-2:].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    assert chi2 < chi2_upper_quantile(dof, z=3.719), (chi2, dof)  # z of the 1 - 1e-4 normal quantile
    assert keep.sum() >= 10, "the test distribution must spread over many tokens"


def test_greedy_takes_the_argmax_despite_the_generation_config(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _model_with_every_generation_knob(tok)
    r = sample(model, tok, [Problem("a", "What is 3?", "", "t")], template="{question}", num_samples=1,
               max_new_tokens=6, temperature=0.5, greedy=True)
    ids = _prompt_ids(tok, "What is 3?")
    with torch.no_grad():
        for t in range(int(r.completion_lengths[0])):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            assert int(r.completion_ids[0, t]) == int(nxt)
            ids = torch.cat([ids, nxt.view(1, 1)], 1)


def test_prompts_get_the_tokenizers_bos_once():
    """No chat template (a base model): the BOS the tokenizer adds by default is there; a chat
    template that writes the BOS as text does not get a second one; a tokenizer without a default
    BOS gets none."""
    from test_on_policy import base_tokenizer

    from rlsc.sampling import encode_prompts
    from conftest import make_tokenizer

    base = base_tokenizer()
    bos = base.bos_token_id
    plain = chat_prompt(base, "What is 2 + 2?", "{question}")
    assert encode_prompts(base, [plain])[0] == [bos] + base(plain, add_special_tokens=False)["input_ids"]
    assert encode_prompts(base, [base.bos_token + plain])[0].count(bos) == 1
    chat = make_tokenizer()     # its template starts with <|im_start|> (its BOS) but it adds none by default
    text = chat_prompt(chat, "Hi", "{question}")
    assert encode_prompts(chat, [text])[0] == chat(text, add_special_tokens=False)["input_ids"]
