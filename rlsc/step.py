"""One RLSC training step, in the order of the paper's Algorithm 1:

    1. sample   N completions per question at temperature T          (sampling.sample)
    2. mask     keep the completion tokens, up to and including EOS   (Rollouts.completion_mask)
    3. score    L_s = sum_t log_softmax(W h_t / T)[y_t] from the body's final hidden states
                through the fused op: no [samples x length x vocab] logits are ever formed
                (StepHead: the head exactly as the model samples from it)
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
from rlsc_kernels.integrations.transformers import _lora_parts, logit_transform

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
    sampler: str = "auto"        # decode loop of rlsc.sampling.sample


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


class _SharedWeight(torch.autograd.Function):
    """Hands the op a weight prepared once per step (cast to 16 bits, and/or LoRA's B appended
    along D) and routes its gradient back to the source parameters, once per micro-batch. A plain
    `weight.to(bf16)` per micro-batch would make a new [V, D] copy every time."""

    @staticmethod
    def forward(ctx, prepared, *sources):
        ctx.widths = [src.shape[1] for src in sources]
        ctx.dtypes = [src.dtype for src in sources]
        return prepared.view_as(prepared)

    @staticmethod
    def backward(ctx, grad):
        parts = grad.split(ctx.widths, dim=1)
        return (None, *(g.to(dt) if need else None
                        for g, dt, need in zip(parts, ctx.dtypes, ctx.needs_input_grad[1:])))


class StepHead:
    """The lm_head as the fused op sees it during one optimizer step.

    - logit scaling (`logit_scale`, `logits_scaling`, `lm_head_multiplier`, ... read by
      rlsc_kernels.integrations.transformers.logit_transform): the model samples from
      softmax(scale * (W h + b) / T), which is softmax((W h + b) / (T / scale)): folded into the
      temperature the op is called with. Soft-capped heads (`final_logit_softcapping`) are refused.
    - LoRA on the head (peft): logits = W h + s B A h = [W, B] . [h, s A h], so the op gets
      hidden' = cat(h, s h A^T) and weight' = cat(W, B): one fused call, gradients reach A and B.
    - the weight the op receives (16-bit copy under autocast, [W, B] under LoRA) is made once here,
      not per micro-batch; for an fp32 head without LoRA it is the parameter itself (no copy).
    """

    def __init__(self, model, temperature: float, autocast_dtype: torch.dtype | None = None):
        self.body, head = body_and_head(model)
        base = head.base_layer if hasattr(head, "base_layer") and hasattr(head, "lora_A") else head
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or type(weight) not in (torch.Tensor, torch.nn.Parameter):
            raise NotImplementedError(
                f"the model's lm_head ({type(head).__name__}) is not a plain Linear layer with a [V, D] weight; "
                "the fused op cannot score through it (quantised or wrapped heads are not supported)")
        config = getattr(model, "config", None) if not hasattr(model, "get_base_model") else model.get_base_model().config
        scale, softcap = logit_transform(config)
        if softcap is not None:
            raise NotImplementedError(
                f"the model soft-caps its logits (final_logit_softcapping={softcap}); the trainer cannot yet score "
                "soft-capped heads exactly as they sample, so it refuses rather than train on a different distribution")
        if not (math.isfinite(scale) and scale > 0):
            raise NotImplementedError(f"the model scales its logits by {scale}; only a positive finite scale can be folded into the temperature")
        self.temperature = temperature / scale
        self.logit_scale = scale
        self.lora = []
        bias = getattr(base, "bias", None)
        sources = [weight]
        for lora_a, lora_b, lora_b_bias, scaling, dropout in _lora_parts(head):
            self.lora.append((lora_a, scaling, dropout))
            sources.append(lora_b)
            if lora_b_bias is not None:
                bias = lora_b_bias * scaling if bias is None else bias + lora_b_bias * scaling
        self.dtype = autocast_dtype or weight.dtype
        self.bias = bias
        self.weight_copies = 0
        if len(sources) == 1 and self.dtype == weight.dtype:
            self._prepared, self._sources = None, sources
        else:
            with torch.no_grad():
                self._prepared = torch.cat([src.detach().to(self.dtype) for src in sources], dim=1)
            self._sources = sources
            self.weight_copies = 1

    def inputs(self, hidden: torch.Tensor):
        """(hidden', weight', bias') for the op from the body's states hidden [n, D] of one micro-batch."""
        if self.lora:
            extra = [(dropout(hidden).to(a.dtype) @ a.T) * scaling for a, scaling, dropout in self.lora]
            hidden = torch.cat([hidden, *(e.to(hidden.dtype) for e in extra)], dim=-1)
        weight = self._sources[0] if self._prepared is None else _SharedWeight.apply(self._prepared, *self._sources)
        bias = self.bias.to(self.dtype) if self.bias is not None else None
        return hidden.to(self.dtype), weight, bias


@torch.no_grad()
def check_head_matches_forward(model, input_ids: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> None:
    """Raises if the logits the op would compute differ from the model's own forward logits.

    StepHead knows the head transforms of the transformers models it was written against; a model
    that does something else to its logits (a hidden-state multiplier, an unknown attribute)
    would otherwise be trained on a distribution it does not sample from. input_ids [1, L]."""
    head = StepHead(model, 1.0, autocast_dtype)
    amp = (torch.autocast(input_ids.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    with amp:
        logits = model(input_ids=input_ids).logits[0].float()
        out = head.body(input_ids=input_ids)
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]
    h, w, b = head.inputs(hidden)
    z = h.float() @ w.float().T
    if b is not None:
        z = z + b.float()
    z = z / head.temperature
    eps = max(torch.finfo(head.dtype).eps, torch.finfo(logits.dtype).eps)
    tol = 8 * eps * float(logits.abs().max()) + 1e-5
    err = float((z - logits).abs().max())
    if not err <= tol:
        raise NotImplementedError(
            f"the model's logits are not scale * (W h + b) of its lm_head (max difference {err:.3g} > {tol:.3g}): "
            f"it transforms its logits in a way the trainer does not know, so the fused op would score a "
            f"different distribution than the one sampled")


@torch.no_grad()
def sequence_logprobs(model, rollouts: Rollouts, opts: LossOptions, head: StepHead | None = None) -> torch.Tensor:
    """L_s for every sample [S] float32 (no graph), micro-batched: the input of group weights."""
    head = head or StepHead(model, opts.temperature, opts.autocast_dtype)
    out = []
    for start in range(0, len(rollouts), opts.micro_batch_size):
        mb = _trim(rollouts.select(slice(start, start + opts.micro_batch_size)))
        h, y, seq = _packed(completion_hidden_states(head.body, mb, opts.autocast_dtype), mb)
        h, w, b = head.inputs(h)
        logp = rk.linear_logprobs(h, w, y, bias=b, temperature=head.temperature, backend=opts.backend,
                                  filter_eps=None, check_values=False)
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


def _micro_batch(head: StepHead, mb: Rollouts, opts: LossOptions, weighting, S_total: int) -> tuple:
    """Forward and backward of one micro-batch; returns only detached per-sequence statistics, so
    nothing of it (hidden states, graph, op outputs) outlives the call."""
    hidden = completion_hidden_states(head.body, mb, opts.autocast_dtype)           # 3. score ...
    h, y, seq = _packed(hidden, mb)
    h, weight, bias = head.inputs(h)
    # check_values=False: the targets are sampled ids (always in range) and a non-finite value
    # shows up in the step's loss / gradient norm, which skips the step (one sync per step).
    out = rk.linear_rlsc_loss(                                                       # ... 4. weigh
        h, weight, y, seq_index=seq, num_sequences=len(mb), bias=bias, temperature=head.temperature,
        alpha=opts.alpha, weighting=weighting, reduction="sum", filter_eps=opts.filter_eps,
        backend=opts.backend, return_entropy=True, check_values=False,
    )
    (out.loss / S_total).backward()                                                  # exact accumulation
    entropy = out.token_entropy.detach().double().sum() if out.token_entropy is not None else None
    return (out.loss.detach() / S_total, out.seq_logp.detach().float(), out.seq_weight.detach().float(),
            out.n_tokens, entropy, 0 if out.token_entropy is None else out.token_entropy.numel())


def rlsc_update(model, optimizer, rollouts: Rollouts, opts: LossOptions) -> StepStats:
    """Steps 2-5 of Algorithm 1 on given samples: mask, score, weigh, one optimizer step.

    A non-finite loss or gradient norm skips the update (gradients dropped, optimizer untouched)
    and returns stats with skipped=True."""
    head = StepHead(model, opts.temperature, opts.autocast_dtype)
    S_total = len(rollouts)
    external = None
    if opts.weighting == "group":
        external = group_weights(sequence_logprobs(model, rollouts, opts, head), rollouts.question_index, opts.alpha)
    optimizer.zero_grad(set_to_none=True)
    losses, logps, weights, ntoks, entropies, ent_count = [], [], [], [], [], 0
    for start in range(0, S_total, opts.micro_batch_size):
        mb = _trim(rollouts.select(slice(start, start + opts.micro_batch_size)))    # 2. mask
        weighting = opts.weighting if external is None else external[start : start + len(mb)]
        loss, logp, weight, ntok, entropy, count = _micro_batch(head, mb, opts, weighting, S_total)
        losses.append(loss)
        logps.append(logp)
        weights.append(weight)
        ntoks.append(ntok)
        if entropy is not None:
            entropies.append(entropy)
            ent_count += count
    del head  # the per-step weight copy is not needed by the optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # max_norm = inf measures the norm without clipping
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm > 0 else float("inf")))
    loss_sum = float(torch.stack(losses).sum())
    skipped = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()                                                             # 5. step
    optimizer.zero_grad(set_to_none=True)
    seq_weight = torch.cat(weights)
    return StepStats(
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


def train_mode_without_dropout(model) -> None:
    """Train mode (so gradient checkpointing engages) with every dropout off: the scored
    distribution must be the one the samples came from (p = p_old at the step)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or "Dropout" in type(m).__name__:
            m.eval()


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
