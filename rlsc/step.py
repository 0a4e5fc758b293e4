"""One RLSC training step, in the order of the paper's Algorithm 1:

    1. sample   N completions per question at temperature T          (sampling.sample)
    2. mask     keep the completion tokens, up to and including EOS   (Rollouts.completion_mask)
    3. score    L_s = sum_t log_softmax(W h_t / T)[y_t] from the body's final hidden states
                through the fused op: no [samples x length x vocab] logits are ever formed
                (FusedHead: the head exactly as the samplers draw from it)
    4. weigh    w_s = p_old(y_s|x) + alpha = exp(L_s).detach() + alpha  (inside the op, in log space)
    5. step     loss = -(1/S) sum_s w_s L_s; backward; AdamW step (skipped, never applied, when
                the loss or the gradient norm is not finite)

Micro-batches accumulate gradients exactly: each w_s depends on sample s only, so the op is
called with reduction="sum" and every micro-batch loss is scaled by 1 / S_total.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

import rlsc_kernels as rk
from rlsc_kernels.label_free import self_certainty_from_logp
from rlsc_kernels.integrations.transformers import FusedHead
from rlsc_kernels.integrations.transformers import check_head_matches_forward as _library_head_check

from .data import Problem
from .models import body_and_head, cache_keyword, disable_dropout
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
    sampler: str = "auto"        # decode loop of rlsc.sampling.sample
    mask_truncated: bool = False # completions cut off at the cap get no tokens in the loss
    share_prompts: bool = False  # score each distinct prompt once (completion_hidden_states); opt-in, see docs/design.md


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
    skipped: bool = False           # non-finite loss or gradient: the update was not applied
    extra: dict = field(default_factory=dict)


def completion_hidden_states(body, rollouts: Rollouts, autocast_dtype=None, share_prompts: bool = False) -> torch.Tensor:
    """Final hidden states [B, L, D] aligned with the completion block: [:, t] predicts completion token t.

    The whole sequence (left-padded prompt + completion) runs through the body with explicit
    position ids, so left padding does not shift positions; padding after EOS is masked out of
    attention and never selected afterwards.
    share_prompts=True runs each distinct prompt of the batch once (a question's samples share
    it) and the completions on its KV cache, gradients flowing through both (see
    _shared_prompt_hidden_states); where that does not apply, the whole-sequence forward.
    """
    P = rollouts.prompt_ids.shape[1]
    amp = (torch.autocast(rollouts.prompt_ids.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    if share_prompts:
        hidden = _shared_prompt_hidden_states(body, rollouts, amp)
        if hidden is not None:
            return hidden
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with amp:
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, P - 1 : P - 1 + rollouts.completion_ids.shape[1]]


def _shared_prompt_hidden_states(body, rollouts: Rollouts, amp) -> torch.Tensor | None:
    """completion_hidden_states with each distinct (prompt, prompt mask) row run once: the U
    distinct prompts [U, P] go through the body with a KV cache, the cache and the last prompt
    position's hidden state are copied to the B rows (index_select: their gradients sum back),
    and the completion block [B, L] runs on that cache with the same position ids and attention
    mask as the whole-sequence forward, so every row sees the inputs it would there. The same
    hidden states to rounding (different GEMM shapes), at (U P + B L) / (B (P + L)) of the
    body's tokens: for 16 samples of one 40-token prompt and 20-token completions, 0.38.
    None (the caller runs the whole sequence) when no prompt repeats, with activation
    checkpointing (transformers drops the cache in training), with a sliding-window attention
    shorter than P + L, or when the body returns no cache."""
    B, P = rollouts.prompt_ids.shape
    L = rollouts.completion_ids.shape[1]
    if B < 2 or L == 0:
        return None
    key = torch.cat([rollouts.prompt_ids, rollouts.prompt_mask.long()], dim=1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    if unique.shape[0] == B:
        return None
    window = getattr(getattr(body, "config", None), "sliding_window", None)
    if (window is not None and P + L > window) or any(getattr(m, "gradient_checkpointing", False) for m in body.modules()):
        return None
    cache_kw = cache_keyword(body)
    if cache_kw is None:
        return None
    prompt_ids, prompt_mask = unique[:, :P], unique[:, P:]
    with amp:
        out = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                   position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0))
    cache = out.get(cache_kw) if hasattr(out, "get") else None
    if cache is None or not hasattr(cache, "reorder_cache"):
        return None
    prompt_hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    layers = getattr(cache, "layers", None)
    if layers and all(isinstance(getattr(layer, "keys", None), torch.Tensor) for layer in layers):
        for layer in layers:   # copied through float32: the backward sums a prompt's row gradients in fp32, not bf16
            layer.keys, layer.values = _rows(layer.keys, inverse), _rows(layer.values, inverse)
    else:
        cache.reorder_cache(inverse)
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
    with amp:
        out = body(input_ids=rollouts.completion_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, **{cache_kw: cache})
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return torch.cat([_rows(prompt_hidden[:, P - 1 : P], inverse), hidden[:, : L - 1]], dim=1)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0 in x's dtype, gathered in float32 for 16-bit x so that its backward
    (an index_add over the rows that share an entry) accumulates in float32."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.float().index_select(0, index).to(x.dtype)
    return x.index_select(0, index)


def _trim(rollouts: Rollouts) -> Rollouts:
    """Drops completion columns that are padding in every row of this micro-batch."""
    L = int(rollouts.completion_mask.sum(-1).max())
    return Rollouts(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids[:, :L],
                    rollouts.completion_mask[:, :L], rollouts.capped, rollouts.question_index, rollouts.sampled_logp)


def _packed(hidden: torch.Tensor, rollouts: Rollouts, mask_truncated: bool = False):
    """Completion tokens only: hidden [n, D], targets [n], seq_index [n]. mask_truncated: the
    tokens of capped samples are left out (their L_s is 0 and they get no gradient)."""
    mask = rollouts.completion_mask
    if mask_truncated:
        mask = mask & ~rollouts.capped[:, None]
    seq = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return hidden[mask], rollouts.completion_ids[mask], seq


class Scorer:
    """The model's body and head as the loss scores them during one optimizer step: FusedHead with
    the compute dtype of the run (its 16-bit weight copy made once per step, shared by the
    micro-batches), the same adapter the samplers draw from."""

    def __init__(self, model, autocast_dtype: torch.dtype | None = None, share_prompts: bool = False):
        self.body, _ = body_and_head(model)
        self.head = FusedHead(model, dtype=autocast_dtype, reuse_weight=True)
        self.autocast_dtype = autocast_dtype
        self.share_prompts = share_prompts   # a question's samples run its prompt once (completion_hidden_states)

    def packed(self, mb: Rollouts, mask_truncated: bool = False):
        """(hidden', weight', bias', targets, seq_index) of one micro-batch's completion tokens."""
        hidden = completion_hidden_states(self.body, mb, self.autocast_dtype, share_prompts=self.share_prompts)
        h, y, seq = _packed(hidden, mb, mask_truncated)
        h, w, b = self.head.inputs(h)
        return h, w, b, y, seq


def check_head_matches_forward(model, input_ids: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> None:
    """The start-of-run checks of both engines, on input_ids [1, L]: (1) the fused head's logits
    equal the model's own forward logits (rlsc_kernels' check_head_matches_forward: a head that
    transforms its logits in an unknown way would train on another distribution); (2) scoring in
    train mode is deterministic: two forwards give identical logits (a dropout the trainer could
    not switch off would make every score a different random draw)."""
    amp = (torch.autocast(input_ids.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    was_training = model.training
    try:
        model.eval()
        with amp:
            _library_head_check(model, input_ids, dtype=autocast_dtype)
        train_mode_without_dropout(model)
        with torch.no_grad(), amp:
            first, second = (model(input_ids=input_ids).logits for _ in range(2))
    finally:
        model.train(was_training)
    if not torch.equal(first, second):
        raise NotImplementedError(
            "scoring the same tokens twice in train mode gave different logits: the model has a dropout (or other "
            "randomness) the trainer cannot switch off, so p_old would not be the probability of the sample")


@torch.no_grad()
def sequence_logprobs(model, rollouts: Rollouts, opts: LossOptions, scorer: Scorer | None = None) -> torch.Tensor:
    """L_s for every sample [S] float32 (no graph), micro-batched: the input of group weights."""
    scorer = scorer or Scorer(model, opts.autocast_dtype, share_prompts=opts.share_prompts)
    out = []
    for start in range(0, len(rollouts), opts.micro_batch_size):
        mb = _trim(rollouts.select(slice(start, start + opts.micro_batch_size)))
        h, w, b, y, seq = scorer.packed(mb, opts.mask_truncated)
        logp = rk.linear_logprobs(h, w, y, bias=b, backend=opts.backend, filter_eps=None, check_values=False,
                                  **scorer.head.op_options(opts.temperature))
        out.append(torch.zeros(len(mb), dtype=torch.float32, device=h.device).index_add_(0, seq, logp.float()))
    return torch.cat(out)


def group_weights(seq_logp: torch.Tensor, question_index: torch.Tensor, alpha: float,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """`group` weighting: w_s = softmax of L over the samples of s's question + alpha, in log space
    (no underflow). A question's samples are all samples with the same question_index in the step
    (both engines: the same question posed twice in one step is one group). keep [S] bool: samples
    left out of the loss (mask_truncated) take no part in the softmax (their weight is alpha, and
    they have no tokens in the loss)."""
    L = seq_logp.double()
    if keep is not None:
        L = L.masked_fill(~keep.to(L.device), float("-inf"))
    w = torch.zeros_like(L)
    for q in question_index.unique():
        sel = question_index == q
        if torch.isfinite(L[sel]).any():
            w[sel] = torch.softmax(L[sel], dim=0)
    return (w + alpha).float()


def _underflow(seq_weight: torch.Tensor, weighting: str, alpha: float) -> float:
    """Fraction of samples whose weight is indistinguishable from the constant alpha (p_old lost to underflow)."""
    if weighting in ("rlsc", "length", "group"):
        return float((seq_weight == torch.tensor(alpha, dtype=torch.float32)).float().mean())
    if weighting == "rlsc-l1":
        return float((seq_weight == 0).float().mean())
    return 0.0


def _micro_batch(scorer: Scorer, mb: Rollouts, opts: LossOptions, weighting, S_total: int,
                 scores: dict | None = None, start: int = 0) -> tuple:
    """Forward and backward of one micro-batch; returns only detached per-sequence statistics, so
    nothing of it (hidden states, graph, op outputs) outlives the call. scores (optional): the
    per-sample sums of the scored tokens' entropy and self-certainty are written into its
    "entropy" and "self_certainty" [S_total] float64 rows at start.. (from this pass: the
    self-certainty costs a row gather and a matvec, rlsc_kernels.label_free.self_certainty_from_logp)."""
    h, weight, bias, y, seq = scorer.packed(mb, opts.mask_truncated)                   # 3. score ...
    # check_values=False: the targets are sampled ids (always in range) and a non-finite value
    # shows up in the step's loss / gradient norm, which skips the step (one sync per step).
    out = rk.linear_rlsc_loss(                                                       # ... 4. weigh
        h, weight, y, seq_index=seq, num_sequences=len(mb), bias=bias, alpha=opts.alpha, weighting=weighting,
        reduction="sum", filter_eps=opts.filter_eps, backend=opts.backend, return_entropy=True, check_values=False,
        **scorer.head.op_options(opts.temperature),
    )
    (out.loss / S_total).backward()                                                  # exact accumulation
    if scores is not None:
        with torch.no_grad():
            sc = self_certainty_from_logp(h.detach(), weight.detach(), y, out.token_logp.detach(),
                                          bias=None if bias is None else bias.detach(),
                                          **scorer.head.op_options(opts.temperature))
            rows = slice(start, start + len(mb))
            scores["self_certainty"][rows] = torch.zeros(len(mb), dtype=torch.float64, device=sc.device).index_add_(
                0, seq, sc.double()).to(scores["self_certainty"].device)
            scores["entropy"][rows] = torch.zeros(len(mb), dtype=torch.float64, device=sc.device).index_add_(
                0, seq, out.token_entropy.detach().double()).to(scores["entropy"].device)
            scores["scored_tokens"][rows] = out.n_tokens.detach().double().cpu()
    entropy = out.token_entropy.detach().double().sum() if out.token_entropy is not None else None
    return (out.loss.detach() / S_total, out.seq_logp.detach().float(), out.seq_weight.detach().float(),
            mb.completion_lengths, entropy, 0 if out.token_entropy is None else out.token_entropy.numel())


def rlsc_update(model, optimizer, rollouts: Rollouts, opts: LossOptions, *, scores: bool = False) -> StepStats:
    """Steps 2-5 of Algorithm 1 on given samples: mask, score, weigh, one optimizer step.
    scores=True also puts, in extra["scores"], the per-sample sums the collapse guard's
    diagnostics read (rlsc/objectives.score_rollouts' keys), measured in the loss pass itself.

    A non-finite loss or gradient norm skips the update (gradients dropped, optimizer untouched)
    and returns stats with skipped=True. opts.mask_truncated: samples cut off at the cap have no
    tokens in the loss (their L_s reads 0 in the stats); the loss keeps its 1 / S normalisation."""
    scorer = Scorer(model, opts.autocast_dtype, share_prompts=opts.share_prompts)
    S_total = len(rollouts)
    external = None
    if opts.weighting == "group":
        keep = ~rollouts.capped if opts.mask_truncated else None
        external = group_weights(sequence_logprobs(model, rollouts, opts, scorer), rollouts.question_index,
                                 opts.alpha, keep)
    optimizer.zero_grad(set_to_none=True)
    losses, logps, weights, ntoks, entropies, ent_count = [], [], [], [], [], 0
    sums = {k: torch.zeros(S_total, dtype=torch.float64) for k in ("entropy", "self_certainty", "scored_tokens")} if scores else None
    for start in range(0, S_total, opts.micro_batch_size):
        mb = _trim(rollouts.select(slice(start, start + opts.micro_batch_size)))    # 2. mask
        weighting = opts.weighting if external is None else external[start : start + len(mb)]
        loss, logp, weight, ntok, entropy, count = _micro_batch(scorer, mb, opts, weighting, S_total, sums, start)
        losses.append(loss)
        logps.append(logp)
        weights.append(weight)
        ntoks.append(ntok)
        if entropy is not None:
            entropies.append(entropy)
            ent_count += count
    del scorer  # the per-step weight copy is not needed by the optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # max_norm = inf measures the norm without clipping
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm > 0 else float("inf")))
    loss_sum = float(torch.stack(losses).sum())
    skipped = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()                                                             # 5. step
    optimizer.zero_grad(set_to_none=True)
    seq_weight = torch.cat(weights)
    stats = StepStats(
        loss=loss_sum,
        seq_logp=torch.cat(logps).cpu(),
        seq_weight=seq_weight.cpu(),
        n_tokens=torch.cat(ntoks).cpu(),
        capped=rollouts.capped.cpu(),
        mean_token_entropy=float(torch.stack(entropies).sum()) / max(ent_count, 1) if entropies else 0.0,
        grad_norm=grad_norm,
        frac_weight_underflow=_underflow(seq_weight.cpu(), opts.weighting, opts.alpha),
        skipped=skipped,
    )
    if sums is not None:
        stats.extra["scores"] = sums | {"seq_logp": stats.seq_logp.double(), "n_tokens": stats.n_tokens.long()}
    return stats


def train_mode_without_dropout(model) -> None:
    """Train mode (so gradient checkpointing engages) with every dropout off (rlsc.models.
    disable_dropout: nn.Dropout modules and the float dropout rates attention reads in train mode):
    the scored distribution must be the one the samples came from (p = p_old at the step)."""
    model.train()
    disable_dropout(model)


def rlsc_step(model, tokenizer, optimizer, problems: list[Problem], *, template: str, num_samples: int,
              max_new_tokens: int, opts: LossOptions, update=None) -> tuple[StepStats, float, float]:
    """One full step of Algorithm 1: (stats, generation seconds, training seconds). update: what
    replaces rlsc_update (same arguments), e.g. another objective (rlsc/objectives.py)."""
    t0 = time.perf_counter()
    rollouts = sample(model, tokenizer, problems, template=template, num_samples=num_samples,  # 1. sample
                      max_new_tokens=max_new_tokens, temperature=opts.temperature,
                      autocast_dtype=opts.autocast_dtype, sampler=opts.sampler)
    t1 = time.perf_counter()
    train_mode_without_dropout(model)
    stats = (update or rlsc_update)(model, optimizer, rollouts, opts)                # 2-5
    model.eval()
    return stats, t1 - t0, time.perf_counter() - t1
