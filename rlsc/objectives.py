"""RLSC's label-free siblings on the same step: `--objective`, as each paper defines it.

    rlsc      the paper's loss -sum_s w_s L_s with --weighting (rlsc/step.py, unchanged)
    intuitor  Intuitor / RLIF (arXiv 2505.19590): reward = self-certainty KL(U || p) averaged over
              the response tokens; GRPO group advantages; no gradient through the reward
    em-ft     entropy minimisation, fine-tuning form (arXiv 2505.15134; one-shot EM 2505.20282):
              loss = mean token entropy over all response tokens of the step; gradient through H
    em-rl     entropy minimisation, RL form (2505.15134): reward = -sum of the response's token
              entropies; GRPO group advantages
    rent      RENT (arXiv 2505.22660): reward = -mean token entropy of the response; GRPO advantages
    ttrl      TTRL (arXiv 2504.16084): reward 1 if the response's answer is the majority answer
              among the question's samples (math-verify equivalence, as maj@k in rlsc/evaluate.py), else 0

--engine trl (rlsc/trl_engine.py) trains the reward objectives through sequence_sums and
engine_weights below, and em-ft through entropy_sums. For TRL's GRPOTrainer: ttrl_reward here, and rlsc_kernels.integrations.trl_rewards.LabelFreeReward
(self-certainty, -mean entropy, -sum entropy from the policy's hidden states through the op).

Reward objectives share one policy-gradient step (on-policy, one update per batch of fresh
samples, so GRPO's ratio is 1 and its clip is inactive; no KL term, no reference model):
    A_i  = (r_i - mean_{j in q(i)} r_j) / (std_{j in q(i)} r_j + 1e-6)   (std unbiased, as TRL)
    loss = -(1/S) sum_i A_i * (1/n_i) sum_t log p(y_i,t)                (GRPO's per-sequence mean)
computed by linear_rlsc_loss with the external weights A_i / n_i. Every reward comes from the fused
op (rlsc_kernels.linear_token_stats) on the body's hidden states, never from [S, L, V] logits, at
the sampling temperature (the distribution the samples came from), in a no-grad scoring pass
before the update. The same pass gives the collapse guard's diagnostics (rlsc/guard.py) for every
objective. RLSC has no reward to compute: without a guard it takes them from its loss pass (no
extra forward); with a guard, which must judge the samples before the update, it pays one extra
no-grad body forward per step.
"""
from __future__ import annotations

import math

import torch

import rlsc_kernels as rk

from .sampling import Rollouts, decode_completions
from .step import LossOptions, Scorer, StepStats, rlsc_update

#: objectives that turn a per-sample reward into GRPO group advantages
REWARD_OBJECTIVES = ("intuitor", "em-rl", "rent", "ttrl")
ADVANTAGE_EPS = 1e-6


def _micro_batches(rollouts: Rollouts, size: int):
    """(start, micro-batch) with completion columns that are padding in every row dropped."""
    for start in range(0, len(rollouts), size):
        mb = rollouts.select(slice(start, start + size))
        L = int(mb.completion_mask.sum(-1).max())
        yield start, Rollouts(mb.prompt_ids, mb.prompt_mask, mb.completion_ids[:, :L], mb.completion_mask[:, :L],
                              mb.capped, mb.question_index)


def sequence_sums(h, w, b, y, seq, S: int, *, temperature: float, backend: str, softcap=None) -> torch.Tensor:
    """Per-sample sums [3, S] float64 of (log p, entropy, self-certainty) over the completion tokens
    h [n, D] / y [n] / seq [n] of S samples, from the fused op (no gradient)."""
    with torch.no_grad():
        st = rk.linear_token_stats(h, w, y, bias=b, temperature=temperature, backend=backend, softcap=softcap,
                                   filter_eps=None, check_values=False)
        out = torch.zeros(3, S, dtype=torch.float64, device=h.device)
        for row, values in enumerate((st.logp, st.entropy, st.self_certainty)):
            out[row].index_add_(0, seq, values.double())
    return out


def entropy_sums(h, w, b, y, seq, S: int, settings: dict, softcap=None):
    """--engine trl, em-ft: (loss = sum of the tokens' entropies, differentiable; seq_logp [S];
    seq_weight zeros [S]; n_tokens [S]; token_entropy) in the shape of linear_rlsc_loss's output."""
    logp, entropy = rk.linear_logprobs(h, w, y, bias=b, temperature=settings["temperature"], return_entropy=True,
                                       filter_eps=settings["filter_eps"], backend=settings["backend"],
                                       check_values=False, **({"softcap": softcap} if softcap is not None else {}))
    zeros = torch.zeros(S, dtype=torch.float32, device=h.device)
    # a dataclass output (not a namespace): DDP finds the tensors in it, as in linear_rlsc_loss's output
    return rk.RLSCLossOutput(
        loss=entropy.sum(), seq_logp=zeros.index_add(0, seq, logp.detach().float()), seq_weight=zeros,
        token_logp=logp.detach(), token_entropy=entropy,
        n_tokens=torch.zeros(S, dtype=torch.int64, device=h.device).index_add_(0, seq, torch.ones_like(seq)))


def engine_weights(objective: str, sums: torch.Tensor, rollouts: Rollouts, texts: list[str] | None,
                   gather, gather_object, rank: int) -> torch.Tensor:
    """--engine trl: the external weights A_i / n_i [n] float32 of this process's n samples, from its
    per-sample sums [3, n] (sequence_sums) and every process's (gathered: a question's samples may
    sit on several processes; gather concatenates in rank order, as the engine's group weights)."""
    n = len(rollouts)
    all_sums = gather(sums.T.contiguous()).T
    all_n = gather(rollouts.completion_mask.sum(-1))
    all_q = gather(rollouts.question_index)
    all_texts = gather_object(texts) if texts is not None else None
    scores = {"seq_logp": all_sums[0], "entropy": all_sums[1], "self_certainty": all_sums[2], "n_tokens": all_n}
    rewards = rewards_for(objective, scores, all_texts, all_q)
    coef = group_advantages(rewards, all_q) / all_n.double().clamp(min=1)
    return coef[rank * n:(rank + 1) * n].float()


@torch.no_grad()
def score_rollouts(scorer: Scorer, rollouts: Rollouts, opts: LossOptions) -> dict:
    """Per-sample sums over the response tokens [S] float64, from the fused op at the sampling
    distribution: seq_logp, entropy (sum of H_t), self_certainty (sum of SC_t), n_tokens (int64)."""
    S = len(rollouts)
    device = rollouts.completion_ids.device
    out = {k: torch.zeros(S, dtype=torch.float64, device=device) for k in ("seq_logp", "entropy", "self_certainty")}
    out["n_tokens"] = rollouts.completion_mask.sum(-1).long()
    for start, mb in _micro_batches(rollouts, opts.micro_batch_size):
        h, w, b, y, seq = scorer.packed(mb)  # every completion token (the diagnostics see them all)
        sums = sequence_sums(h, w, b, y, seq, len(mb), backend=opts.backend, **scorer.head.op_options(opts.temperature))
        for row, key in enumerate(("seq_logp", "entropy", "self_certainty")):
            out[key][start:start + len(mb)] = sums[row]
    return out


def majority_votes(texts: list[str], question_index: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """TTRL's reward per sample [S] float64 (1 = its answer is its question's majority answer, the
    votes grouped by math-verify equivalence, ties to the answer seen first, unparsed answers do
    not vote and get 0) and each question's agreement (share of its samples in the majority)."""
    from .grading import answer_keys, extract_answer

    rewards = torch.zeros(len(texts), dtype=torch.float64)
    agreement = []
    for q in dict.fromkeys(question_index.tolist()):
        idx = [i for i, qi in enumerate(question_index.tolist()) if qi == q]
        keys = answer_keys([extract_answer(texts[i]) for i in idx])
        votes: dict[str, int] = {}
        for k in keys:
            if k is not None:
                votes[k] = votes.get(k, 0) + 1
        if not votes:
            agreement.append(0.0)
            continue
        top = max(votes.values())
        winner = next(k for k in keys if k is not None and votes[k] == top)
        for i, k in zip(idx, keys):
            rewards[i] = float(k == winner)
        agreement.append(top / len(idx))
    return rewards, agreement


def ttrl_reward(prompts, completions, **kwargs) -> list[float]:
    """TTRL's majority-vote reward as a TRL GRPOTrainer reward function: completions of the same
    prompt (GRPOTrainer repeats each prompt num_generations times) vote with their math-verify
    answers; 1.0 for the majority answer, else 0.0. Conversational completions use their last
    message's content."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    groups: dict[str, int] = {}
    index = torch.tensor([groups.setdefault(repr(p), len(groups)) for p in prompts])
    return majority_votes(texts, index)[0].tolist()


def group_advantages(rewards: torch.Tensor, question_index: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps) over each question's samples [S] float64; a group
    of one sample (std undefined) or of equal rewards gets advantage 0."""
    r = rewards.double()
    adv = torch.zeros_like(r)
    q_index = question_index.to(r.device)
    for q in q_index.unique():
        sel = q_index == q
        group = r[sel]
        if group.numel() < 2:
            continue
        adv[sel] = (group - group.mean()) / (group.std() + eps)
    return adv


def rewards_for(objective: str, scores: dict, texts: list[str] | None, question_index: torch.Tensor) -> torch.Tensor:
    """Each reward objective's per-sample reward [S] float64 (see the module docstring)."""
    n = scores["n_tokens"].double().clamp(min=1)
    if objective == "intuitor":
        return scores["self_certainty"] / n
    if objective == "em-rl":
        return -scores["entropy"]
    if objective == "rent":
        return -scores["entropy"] / n
    if objective == "ttrl":
        if texts is None:
            raise ValueError("the ttrl objective needs the decoded completions")
        return majority_votes(texts, question_index.cpu())[0].to(n.device)
    raise ValueError(f"{objective!r} is not a reward objective; reward objectives are {REWARD_OBJECTIVES}")


def _finish(model, optimizer, opts: LossOptions, loss_sum: float) -> tuple[float, bool]:
    """Gradient norm (clipped if asked), then the optimizer step unless something is not finite."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm > 0 else float("inf")))
    skipped = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def policy_gradient_update(model, optimizer, rollouts: Rollouts, opts: LossOptions, advantages: torch.Tensor,
                           scorer: Scorer) -> StepStats:
    """One step of loss = -(1/S) sum_i A_i mean_t log p(y_i,t) through the fused single pass."""
    S = len(rollouts)
    coef = (advantages.double() / rollouts.completion_mask.sum(-1).double().clamp(min=1)).float()
    optimizer.zero_grad(set_to_none=True)
    losses, logps, ent_sum, ent_count = [], [], 0.0, 0
    for start, mb in _micro_batches(rollouts, opts.micro_batch_size):
        h, w, b, y, seq = scorer.packed(mb, opts.mask_truncated)
        out = rk.linear_rlsc_loss(h, w, y, seq_index=seq, num_sequences=len(mb), bias=b,
                                  weighting=coef[start:start + len(mb)].to(h.device), reduction="sum",
                                  filter_eps=opts.filter_eps, backend=opts.backend, return_entropy=True,
                                  check_values=False, **scorer.head.op_options(opts.temperature))
        (out.loss / S).backward()
        losses.append(float(out.loss.detach()) / S)
        logps.append(out.seq_logp.detach().float().cpu())
        ent_sum += float(out.token_entropy.detach().double().sum())
        ent_count += out.token_entropy.numel()
    loss_sum = sum(losses)
    grad_norm, skipped = _finish(model, optimizer, opts, loss_sum)
    return StepStats(loss=loss_sum, seq_logp=torch.cat(logps), seq_weight=coef.cpu(),
                     n_tokens=rollouts.completion_mask.sum(-1).cpu(), capped=rollouts.capped.cpu(),
                     mean_token_entropy=ent_sum / max(ent_count, 1), grad_norm=grad_norm, frac_weight_underflow=0.0,
                     skipped=skipped)


def entropy_minimisation_update(model, optimizer, rollouts: Rollouts, opts: LossOptions, scorer: Scorer) -> StepStats:
    """EM-FT: one step of loss = (1/N) sum over all N response tokens of the step of H_t (with
    --mask-truncated, of the completions that ended)."""
    kept = rollouts.completion_mask & ~rollouts.capped[:, None] if opts.mask_truncated else rollouts.completion_mask
    N = int(kept.sum())
    optimizer.zero_grad(set_to_none=True)
    loss_sum, logps = 0.0, []
    for start, mb in _micro_batches(rollouts, opts.micro_batch_size):
        h, w, b, y, seq = scorer.packed(mb, opts.mask_truncated)
        logp, entropy = rk.linear_logprobs(h, w, y, bias=b, return_entropy=True, filter_eps=opts.filter_eps,
                                           backend=opts.backend, check_values=False,
                                           **scorer.head.op_options(opts.temperature))
        loss = entropy.sum() / max(N, 1)
        loss.backward()
        loss_sum += float(loss.detach())
        logps.append(torch.zeros(len(mb), dtype=torch.float32).index_add_(0, seq.cpu(), logp.detach().float().cpu()))
    grad_norm, skipped = _finish(model, optimizer, opts, loss_sum)
    return StepStats(loss=loss_sum, seq_logp=torch.cat(logps), seq_weight=torch.zeros(len(rollouts)),
                     n_tokens=rollouts.completion_mask.sum(-1).cpu(), capped=rollouts.capped.cpu(),
                     mean_token_entropy=loss_sum, grad_norm=grad_norm, frac_weight_underflow=0.0, skipped=skipped)


def diagnostics(scores: dict, agreement: list[float], alpha: float) -> dict:
    """The collapse guard's label-free numbers of one step's samples, measured before its update:
    mean token entropy and self-certainty (nats, over all response tokens), agreement (mean over
    questions of the share of samples giving the majority answer), mean completion length, and
    weight_underflow (share of samples whose RLSC weight exp(L) + alpha is alpha in float32)."""
    n = scores["n_tokens"].double()
    total = float(scores.get("scored_tokens", n).sum())   # the loss pass scores only kept samples' tokens
    weights = rk.rlsc_weights(scores["seq_logp"].float(), scores["n_tokens"], "rlsc", alpha)
    return {
        "weight_underflow": float((weights == torch.tensor(alpha, dtype=torch.float32)).double().mean()),
        "token_entropy": float(scores["entropy"].sum()) / max(total, 1.0),
        "self_certainty": float(scores["self_certainty"].sum()) / max(total, 1.0),
        "agreement": sum(agreement) / max(len(agreement), 1),
        "completion_tokens": float(n.mean()) if n.numel() else 0.0,
    }


def make_update(objective: str, tokenizer, guard=None):
    """The update function rlsc.step.rlsc_step calls: (model, optimizer, rollouts, opts) -> StepStats.

    It scores the samples (no grad), records the diagnostics in StepStats.extra, asks `guard`
    (rlsc.guard.Guard or None) whether to stop BEFORE updating (then the update is not applied and
    extra["guard_stop"] says why), and then takes the objective's step."""

    def update(model, optimizer, rollouts: Rollouts, opts: LossOptions) -> StepStats:
        texts = decode_completions(tokenizer, rollouts)
        votes, agreement = majority_votes(texts, rollouts.question_index.cpu())
        if objective == "rlsc" and guard is None:   # nothing to decide before the update: the loss pass measures
            stats = rlsc_update(model, optimizer, rollouts, opts, scores=True)
            stats.extra.update(diagnostics(stats.extra.pop("scores"), agreement, opts.alpha))
            return stats
        scorer = Scorer(model, opts.autocast_dtype, share_prompts=opts.share_prompts)
        scores = score_rollouts(scorer, rollouts, opts)
        diag = diagnostics(scores, agreement, opts.alpha)
        reason = guard.check(diag) if guard is not None else None
        if reason is not None:
            optimizer.zero_grad(set_to_none=True)
            n = scores["n_tokens"].cpu()
            stats = StepStats(loss=float("nan"), seq_logp=scores["seq_logp"].float().cpu(),
                              seq_weight=torch.zeros(len(rollouts)), n_tokens=n, capped=rollouts.capped.cpu(),
                              mean_token_entropy=diag["token_entropy"], grad_norm=0.0, frac_weight_underflow=0.0)
        elif objective == "rlsc":
            del scorer  # rlsc_update makes its own (one weight copy at a time)
            stats = rlsc_update(model, optimizer, rollouts, opts)
        elif objective == "em-ft":
            stats = entropy_minimisation_update(model, optimizer, rollouts, opts, scorer)
        else:
            rewards = votes.to(scores["entropy"].device) if objective == "ttrl" else rewards_for(
                objective, scores, None, rollouts.question_index)
            advantages = group_advantages(rewards, rollouts.question_index)
            stats = policy_gradient_update(model, optimizer, rollouts, opts, advantages, scorer)
            stats.extra["mean_reward"] = float(rewards.mean())
        stats.extra.update(diag)
        if reason is not None:
            stats.extra["guard_stop"] = reason
        return stats

    return update
