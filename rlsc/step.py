"""One RLSC training step, in the order of the paper's Algorithm 1:

    1. sample   N completions per question at temperature T          (sampling.sample)
    2. mask     keep the completion tokens, up to and including EOS   (Rollouts.completion_mask)
    3. score    L_s = sum_t log_softmax(W h_t / T)[y_t] from the body's final hidden states
                through the fused op: no [samples x length x vocab] logits are ever formed
    4. weigh    w_s = p_old(y_s|x) + alpha = exp(L_s).detach() + alpha  (inside the op, in log space)
    5. step     loss = -(1/S) sum_s w_s L_s; backward; AdamW step

Micro-batches accumulate gradients exactly: each w_s depends on sample s only, so the op is
called with reduction="sum" and every micro-batch loss is scaled by 1 / S_total.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

import rlsc_kernels as rk

from .data import Problem
from .models import body_and_head
from .sampling import Rollouts, sample


@dataclass(frozen=True)
class LossOptions:
    temperature: float = 0.5
    alpha: float = 0.1
    weighting: str = "rlsc"      # rlsc, rlsc-l1, entropy, length, group
    filter_eps: object = "auto"  # "auto", None (exact) or a float
    backend: str = "auto"
    micro_batch_size: int = 4
    max_grad_norm: float = 0.0
    autocast_dtype: torch.dtype | None = None


@dataclass
class StepStats:
    loss: float
    seq_logp: torch.Tensor          # [S] float32
    seq_weight: torch.Tensor        # [S] float32
    n_tokens: torch.Tensor          # [S] int64
    capped: torch.Tensor            # [S] bool
    mean_token_entropy: float
    grad_norm: float
    frac_weight_underflow: float
    extra: dict = field(default_factory=dict)


def completion_hidden_states(body, rollouts: Rollouts, autocast_dtype=None) -> torch.Tensor:
    """Final hidden states [B, L, D] aligned with the completion block: [:, t] predicts completion token t.

    The whole sequence (left-padded prompt + completion) runs through the body with explicit
    position ids, so left padding does not shift positions; padding after EOS is masked out of
    attention and never selected afterwards.
    """
    P = rollouts.prompt_ids.shape[1]
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    amp = (torch.autocast(input_ids.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    with amp:
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, P - 1 : P - 1 + rollouts.completion_ids.shape[1]]


def _trim(rollouts: Rollouts) -> Rollouts:
    """Drops completion columns that are padding in every row of this micro-batch."""
    L = int(rollouts.completion_mask.sum(-1).max())
    return Rollouts(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids[:, :L],
                    rollouts.completion_mask[:, :L], rollouts.capped, rollouts.question_index)


def _packed(hidden: torch.Tensor, rollouts: Rollouts):
    """Completion tokens only: hidden [n, D], targets [n], seq_index [n]."""
    mask = rollouts.completion_mask
    seq = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return hidden[mask], rollouts.completion_ids[mask], seq


def _head_inputs(head, hidden, autocast_dtype=None):
    """(hidden, weight, bias) in one dtype for the fused op. Under autocast the body may return
    fp32 or bf16 states and the master weight is fp32: both go to the autocast dtype (the head's
    matmuls in bf16, like the rest of the model; gradients flow back to the fp32 weight)."""
    dtype = autocast_dtype or hidden.dtype
    weight, bias = head.weight, head.bias
    if weight.dtype != dtype:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return hidden.to(dtype), weight, bias


@torch.no_grad()
def sequence_logprobs(model, rollouts: Rollouts, opts: LossOptions) -> torch.Tensor:
    """L_s for every sample [S] float32 (no graph), micro-batched: the input of group weights."""
    body, head = body_and_head(model)
    out = []
    for start in range(0, len(rollouts), opts.micro_batch_size):
        mb = _trim(rollouts.select(slice(start, start + opts.micro_batch_size)))
        h, y, seq = _packed(completion_hidden_states(body, mb, opts.autocast_dtype), mb)
        h, w, b = _head_inputs(head, h, opts.autocast_dtype)
        logp = rk.linear_logprobs(h, w, y, bias=b, temperature=opts.temperature, backend=opts.backend)
        out.append(torch.zeros(len(mb), dtype=torch.float32, device=h.device).index_add_(0, seq, logp.float()))
    return torch.cat(out)


def group_weights(seq_logp: torch.Tensor, question_index: torch.Tensor, alpha: float) -> torch.Tensor:
    """softmax of L_s over the samples of each question (in log space, so no underflow) + alpha."""
    L = seq_logp.double()
    w = torch.empty_like(L)
    for q in question_index.unique():
        sel = question_index == q
        w[sel] = torch.softmax(L[sel], dim=0)
    return (w + alpha).float()


def _underflow(seq_weight: torch.Tensor, weighting: str, alpha: float) -> float:
    """Fraction of samples whose weight is indistinguishable from the constant alpha (p_old lost to underflow)."""
    if weighting in ("rlsc", "length", "group"):
        return float((seq_weight == torch.tensor(alpha, dtype=torch.float32)).float().mean())
    if weighting == "rlsc-l1":
        return float((seq_weight == 0).float().mean())
    return 0.0


def rlsc_update(model, optimizer, rollouts: Rollouts, opts: LossOptions) -> StepStats:
    """Steps 2-5 of Algorithm 1 on given samples: mask, score, weigh, one optimizer step."""
    body, head = body_and_head(model)
    S_total = len(rollouts)
    external = None
    if opts.weighting == "group":
        external = group_weights(sequence_logprobs(model, rollouts, opts), rollouts.question_index, opts.alpha)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    logps, weights, ntoks, ent_sum, ent_count = [], [], [], 0.0, 0
    for start in range(0, S_total, opts.micro_batch_size):
        mb = _trim(rollouts.select(slice(start, start + opts.micro_batch_size)))   # 2. mask
        hidden = completion_hidden_states(body, mb, opts.autocast_dtype)             # 3. score ...
        h, y, seq = _packed(hidden, mb)
        h, weight, bias = _head_inputs(head, h, opts.autocast_dtype)
        weighting = opts.weighting if external is None else external[start : start + len(mb)]
        out = rk.linear_rlsc_loss(                                                   # ... 4. weigh
            h, weight, y, seq_index=seq, bias=bias, temperature=opts.temperature, alpha=opts.alpha,
            weighting=weighting, reduction="sum", filter_eps=opts.filter_eps, backend=opts.backend,
            return_entropy=True,
        )
        (out.loss / S_total).backward()                                              # exact accumulation
        loss_sum += float(out.loss.detach()) / S_total
        logps.append(out.seq_logp.detach().float())
        weights.append(out.seq_weight.float())
        ntoks.append(out.n_tokens)
        if out.token_entropy is not None:
            ent_sum += float(out.token_entropy.detach().double().sum())
            ent_count += out.token_entropy.numel()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # max_norm = inf measures the norm without clipping
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm > 0 else float("inf")))
    optimizer.step()                                                                 # 5. step
    optimizer.zero_grad(set_to_none=True)
    seq_weight = torch.cat(weights)
    return StepStats(
        loss=loss_sum,
        seq_logp=torch.cat(logps).cpu(),
        seq_weight=seq_weight.cpu(),
        n_tokens=torch.cat(ntoks).cpu(),
        capped=rollouts.capped.cpu(),
        mean_token_entropy=ent_sum / max(ent_count, 1),
        grad_norm=grad_norm,
        frac_weight_underflow=_underflow(seq_weight.cpu(), opts.weighting, opts.alpha),
    )


def train_mode_without_dropout(model) -> None:
    """Train mode (so gradient checkpointing engages) with every dropout off: the scored
    distribution must be the one the samples came from (p = p_old at the step)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or "Dropout" in type(m).__name__:
            m.eval()


def rlsc_step(model, tokenizer, optimizer, problems: list[Problem], *, template: str, num_samples: int,
              max_new_tokens: int, opts: LossOptions) -> tuple[StepStats, float, float]:
    """One full step of Algorithm 1: (stats, generation seconds, training seconds)."""
    t0 = time.perf_counter()
    rollouts = sample(model, tokenizer, problems, template=template, num_samples=num_samples,  # 1. sample
                      max_new_tokens=max_new_tokens, temperature=opts.temperature,
                      autocast_dtype=opts.autocast_dtype)
    t1 = time.perf_counter()
    train_mode_without_dropout(model)
    stats = rlsc_update(model, optimizer, rollouts, opts)                            # 2-5
    model.eval()
    return stats, t1 - t0, time.perf_counter() - t1
