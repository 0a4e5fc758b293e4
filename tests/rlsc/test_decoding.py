"""rlsc.decoding: the static-cache and compacting decode loops draw the same tokens as the dynamic
loop (same seed), so they sample from the same softmax(logits / T); sample(sampler=...) routes to them."""
from __future__ import annotations

import pytest
import torch

from rlsc.data import Problem
from rlsc.decoding import decode, release_static_decoders, resolve_sampler
from rlsc.sampling import sample

from conftest import make_model
from test_sampling import _model_with_every_generation_knob, chi2_upper_quantile, _prompt_ids

LOOPS = ("static", "compact")


def _dynamic(model, ids, mask, **kw):
    return decode(model, ids, mask, sampler="dynamic", **kw)


def _left_padded_batch(tok, questions, n):
    from rlsc.sampling import chat_prompt

    old = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok([chat_prompt(tok, q, "{question}") for q in questions], return_tensors="pt", padding=True,
                  add_special_tokens=False)
    finally:
        tok.padding_side = old
    return enc["input_ids"].repeat_interleave(n, 0), enc["attention_mask"].bool().repeat_interleave(n, 0)


def _model_that_stops(tok, seed):
    """The EOS logit is 0 (conftest), so rows finish at different steps (the compacting loop drops them)."""
    return make_model(tok, seed=seed)


@pytest.mark.parametrize("name", LOOPS)
@pytest.mark.parametrize("temperature", [0.7, 1.3, None])
def test_same_tokens_as_the_dynamic_loop(tiny_tokenizer, name, temperature):
    """Prompts of different lengths (left padding), rows that end early and rows that hit the cap:
    identical completion blocks for the same seed."""
    tok = tiny_tokenizer
    model = _model_that_stops(tok, seed=7)
    ids, mask = _left_padded_batch(tok, ["What is 12 * 7?", "Hi", "A longer question, with more tokens?"], 5)
    kw = dict(max_new_tokens=23, temperature=temperature, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    torch.manual_seed(31)
    ref = _dynamic(model, ids, mask, **kw)
    torch.manual_seed(31)
    got = decode(model, ids, mask, sampler=name, **kw)
    assert torch.equal(got, ref)
    if temperature is not None:  # the case is not trivial: some rows ended early, some ran to the cap
        ended = (ref == tok.eos_token_id).any(1)
        assert ended.any() and (~ended).any(), ended


@pytest.mark.parametrize("sampler", ["static", "compact", "dynamic", "auto"])
def test_sample_routes_every_sampler_and_ignores_the_generation_config(tiny_tokenizer, sampler):
    tok = tiny_tokenizer
    model = _model_with_every_generation_knob(tok)
    problems = [Problem("a", "What is 2 + 2?", "", "t"), Problem("b", "Say hi", "", "t")]
    kw = dict(template="{question}", num_samples=4, max_new_tokens=9, temperature=0.6)
    torch.manual_seed(2)
    ref = sample(model, tok, problems, sampler="dynamic", **kw)
    torch.manual_seed(2)
    got = sample(model, tok, problems, sampler=sampler, **kw)
    assert torch.equal(got.completion_ids, ref.completion_ids)
    assert torch.equal(got.completion_mask, ref.completion_mask)
    assert torch.equal(got.capped, ref.capped)


@pytest.mark.parametrize("sampler", ["static", "compact"])
def test_first_token_frequencies_match_softmax_over_temperature(tiny_tokenizer, sampler):
    """Chi-square against softmax(logits / T) at the 1e-4 upper quantile (as the dynamic loop's test)."""
    tok = tiny_tokenizer
    model = _model_with_every_generation_knob(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    T, n = 0.8, 4000
    torch.manual_seed(1)
    r = sample(model, tok, [Problem("a", "Hi", "", "t")], template="{question}", num_samples=n, max_new_tokens=1,
               temperature=T, sampler=sampler)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=_prompt_ids(tok, "Hi")).logits[0, -1].double() / T, -1)
    counts = torch.bincount(r.completion_ids[:, 0], minlength=p.numel()).double()
    expected = n * p
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < chi2_upper_quantile(obs.numel() - 1, z=3.719), chi2
    assert keep.sum() >= 10


def test_resolve_sampler():
    assert resolve_sampler("auto", torch.device("cpu")) == "compact"   # measured faster on CPU
    assert resolve_sampler("auto", torch.device("cuda")) == "dynamic"   # static: opt-in until a GPU records it
    assert resolve_sampler("static", torch.device("cpu")) == "static"
    assert resolve_sampler("dynamic", torch.device("cuda")) == "dynamic"
    with pytest.raises(ValueError, match="sampler must be one of"):
        resolve_sampler("fast", torch.device("cpu"))


def test_config_rejects_an_unknown_sampler():
    from rlsc.config import RLSCConfig

    with pytest.raises(ValueError, match="--sampler expects one of"):
        RLSCConfig(sampler="graph").validate("train")


def test_static_cache_is_reset_between_calls(tiny_tokenizer):
    """The static decoder (and its cache) kept on the model is reused by the next call of the same
    bucket: stale keys/values of the first call must not leak into the second."""
    tok = tiny_tokenizer
    model = make_model(tok, seed=4)
    kw = dict(max_new_tokens=15, temperature=0.9, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    for questions in (["A long question about numbers?", "Hi"], ["Short", "x"]):
        ids, mask = _left_padded_batch(tok, questions, 3)
        torch.manual_seed(8)
        ref = _dynamic(model, ids, mask, **kw)
        torch.manual_seed(8)
        assert torch.equal(decode(model, ids, mask, sampler="static", **kw), ref)
    assert len(model.__dict__["_rlsc_static_decoders"]) == 1
    release_static_decoders(model)
    assert "_rlsc_static_decoders" not in model.__dict__


def test_greedy_rows_in_the_sampled_batch_match_separate_calls(tiny_tokenizer):
    """compact_loop with greedy rows appended: the greedy rows equal a greedy call and the sampled
    rows equal a sampling call with the same seed (completions cut at the shorter length)."""
    tok = tiny_tokenizer
    model = make_model(tok, seed=9)
    ids, mask = _left_padded_batch(tok, ["What is 6 * 7?", "Hi there"], 4)
    g_ids, g_mask = _left_padded_batch(tok, ["What is 6 * 7?", "Hi there"], 1)
    kw = dict(max_new_tokens=17, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    torch.manual_seed(21)
    sampled = _dynamic(model, ids, mask, temperature=0.8, **kw)
    greedy = _dynamic(model, g_ids, g_mask, temperature=None, **kw)
    torch.manual_seed(21)
    both = decode(model, torch.cat([ids, g_ids]), torch.cat([mask, g_mask]), temperature=0.8, sampler="compact",
                  greedy_rows=torch.tensor([False] * 8 + [True] * 2), **kw)
    pad = tok.pad_token_id

    def same(a, b):
        n = max(a.shape[1], b.shape[1])
        grow = lambda t: torch.nn.functional.pad(t, (0, n - t.shape[1]), value=pad)  # noqa: E731
        return torch.equal(grow(a), grow(b))

    assert same(both[:8], sampled) and same(both[8:], greedy)
    assert not torch.equal(sampled[0::4][:, :5], greedy[:, :5])  # the two kinds of rows differ


def test_evaluation_with_the_compact_sampler_gives_the_same_records(tiny_tokenizer, tmp_path):
    """evaluate_problems decodes greedy + samples in one compact batch: the records (greedy answer,
    every sample, lengths) equal the dynamic sampler's two separate calls, for the same seed."""
    from rlsc.evaluate import evaluate_problems

    tok = tiny_tokenizer
    model = make_model(tok, seed=5)
    problems = [Problem(str(i), f"What is {i} * 3?", str(3 * i), "t") for i in range(3)]
    recs = {}
    for sampler in ("dynamic", "compact"):
        torch.manual_seed(17)
        path = tmp_path / f"{sampler}.jsonl"
        evaluate_problems(model, tok, problems, template="{question}", k=5, temperature=0.9, max_new_tokens=14,
                          batch_questions=2, log=lambda m: None, samples_path=path, sampler=sampler)
        recs[sampler] = path.read_text()
    assert recs["compact"] == recs["dynamic"]
    assert "samples" in recs["compact"]


def test_with_greedy_needs_the_compact_sampler(tiny_tokenizer):
    tok = tiny_tokenizer
    model = make_model(tok, seed=5)
    with pytest.raises(ValueError, match="with_greedy=True needs sampling with the compact sampler"):
        sample(model, tok, [Problem("a", "x", "", "t")], template="{question}", num_samples=2, max_new_tokens=3,
               temperature=0.5, sampler="static", with_greedy=True)


def test_static_decoders_are_keyed_by_the_compute_dtype(tiny_tokenizer):
    """A second call under another autocast dtype gets its own static cache (not the first's)."""
    tok = tiny_tokenizer
    model = make_model(tok, seed=4)
    ids, mask = _left_padded_batch(tok, ["What is 1 + 1?"], 2)
    kw = dict(max_new_tokens=6, temperature=0.9, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, sampler="static")
    decode(model, ids, mask, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decode(model, ids, mask, **kw)
    decode(model, ids, mask, **kw)
    dtypes = sorted(str(key[-1]) for key in model.__dict__["_rlsc_static_decoders"])
    assert dtypes == ["torch.bfloat16", "torch.float32"]


def test_draw_from_logprobs_frequencies_and_zero_probability_tokens():
    """The inverse-CDF draw: frequencies within 5 standard errors of p, never a token of p = 0 (the
    last ones included, where u near the total would land), and a seed fixes the draws."""
    from rlsc.decoding import draw_from_logprobs

    torch.manual_seed(5)
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0, 0.0])
    logp = p.log().expand(20000, -1).contiguous()
    tokens = draw_from_logprobs(logp)
    counts = torch.bincount(tokens, minlength=p.numel()).double() / tokens.numel()
    assert counts[p == 0].sum() == 0
    se = (p * (1 - p) / tokens.numel()).sqrt()
    assert ((counts - p.double()).abs() <= 5 * se + 1e-12).all(), counts
    one_hot = torch.full((3, 9), float("-inf"))
    one_hot[:, 4] = 0.0
    assert draw_from_logprobs(one_hot).tolist() == [4, 4, 4]
    torch.manual_seed(9)
    a = draw_from_logprobs(torch.randn(4, 50).log_softmax(-1))
    torch.manual_seed(9)
    assert torch.equal(a, draw_from_logprobs(torch.randn(4, 50).log_softmax(-1)))


@pytest.mark.parametrize("name", ["dynamic", "compact", "static"])
def test_a_shared_prefill_draws_what_one_prefill_per_row_draws(tiny_tokenizer, name):
    """prompt_rows: three distinct prompts (left-padded) prefilled once each and copied to 5 rows
    apiece, in an interleaved order, give the completions and log-probabilities of the 15
    expanded prompts decoded row by row."""
    tok = tiny_tokenizer
    model = _model_that_stops(tok, seed=7)
    ids, mask = _left_padded_batch(tok, ["What is 12 * 7?", "Hi", "A longer question, with more tokens?"], 1)
    rows = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0, 2, 2, 0, 1])
    kw = dict(max_new_tokens=19, temperature=0.9, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
              sampler=name, return_logp=True)
    torch.manual_seed(4)
    shared, shared_logp = decode(model, ids, mask, prompt_rows=rows, **kw)
    torch.manual_seed(4)
    each, each_logp = decode(model, ids[rows], mask[rows], **kw)
    assert torch.equal(shared, each)
    torch.testing.assert_close(shared_logp, each_logp, rtol=0, atol=1e-5)
    assert len(set(map(tuple, shared.tolist()))) > 3    # the rows did draw different completions


def _entropy_oracle(model, ids, mask, completion, completion_mask, temperature):
    """Float64: the entropy of softmax(logits / T) at each completion position, from one forward of
    the prompt + completion (left-padded prompts: explicit position ids, as the decode loops use)."""
    import copy

    m64 = copy.deepcopy(model).double()
    full = torch.cat([ids, completion], 1)
    attention = torch.cat([mask, completion_mask], 1).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = m64(input_ids=full, attention_mask=attention, position_ids=positions).logits
    z = logits[:, ids.shape[1] - 1: -1] / temperature
    p = torch.softmax(z, -1)
    return -(p * p.log()).nan_to_num().sum(-1)


@pytest.mark.parametrize("name", ["dynamic", "compact", "static"])
@pytest.mark.parametrize("temperature", [0.6, None])
def test_entropy_of_each_drawn_position_against_float64(tiny_tokenizer, name, temperature):
    """return_entropy=True: the same tokens and log-probabilities as without it (the draws do not
    move), and at every generated position the entropy of the distribution drawn from (softmax of
    the logits / T; T = 1 for greedy) matches a float64 forward of prompt + completion."""
    from rlsc.sampling import completion_mask_from_ids

    tok = tiny_tokenizer
    model = _model_that_stops(tok, seed=7)
    ids, mask = _left_padded_batch(tok, ["What is 12 * 7?", "Hi"], 3)
    kw = dict(max_new_tokens=17, temperature=temperature, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
              sampler=name, return_logp=True)
    torch.manual_seed(12)
    plain, plain_logp = decode(model, ids, mask, **kw)
    torch.manual_seed(12)
    got, got_logp, ent = decode(model, ids, mask, return_entropy=True, **kw)
    assert torch.equal(got, plain) and torch.equal(got_logp, plain_logp)
    assert ent.shape == got.shape and ent.dtype == torch.float32
    cmask, _ = completion_mask_from_ids(got, [tok.eos_token_id])
    want = _entropy_oracle(model, ids, mask, got, cmask, 1.0 if temperature is None else temperature)
    torch.testing.assert_close(ent[cmask].double(), want[cmask], rtol=1e-4, atol=1e-4)
    assert float(want[cmask].min()) > 0.05   # not a degenerate case: every position has spread
    torch.manual_seed(12)
    only_ids, only_ent = decode(model, ids, mask, return_entropy=True, **{**kw, "return_logp": False})
    assert torch.equal(only_ids, got) and torch.equal(only_ent, ent)


def test_sample_and_evaluation_report_the_sampled_entropy(tiny_tokenizer):
    """sample(entropy=True) sums each completion's position entropies over its mask, leaving the
    draws as they were; evaluate_problems(token_entropy=True) reports their mean per sampled token
    (the greedy rows decoded in the same batch are not counted), None without samples."""
    from rlsc.evaluate import evaluate_problems

    tok = tiny_tokenizer
    model = make_model(tok, seed=5)
    problems = [Problem(str(i), f"What is {i} * 3?", str(3 * i), "t") for i in range(3)]
    kw = dict(template="{question}", num_samples=4, max_new_tokens=12, temperature=0.8, sampler="compact")
    torch.manual_seed(3)
    plain = sample(model, tok, problems, **kw)
    torch.manual_seed(3)
    r = sample(model, tok, problems, entropy=True, **kw)
    assert torch.equal(r.completion_ids, plain.completion_ids) and plain.entropy_sum is None
    want = _entropy_oracle(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.8)
    torch.testing.assert_close(r.entropy_sum.double(), (want * r.completion_mask).sum(-1), rtol=1e-4, atol=1e-4)
    assert torch.equal(r.select(slice(1, 3)).entropy_sum, r.entropy_sum[1:3])

    torch.manual_seed(3)
    samples, _ = sample(model, tok, problems, with_greedy=True, entropy=True, **kw)
    torch.manual_seed(3)
    m = evaluate_problems(model, tok, problems, template="{question}", k=4, temperature=0.8, max_new_tokens=12,
                          batch_questions=3, log=lambda s: None, sampler="compact", token_entropy=True)
    expected = float(samples.entropy_sum.sum()) / int(samples.completion_lengths.sum())
    assert m["token_entropy"] == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(3)
    assert "token_entropy" not in evaluate_problems(model, tok, problems, template="{question}", k=4, temperature=0.8,
                                                    max_new_tokens=12, batch_questions=3, log=lambda s: None)
    greedy_only = evaluate_problems(model, tok, problems, template="{question}", k=0, temperature=0.8,
                                    max_new_tokens=12, log=lambda s: None, token_entropy=True)
    assert greedy_only["token_entropy"] is None
