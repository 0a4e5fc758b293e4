"""The trainer's step against the paper's Algorithm 1 written naively with full logits."""
from __future__ import annotations

import copy

import pytest
import torch

from rlsc.data import Problem
from rlsc.sampling import sample
from rlsc.sampling import completion_mask_from_ids
from rlsc.step import LossOptions, group_weights, rlsc_update, sequence_logprobs

from conftest import make_model


def _rollouts(model, tok, n_questions=2, num_samples=5, max_new_tokens=24, seed=1):
    torch.manual_seed(seed)
    problems = [Problem(str(i), f"What is {i} * {i + 3}?", "", "t") for i in range(n_questions)]
    return sample(model, tok, problems, template="{question}", num_samples=num_samples,
                  max_new_tokens=max_new_tokens, temperature=0.5)


def _mixed_rollouts(model, tok):
    """Sampled completions, two of them cut short by an EOS (one EOS-only), the rest length-capped."""
    r = _rollouts(model, tok, max_new_tokens=10)
    eos = tok.eos_token_id
    r.completion_ids[1, 3] = eos
    r.completion_ids[6, 0] = eos
    mask, capped = completion_mask_from_ids(r.completion_ids, [eos])
    r.completion_ids = r.completion_ids.masked_fill(~mask, tok.pad_token_id)
    r.completion_mask, r.capped = mask, capped
    return r


def naive_algorithm1_loss(model, rollouts, temperature, alpha):
    """Algorithm 1 as in the paper: full logits, log_softmax(logits / T), gather, mask, sum, weigh."""
    P = rollouts.prompt_ids.shape[1]
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1)
    attn = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits      # [B, P+L, V]
    logp = torch.log_softmax(logits[:, P - 1 : -1].double() / temperature, dim=-1)
    tok_logp = logp.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)
    seq_logp = (tok_logp * rollouts.completion_mask).sum(-1)                          # log p(y|x)
    weight = torch.exp(seq_logp).detach() + alpha                                     # p_old + alpha
    return -(weight * seq_logp).mean(), seq_logp


def _adamw(model, lr):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


class _GradRecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the gradients it was asked to apply."""

    def step(self, closure=None):
        self.seen_grads = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]}
        return super().step(closure)


def adamw_first_step_tolerance(g_ref, grad_err, lr, eps, weight):
    """How far two AdamW first steps may differ when their gradients differ by at most grad_err.

    AdamW's first step (bias-corrected, no weight decay) moves each weight by lr * f(g) with
    f(g) = g / (|g| + eps); f' = eps / (|g| + eps)^2, so a gradient error d moves the update by at
    most lr * d * eps / (m + eps)^2, m the smallest |g| between the two gradients. Near |g| ~ eps
    that is lr * d / eps: fp32 rounding of a gradient of 1e-7 legitimately changes the update by
    a visible fraction of lr. Plus the rounding of the update and of w + update (a few ulps)."""
    m = (g_ref.abs() - grad_err).clamp(min=0)
    ulp = torch.finfo(torch.float32).eps
    return lr * grad_err * eps / (m + eps) ** 2 + 4 * ulp * lr + 2 * ulp * weight.abs()


@pytest.mark.parametrize("micro_batch_size", [3, 16])
@pytest.mark.parametrize("tie", [True, False])
def test_one_step_update_equals_naive_algorithm1_within_fp32_rounding(tiny_tokenizer, micro_batch_size, tie):
    tok = tiny_tokenizer
    model = make_model(tok, seed=3, tie=tie)
    # peaked logits so that exp(L) does not underflow for every sample and p_old matters
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0 if tie else 16.0)
    rollouts = _mixed_rollouts(model, tok)
    assert rollouts.capped.any() and (~rollouts.capped).any()  # both kinds of completion present
    T, alpha, lr = 0.5, 0.1, 1e-3
    fused, naive = copy.deepcopy(model), copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    opt_fused = _GradRecordingAdamW([p for p in fused.parameters() if p.requires_grad], lr=lr,
                                    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    stats = rlsc_update(fused, opt_fused, rollouts,
                        LossOptions(temperature=T, alpha=alpha, micro_batch_size=micro_batch_size,
                                    filter_eps=None, backend="auto"))

    opt = _adamw(naive, lr)
    loss, seq_logp = naive_algorithm1_loss(naive, rollouts, T, alpha)
    loss.backward()
    naive_grads = {n: p.grad.detach().clone() for n, p in naive.named_parameters()}
    opt.step()

    torch.testing.assert_close(stats.seq_logp.double(), seq_logp.detach(), rtol=1e-5, atol=1e-4)
    loss = float(loss.detach())
    assert abs(stats.loss - loss) <= 1e-5 * abs(loss) + 1e-6
    assert (stats.seq_weight > alpha + 1e-3).any(), "test samples must exercise p_old, not only alpha"
    for (name, p_fused), (_, p_naive) in zip(fused.named_parameters(), naive.named_parameters()):
        g_naive, g_fused = naive_grads[name], opt_fused.seen_grads[id(p_fused)]
        # both gradients are sums over tokens of fp32 products: they agree to a small multiple of
        # fp32 rounding relative to the tensor's largest entry
        grad_err = 1e-5 * float(g_naive.abs().max())
        assert ((g_fused - g_naive).abs() <= grad_err).all(), f"{name}: gradient differs beyond fp32 rounding"
        d_fused = p_fused.detach() - before[name]
        d_naive = p_naive.detach() - before[name]
        tol = adamw_first_step_tolerance(g_naive, grad_err, lr, 1e-8, before[name])
        diff = (d_fused - d_naive).abs()
        assert (diff <= tol).all(), f"{name}: update differs by {(diff - tol).max():.3g} beyond the derived bound"
        assert torch.isfinite(d_fused).all()


def test_adamw_tolerance_is_tight_enough_to_see_a_wrong_gradient():
    """The derived tolerance must still reject an update made from a visibly different gradient."""
    torch.manual_seed(0)
    g = torch.randn(1000) * 1e-2
    w = torch.randn(1000) * 0.02
    lr = 1e-3
    steps = []
    for grad in (g, g * 1.01 + 1e-4):
        p = torch.nn.Parameter(w.clone())
        opt = torch.optim.AdamW([p], lr=lr, eps=1e-8, weight_decay=0.0)
        p.grad = grad.clone()
        opt.step()
        steps.append(p.detach() - w)
    tol = adamw_first_step_tolerance(g, 1e-5 * float(g.abs().max()), lr, 1e-8, w)
    assert not ((steps[0] - steps[1]).abs() <= tol).all()


def test_micro_batching_gives_the_same_update_as_one_batch(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=5)
    rollouts = _rollouts(model, tiny_tokenizer, n_questions=1, num_samples=7)
    deltas = []
    for mb in (1, 2, 7):
        m = copy.deepcopy(model)
        rlsc_update(m, torch.optim.SGD(m.parameters(), lr=1.0), rollouts, LossOptions(micro_batch_size=mb, filter_eps=None))
        deltas.append([(p - q).detach() for p, q in zip(m.parameters(), model.parameters())])  # = -grad
    for other in deltas[1:]:
        for a, b in zip(deltas[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(deltas[0][0].abs().max()) + 1e-9)


def test_group_weights_are_softmax_over_each_questions_samples_plus_alpha():
    L = torch.tensor([-1000.0, -1001.0, -3.0, -5.0])
    q = torch.tensor([0, 0, 1, 1])
    w = group_weights(L, q, alpha=0.1)
    e = torch.exp(torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(w[:2], (e / e.sum() + 0.1).float())
    e = torch.exp(torch.tensor([0.0, -2.0]))
    torch.testing.assert_close(w[2:], (e / e.sum() + 0.1).float())


def test_sequence_logprobs_match_the_training_pass(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=2)
    rollouts = _rollouts(model, tiny_tokenizer, n_questions=2, num_samples=3)
    L = sequence_logprobs(model, rollouts, LossOptions(micro_batch_size=2))
    _, naive = naive_algorithm1_loss(model, rollouts, 0.5, 0.1)
    torch.testing.assert_close(L.double(), naive.detach(), rtol=1e-5, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_update(tiny_tokenizer):
    from rlsc.models import enable_activation_checkpointing
    from rlsc.step import train_mode_without_dropout

    model = make_model(tiny_tokenizer, seed=6)
    rollouts = _rollouts(model, tiny_tokenizer, n_questions=1, num_samples=4)
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    enable_activation_checkpointing(ckpt)
    for m in (plain, ckpt):
        train_mode_without_dropout(m)
        rlsc_update(m, torch.optim.SGD(m.parameters(), lr=1.0), rollouts, LossOptions(micro_batch_size=2, filter_eps=None))
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_step_runs_and_stays_close_to_fp32(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=8)
    rollouts = _rollouts(model, tiny_tokenizer, n_questions=1, num_samples=3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    sa = rlsc_update(a, torch.optim.SGD(a.parameters(), lr=0.0), rollouts, LossOptions(micro_batch_size=3))
    sb = rlsc_update(b, torch.optim.SGD(b.parameters(), lr=0.0), rollouts,
                     LossOptions(micro_batch_size=3, autocast_dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in b.parameters())  # master weights stay fp32
    # bf16 matmuls: a few parts in 10^2 of the per-token log-prob scale
    torch.testing.assert_close(sb.seq_logp, sa.seq_logp, rtol=0.05, atol=0.05 * float(sa.n_tokens.max()))


def test_lora_trains_only_adapters(tiny_tokenizer):
    pytest.importorskip("peft")
    from rlsc.models import apply_lora

    model = apply_lora(make_model(tiny_tokenizer, seed=9), rank=4, alpha=8.0, target_modules="q_proj,v_proj")
    rollouts = _rollouts(model, tiny_tokenizer, n_questions=1, num_samples=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rlsc_update(model, _adamw(model, 1e-3), rollouts, LossOptions(micro_batch_size=2))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)  # lora_A moves from step 2 on (lora_B starts at 0)


def test_group_weighting_update_equals_naive_softmax_weighted_loss(tiny_tokenizer):
    tok = tiny_tokenizer
    model = make_model(tok, seed=4)
    rollouts = _rollouts(model, tok, n_questions=2, num_samples=3)
    fused, naive = copy.deepcopy(model), copy.deepcopy(model)
    rlsc_update(fused, torch.optim.SGD(fused.parameters(), lr=1.0), rollouts,
                LossOptions(weighting="group", alpha=0.1, micro_batch_size=2, filter_eps=None))
    _, L = naive_algorithm1_loss(naive, rollouts, 0.5, 0.1)
    w = group_weights(L.detach().float(), rollouts.question_index, 0.1).double()
    (-(w * L).mean()).backward()
    torch.optim.SGD(naive.parameters(), lr=1.0).step()
    # the updates (lr 1: the gradients) agree to fp32 summation error relative to their largest entry
    for p0, p, q in zip(model.parameters(), fused.parameters(), naive.parameters()):
        du_fused, du_naive = (p - p0).detach().double(), (q - p0).detach().double()
        assert (du_fused - du_naive).abs().max() <= 1e-4 * du_naive.abs().max() + 1e-9


def test_a_question_posed_twice_in_a_step_is_one_group(tiny_tokenizer):
    """`group` weighting: one definition for both engines, the samples of the same question (the
    same Problem id, the TRL engine's dataset row) in the step, however many times it is posed."""
    model = make_model(tiny_tokenizer, seed=3)
    a, b = Problem("a", "What is 2 * 3?", "", "t"), Problem("b", "Hi", "", "t")
    torch.manual_seed(0)
    r = sample(model, tiny_tokenizer, [a, b, a], template="{question}", num_samples=2, max_new_tokens=5,
               temperature=0.9)
    assert r.question_index.tolist() == [0, 0, 1, 1, 0, 0]
    L = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    w = group_weights(L, r.question_index, 0.1)
    assert w[[0, 1, 4, 5]].sum() == pytest.approx(1 + 4 * 0.1) and w[[2, 3]].sum() == pytest.approx(1 + 2 * 0.1)


def test_mask_truncated_drops_cut_off_samples_from_the_loss(tiny_tokenizer):
    """mask_truncated=True: the gradient is that of the finished samples alone, still divided by the
    step's S (their weights and L are unchanged); group weights are a softmax over finished ones."""
    model = make_model(tiny_tokenizer, seed=2)
    r = _mixed_rollouts(model, tiny_tokenizer)
    assert r.capped.any() and (~r.capped).any()
    grads = {}
    for name, rollouts, mask_truncated in (("masked", r, True), ("finished only", r.select(~r.capped), False)):
        m = copy.deepcopy(model)
        opt = _GradRecordingAdamW(m.parameters(), lr=0.0)
        stats = rlsc_update(m, opt, rollouts, LossOptions(temperature=0.5, filter_eps=None, micro_batch_size=3,
                                                          mask_truncated=mask_truncated))
        grads[name] = [g * (len(rollouts) / len(r)) for g in opt.seen_grads.values()]  # both as / S_total
        if mask_truncated:
            assert (stats.seq_logp[r.capped] == 0).all() and (stats.n_tokens == r.completion_lengths).all()
    for got, ref in zip(grads["masked"], grads["finished only"]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    keep = ~r.capped
    w = group_weights(torch.randn(len(r)), r.question_index, 0.1, keep)
    assert torch.allclose(w[~keep], torch.full_like(w[~keep], 0.1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_prompt_scoring_equals_the_whole_sequence_forward(tiny_tokenizer, dtype):
    """completion_hidden_states(share_prompts=True): two questions of different prompt lengths
    (left padding) x 5 samples, rows ending early and rows at the cap: each prompt runs once, and
    the hidden states and the parameters' gradients of a loss on them equal the whole-sequence
    forward's to rounding (relative to each tensor's largest entry)."""
    from rlsc.step import _shared_prompt_hidden_states, completion_hidden_states
    from rlsc.models import body_and_head

    tok = tiny_tokenizer
    model = make_model(tok, seed=3).to(dtype)
    torch.manual_seed(2)
    problems = [Problem("a", "What is 12 * 7?", "", "t"), Problem("b", "Hi: is 3 + 4 more than 9, or less?", "", "t")]
    r = sample(model, tok, problems, template="{question}", num_samples=5, max_new_tokens=10, temperature=0.9)
    r.completion_ids[1, 3] = r.completion_ids[6, 0] = tok.eos_token_id   # one short row, one EOS-only row
    mask, r.capped = completion_mask_from_ids(r.completion_ids, [tok.eos_token_id])
    r.completion_ids, r.completion_mask = r.completion_ids.masked_fill(~mask, tok.pad_token_id), mask
    assert (~r.prompt_mask[:5]).any() and r.prompt_mask[5:].all()       # the first question is left-padded
    assert mask.sum(-1).min() == 1 and mask.sum(-1).max() == 10 and len(r) == 10
    body, _ = body_and_head(model)
    calls = []
    hook = body.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    results = []
    for share in (False, True):
        model.zero_grad()
        calls.clear()
        h = completion_hidden_states(body, r, share_prompts=share)
        (h * torch.linspace(-1, 1, h.shape[-1], dtype=dtype)).sum().backward()
        results.append((h.detach(), [p.grad.clone() for p in model.parameters()], list(calls)))
    hook.remove()
    (h_full, g_full, c_full), (h_shared, g_shared, c_shared) = results
    P, L = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    assert c_full == [(10, P + L)] and c_shared == [(2, P), (10, L)]
    # float64 up to transformers' RMSNorm, which computes in float32 whatever the model's dtype:
    # the prompt's gradients summed over its 5 rows before that norm's backward, not after, round
    # differently (measured 3e-8 of the largest entry; a wrong position or mask is O(1))
    tol = 1e-6 if dtype == torch.float64 else 2e-5
    assert (h_shared - h_full).abs().max() <= tol * h_full.abs().max()
    for a, b in zip(g_shared, g_full):
        assert (a - b).abs().max() <= tol * b.abs().max()
    assert _shared_prompt_hidden_states(body, r.select(slice(0, 10, 5)), torch.autocast("cpu", enabled=False)) is None


def test_shared_prompt_scoring_under_bf16_autocast_and_its_fallbacks(tiny_tokenizer):
    """Under bf16 autocast the shared forward stays within the whole-sequence forward's own bf16
    error (against float64); with activation checkpointing it falls back to the whole sequence."""
    from rlsc.models import enable_activation_checkpointing
    from rlsc.step import _shared_prompt_hidden_states, completion_hidden_states
    from rlsc.models import body_and_head

    tok = tiny_tokenizer
    model = make_model(tok, seed=4)
    r = _rollouts(model, tok, max_new_tokens=12)
    ref = completion_hidden_states(body_and_head(copy.deepcopy(model).double())[0], r)
    body, _ = body_and_head(model)
    with torch.no_grad():
        full = completion_hidden_states(body, r, torch.bfloat16).double()
        shared = completion_hidden_states(body, r, torch.bfloat16, share_prompts=True).double()
    mask = r.completion_mask
    err_full = (full - ref)[mask].abs().max()
    err_shared = (shared - ref)[mask].abs().max()
    assert err_full > 0 and err_shared <= 2 * err_full + 1e-3, (err_shared, err_full)
    model.train()
    enable_activation_checkpointing(model)
    assert _shared_prompt_hidden_states(body, r, torch.autocast("cpu", enabled=False)) is None


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_share_prompts_option_gives_the_same_update(tiny_tokenizer, autocast_dtype):
    """LossOptions(share_prompts=True): the RLSC update through the shared-prompt scoring equals
    the default's to rounding (fp32: 1e-5 of the largest gradient entry; bf16 autocast: within
    the default's own bf16 error against an fp32 update), with two body calls per micro-batch."""
    from rlsc.models import body_and_head

    tok = tiny_tokenizer
    base = make_model(tok, seed=6)
    r = _rollouts(base, tok, max_new_tokens=12)
    grads, calls = {}, {}
    for share, dtype in ((False, None), (False, autocast_dtype), (True, autocast_dtype)):
        model = copy.deepcopy(base)
        seen = []
        body, _ = body_and_head(model)
        body.register_forward_pre_hook(lambda m, a: seen.append(1))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        rlsc_update(model, opt, r, LossOptions(temperature=0.7, micro_batch_size=5, filter_eps=None,
                                               autocast_dtype=dtype, share_prompts=share))
        grads[(share, dtype)] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        calls[(share, dtype)] = len(seen)
    assert calls[(True, autocast_dtype)] == 2 * calls[(False, autocast_dtype)] == 4
    ref, default, shared = grads[(False, None)], grads[(False, autocast_dtype)], grads[(True, autocast_dtype)]
    for g_ref, g_def, g_sh in zip(ref, default, shared):
        scale = g_ref.abs().max()
        if autocast_dtype is None:
            assert (g_sh - g_def).abs().max() <= 1e-5 * scale
        else:
            assert (g_sh - g_ref).abs().max() <= 2 * (g_def - g_ref).abs().max() + 1e-3 * scale


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "gemma2-softcap", "cohere-scaled"])
@pytest.mark.parametrize("attention", ["eager", "sdpa", "fa2-emulation"])
def test_shared_prompt_scoring_across_families_and_attention(family, attention):
    """The shared-prompt forward against the whole-sequence one in fp32 for every family and
    attention implementation the on-policy tests cover (FlashAttention-2's masking emulated on
    CPU), two left-padded questions x 3 samples: the same completion hidden states to rounding."""
    import fa2_emulation
    from test_on_policy import PROBLEMS, build

    from conftest import make_tokenizer
    from rlsc.models import body_and_head
    from rlsc.step import _shared_prompt_hidden_states, completion_hidden_states, train_mode_without_dropout

    tok = make_tokenizer()
    model = build(family, fa2_emulation.NAME if attention == "fa2-emulation" else attention, tok)
    torch.manual_seed(1)
    r = sample(model, tok, PROBLEMS, template="{question}", num_samples=3, max_new_tokens=8, temperature=0.7)
    assert (~r.prompt_mask).any()   # left padding in the batch
    train_mode_without_dropout(model)
    body, _ = body_and_head(model)
    with torch.no_grad():
        full = completion_hidden_states(body, r)
        shared = _shared_prompt_hidden_states(body, r, torch.autocast("cpu", enabled=False))
    assert shared is not None, f"{family} fell back to the whole-sequence forward"
    m = r.completion_mask
    assert (shared - full)[m].abs().max() <= 1e-5 * full[m].abs().max(), family
