"""Each label-free objective's step against its paper's formula computed in float64 from full
logits on a tiny model: rewards, GRPO advantages, loss and every parameter's gradient."""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch

from rlsc.data import Problem
from rlsc.grading import answer_keys, extract_answer
from rlsc.objectives import group_advantages, majority_votes, make_update
from rlsc.sampling import decode_completions, sample
from rlsc.step import LossOptions

from conftest import make_model

T = 0.7


class _GradRecordingSGD(torch.optim.SGD):
    """Keeps a copy of the gradients it was asked to apply (lr 0: the weights stay put)."""

    def step(self, closure=None):
        self.seen_grads = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]}
        return super().step(closure)


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    tok = tiny_tokenizer
    model = make_model(tok, seed=4)
    with torch.no_grad():  # peaked enough that entropies and self-certainties differ between samples
        model.model.norm.weight.mul_(4.0)
    torch.manual_seed(2)
    problems = [Problem(str(i), f"What is {i} + {i}?", "", "t") for i in range(2)]
    rollouts = sample(model, tok, problems, template="{question}", num_samples=5, max_new_tokens=10, temperature=T)
    return tok, model, rollouts


def float64_token_stats(model, rollouts):
    """Per-token log p, entropy and self-certainty KL(U || p) [B, L] from the full float64 logits / T."""
    P = rollouts.prompt_ids.shape[1]
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1)
    attn = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1: -1].double() / T
    logq = torch.log_softmax(logits, -1)
    V = logq.shape[-1]
    logp = logq.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    self_certainty = (1.0 / V * (math.log(1.0 / V) - logq)).sum(-1)   # KL(U || p) by its definition
    m = rollouts.completion_mask.double()
    return logp * m, entropy * m, self_certainty * m, m


def reference_grpo(rewards, question_index, logp, m):
    """GRPO with one on-policy update: A = (r - mean_q) / (std_q + 1e-6); loss = -(1/S) sum_i A_i mean_t logp."""
    adv = torch.zeros_like(rewards)
    for q in question_index.unique():
        sel = question_index == q
        r = rewards[sel]
        adv[sel] = (r - r.mean()) / (r.std() + 1e-6)
    return -(adv.detach() * logp.sum(-1) / m.sum(-1)).mean(), adv


def reference_loss(objective, model64, rollouts, tok):
    logp, H, SC, m = float64_token_stats(model64, rollouts)
    n = m.sum(-1)
    if objective == "em-ft":  # EM-FT: mean token entropy, gradient through H
        return (H.sum() / m.sum()), None
    if objective == "intuitor":
        rewards = SC.sum(-1) / n
    elif objective == "em-rl":
        rewards = -H.sum(-1)
    elif objective == "rent":
        rewards = -H.sum(-1) / n
    else:  # ttrl: 1 for the majority answer among a question's samples (math-verify equivalence)
        texts = decode_completions(tok, rollouts)
        rewards = torch.zeros(len(texts), dtype=torch.float64)
        for q in rollouts.question_index.unique().tolist():
            idx = (rollouts.question_index == q).nonzero().squeeze(-1).tolist()
            keys = answer_keys([extract_answer(texts[i]) for i in idx])
            votes = Counter(k for k in keys if k is not None)
            if votes:
                top = max(votes.values())
                winner = next(k for k in keys if k is not None and votes[k] == top)
                for i, k in zip(idx, keys):
                    rewards[i] = float(k == winner)
    loss, _ = reference_grpo(rewards.detach(), rollouts.question_index, logp, m)
    return loss, rewards.detach()


@pytest.mark.parametrize("objective", ["intuitor", "em-ft", "em-rl", "rent", "ttrl"])
@pytest.mark.parametrize("micro_batch_size", [3, 16])
def test_objective_step_matches_float64_formula(setup, objective, micro_batch_size):
    tok, model, rollouts = setup
    fused, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    opt = _GradRecordingSGD([p for p in fused.parameters() if p.requires_grad], lr=0.0)
    opts = LossOptions(temperature=T, micro_batch_size=micro_batch_size, filter_eps=None, backend="auto")
    stats = make_update(objective, tok)(fused, opt, rollouts, opts)

    loss, rewards = reference_loss(objective, model64, rollouts, tok)
    loss.backward()
    loss = loss.detach()
    assert abs(stats.loss - float(loss)) <= 1e-5 * abs(float(loss)) + 1e-6, (stats.loss, float(loss))
    if rewards is not None:
        assert math.isclose(stats.extra["mean_reward"], float(rewards.mean()), rel_tol=1e-5, abs_tol=1e-6)
        assert rewards.std() > 0, "the samples must give different rewards, or the test checks nothing"
    for (name, p_fused), (_, p64) in zip(fused.named_parameters(), model64.named_parameters()):
        g, g64 = opt.seen_grads[id(p_fused)].double(), p64.grad
        scale = float(g64.abs().max())
        assert scale > 0 or objective == "ttrl", name
        assert ((g - g64).abs() <= 2e-5 * scale + 1e-9).all(), f"{objective} {name}: gradient differs beyond fp32 rounding"


@pytest.mark.parametrize("guarded", [False, True])
@pytest.mark.parametrize("micro_batch_size", [3, 16])
def test_diagnostics_match_float64_and_no_update_is_lost(setup, guarded, micro_batch_size):
    """RLSC's diagnostics: without a guard measured in the loss pass (one body forward per
    micro-batch, no scoring pass), with one in a scoring pass before the update; equal either way."""
    from rlsc.guard import Guard, parse_rules

    tok, model, rollouts = setup
    logp, H, SC, m = float64_token_stats(copy.deepcopy(model).double(), rollouts)
    trained = copy.deepcopy(model)
    opt = _GradRecordingSGD(list(trained.parameters()), lr=0.0)
    forwards = []
    hook = trained.model.register_forward_hook(lambda *a: forwards.append(1))
    guard = Guard(parse_rules("token_entropy<-1")) if guarded else None   # never fires
    stats = make_update("rlsc", tok, guard)(trained, opt, rollouts,
                                            LossOptions(temperature=T, filter_eps=None, micro_batch_size=micro_batch_size))
    hook.remove()
    micro_batches = -(-len(rollouts) // micro_batch_size)
    assert len(forwards) == micro_batches * (2 if guarded else 1)
    assert math.isclose(stats.extra["token_entropy"], float(H.sum() / m.sum()), rel_tol=1e-5)
    assert math.isclose(stats.extra["self_certainty"], float(SC.sum() / m.sum()), rel_tol=1e-5)
    assert math.isclose(stats.extra["completion_tokens"], float(m.sum(-1).mean()))
    assert 0 <= stats.extra["agreement"] <= 1 and 0 <= stats.extra["weight_underflow"] <= 1
    assert stats.loss == stats.loss  # the RLSC step itself ran (finite loss)


def test_majority_votes_group_equivalent_answers():
    texts = ["so \\boxed{4}", "\\boxed{4.0}", "\\boxed{5}", "no idea", "\\boxed{7}", "\\boxed{8}"]
    q = torch.tensor([0, 0, 0, 0, 1, 1])
    rewards, agreement = majority_votes(texts, q)
    assert rewards.tolist() == [1, 1, 0, 0, 1, 0]  # 4 == 4.0 wins; q1: a tie goes to the first answer
    assert agreement == [0.5, 0.5]


def test_group_advantages_are_grpo_and_zero_for_degenerate_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    q = torch.tensor([0, 0, 0, 1, 1, 2])
    a = group_advantages(r, q)
    g = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(a[:3], (g - g.mean()) / (g.std() + 1e-6))
    assert a[3:].tolist() == [0.0, 0.0, 0.0]  # equal rewards; a group of one
