"""Sampling completions with a plain ancestral loop over the model's KV cache (batched over samples).

Each new token is drawn from softmax(z / T), z the float32 logits the loss scores (the decode loops
are in rlsc/decoding.py), and nothing else. We do not call `generate`: it merges in whatever the checkpoint's generation_config carries (repetition
penalty, no-repeat n-grams, minimum length, suppressed or forced tokens, top-k / top-p), and any of
those would make p_old in the RLSC weight differ from the probability of the sample.

A `Rollouts` batch keeps the prompt block (left-padded when several questions share a batch) and
the completion block apart, with the completion mask covering every generated token up to and
including the first EOS; tokens after it are padding and never reach the head.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from .data import Problem
from .decoding import decode, resolve_sampler


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor       # [B, P] long, left-padded
    prompt_mask: torch.Tensor      # [B, P] bool, True on real prompt tokens
    completion_ids: torch.Tensor   # [B, L] long, right-padded after EOS
    completion_mask: torch.Tensor  # [B, L] bool, generated tokens up to and including EOS
    capped: torch.Tensor           # [B] bool, hit max_new_tokens without EOS (kept, flagged)
    question_index: torch.Tensor   # [B] long, which question each sample answers: the position in the
                                   # batch's problem list of its first occurrence (a question posed twice
                                   # in one batch is one group: `group` weighting groups by this)
    sampled_logp: torch.Tensor | None = None  # [B] float32, the sampler's own log p of each completion
                                   # (sum over the completion mask of the log-probabilities it drew
                                   # with); what the loss's L_s must reproduce. None when not recorded.
    entropy_sum: torch.Tensor | None = None   # [B] float32, the sum over the completion mask of the entropy
                                   # (nats) of each position's distribution, softmax(logits / T), the one
                                   # its token was drawn from; sample(entropy=True) only, else None.

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: torch.Tensor | slice) -> "Rollouts":
        return Rollouts(*(t[idx] for t in (self.prompt_ids, self.prompt_mask, self.completion_ids,
                                           self.completion_mask, self.capped, self.question_index)),
                        sampled_logp=None if self.sampled_logp is None else self.sampled_logp[idx],
                        entropy_sum=None if self.entropy_sum is None else self.entropy_sum[idx])

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def chat_prompt(tokenizer, question: str, template: str) -> str:
    """The text fed to the model: the chat template around the user message, if the tokenizer has one."""
    user = template.format(question=question)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
    return user + "\n"


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompt texts, with the BOS token the tokenizer adds by default (base
    Llama / Mistral-style models expect it) and never twice: the texts are encoded without special
    tokens (a chat template writes its own BOS as text) and the BOS is prepended where the
    tokenizer's default encoding starts with it and the text's does not."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
    out = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if adds_bos and ids[:1] != [bos]:
            ids = [bos] + ids
        out.append(ids)
    return out


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, P] long, mask [B, P] bool) of token-id lists, left-padded with pad_id."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = True
    return ids.to(device), mask.to(device)


def eos_token_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the tokenizer and model define no EOS token; cannot tell where a completion ends")
    return sorted(ids)


def context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, capped flag) for a right-padded completion block."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # positions strictly after the first EOS: cumulative count of EOS before them > 0
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    mask = eos_before == 0
    capped = ~is_eos.any(dim=-1)
    return mask, capped


@torch.no_grad()
def sample(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    template: str,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    autocast_dtype: torch.dtype | None = None,
    sampler: str = "auto",
    with_greedy: bool = False,
    entropy: bool = False,
) -> Rollouts | tuple[Rollouts, Rollouts]:
    """`num_samples` completions for each problem, generated together in one batched loop over the KV cache.

    Sampling is ancestral from softmax(logits / temperature) of the model's forward, with no other
    logits processing (the model's generation_config is ignored), so the completions are drawn from
    exactly the distribution the trainer scores. greedy=True takes the argmax instead.
    `sampler` picks the decode loop (rlsc/decoding.py): "dynamic", "static" (StaticCache; CUDA
    graphs through torch.compile on CUDA), "compact" (finished rows leave the batch), or "auto"
    (compact on a CPU, else dynamic); all draw the same tokens. The prompts are encoded with the tokenizer's BOS (see
    encode_prompts).
    with_greedy=True (compact sampler only) also decodes each question's greedy answer in the same
    batch and returns (samples, greedy): the same completions as two separate calls, one loop.
    entropy=True also records each completion's summed token entropy (Rollouts.entropy_sum), from
    the logits the sampler drew with: no second forward, no change to the draws.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}")
    device = next(model.parameters()).device
    name = resolve_sampler(sampler, device)
    if with_greedy and (greedy or name != "compact"):
        raise ValueError(f"with_greedy=True needs sampling with the compact sampler, got greedy={greedy}, "
                         f"sampler={sampler!r} (resolved: {name!r})")
    texts = [chat_prompt(tokenizer, p.question, template) for p in problems]
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    prompt_ids, prompt_mask = left_pad(encode_prompts(tokenizer, texts), pad, device)
    ctx = context_length(model)
    longest = int(prompt_mask.sum(-1).max())
    if ctx is not None and longest >= ctx:
        i = int(prompt_mask.sum(-1).argmax())
        raise ValueError(
            f"prompt of question {problems[i].id!r} is {longest} tokens, longer than the model's context of {ctx} tokens"
        )
    if ctx is not None and prompt_ids.shape[1] + max_new_tokens > ctx:
        new_cap = ctx - prompt_ids.shape[1]
        warnings.warn(f"max_new_tokens {max_new_tokens} exceeds the context after the prompt; capping at {new_cap}")
        max_new_tokens = new_cap
    n = 1 if greedy else num_samples
    rows = torch.arange(len(problems), device=device).repeat_interleave(n)   # the question of each row
    extra = {}
    if with_greedy:  # one greedy row per question after the sampled rows
        rows = torch.cat([rows, torch.arange(len(problems), device=device)])
        extra["greedy_rows"] = torch.arange(rows.shape[0], device=device) >= n * len(problems)
    rep_ids, rep_mask = prompt_ids[rows], prompt_mask[rows]
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with amp:
            # each question's prompt is prefilled once for its rows
            completion_ids, token_logp, *token_entropy = decode(
                model, prompt_ids, prompt_mask, prompt_rows=rows, max_new_tokens=max_new_tokens,
                temperature=None if greedy else temperature, eos_ids=eos, pad_id=pad, sampler=name, return_logp=True,
                return_entropy=entropy, **extra)
    finally:
        model.train(was_training)
    completion_mask, capped = completion_mask_from_ids(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(~completion_mask, pad)
    sampled_logp = (token_logp * completion_mask).sum(-1)
    entropy_sum = (token_entropy[0] * completion_mask).sum(-1) if entropy else None
    first = {}
    group = torch.tensor([first.setdefault(p.id, i) for i, p in enumerate(problems)], device=device)
    question_index = group.repeat_interleave(n)
    if with_greedy:
        question_index = torch.cat([question_index, group])
        every = Rollouts(rep_ids, rep_mask, completion_ids, completion_mask, capped, question_index, sampled_logp,
                         entropy_sum)
        return every.select(slice(0, n * len(problems))), every.select(slice(n * len(problems), None))
    return Rollouts(rep_ids, rep_mask, completion_ids, completion_mask, capped, question_index, sampled_logp,
                    entropy_sum)


def decode_completions(tokenizer, rollouts: Rollouts) -> list[str]:
    texts = []
    for ids, mask in zip(rollouts.completion_ids, rollouts.completion_mask):
        texts.append(tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True))
    return texts
