"""Sampling completions with a plain ancestral loop over the model's KV cache (batched over samples).

Each new token is drawn from softmax(logits / T) of the model's own forward and nothing else. We do
not call `generate`: it merges in whatever the checkpoint's generation_config carries (repetition
penalty, no-repeat n-grams, minimum length, suppressed or forced tokens, top-k / top-p), and any of
those would make p_old in the RLSC weight differ from the probability of the sample.

A `Rollouts` batch keeps the prompt block (left-padded when several questions share a batch) and
the completion block apart, with the completion mask covering every generated token up to and
including the first EOS; tokens after it are padding and never reach the head.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass

import torch

from .data import Problem
from .static_sampling import compact_loop, resolve_sampler, static_loop


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor       # [B, P] long, left-padded
    prompt_mask: torch.Tensor      # [B, P] bool, True on real prompt tokens
    completion_ids: torch.Tensor   # [B, L] long, right-padded after EOS
    completion_mask: torch.Tensor  # [B, L] bool, generated tokens up to and including EOS
    capped: torch.Tensor           # [B] bool, hit max_new_tokens without EOS (kept, flagged)
    question_index: torch.Tensor   # [B] long, which prompt of the batch each sample answers

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: torch.Tensor | slice) -> "Rollouts":
        return Rollouts(*(t[idx] for t in (self.prompt_ids, self.prompt_mask, self.completion_ids,
                                           self.completion_mask, self.capped, self.question_index)))

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
) -> Rollouts | tuple[Rollouts, Rollouts]:
    """`num_samples` completions for each problem, generated together in one batched loop over the KV cache.

    Sampling is ancestral from softmax(logits / temperature) of the model's forward, with no other
    logits processing (the model's generation_config is ignored), so the completions are drawn from
    exactly the distribution the trainer scores. greedy=True takes the argmax instead.
    `sampler` picks the decode loop (rlsc/static_sampling.py): "dynamic" (this module's loop),
    "static" (StaticCache; CUDA graphs through torch.compile on CUDA), "compact" (finished rows
    leave the batch), or "auto" (static on CUDA, dynamic elsewhere); all draw the same tokens.
    with_greedy=True (compact sampler only) also decodes each question's greedy answer in the same
    batch and returns (samples, greedy): the same completions as two separate calls, one loop.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}")
    device = next(model.parameters()).device
    loop = _decode_loop(resolve_sampler(sampler, device), device)
    if with_greedy and (greedy or loop is not compact_loop):
        raise ValueError(f"with_greedy=True needs sampling with the compact sampler, got greedy={greedy}, "
                         f"sampler={sampler!r} (resolved: {resolve_sampler(sampler, device)!r})")
    texts = [chat_prompt(tokenizer, p.question, template) for p in problems]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    prompt_ids = enc["input_ids"].to(device)
    prompt_mask = enc["attention_mask"].to(device).bool()
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
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    n = 1 if greedy else num_samples
    rep_ids = prompt_ids.repeat_interleave(n, dim=0)
    rep_mask = prompt_mask.repeat_interleave(n, dim=0)
    extra = {}
    if with_greedy:  # one greedy row per question after the sampled rows
        rep_ids, rep_mask = torch.cat([rep_ids, prompt_ids]), torch.cat([rep_mask, prompt_mask])
        extra["greedy_rows"] = torch.arange(rep_ids.shape[0], device=device) >= n * len(problems)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with amp:
            completion_ids = loop(model, rep_ids, rep_mask, max_new_tokens=max_new_tokens,
                                  temperature=None if greedy else temperature, eos_ids=eos, pad_id=pad, **extra)
    finally:
        model.train(was_training)
    completion_mask, capped = completion_mask_from_ids(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(~completion_mask, pad)
    question_index = torch.arange(len(problems), device=device).repeat_interleave(n)
    if with_greedy:
        question_index = torch.cat([question_index, torch.arange(len(problems), device=device)])
        every = Rollouts(rep_ids, rep_mask, completion_ids, completion_mask, capped, question_index)
        return every.select(slice(0, n * len(problems))), every.select(slice(n * len(problems), None))
    return Rollouts(rep_ids, rep_mask, completion_ids, completion_mask, capped, question_index)


def _decode_loop(name: str, device: torch.device):
    if name == "static":
        return functools.partial(static_loop, compile=device.type == "cuda")
    return {"dynamic": _ancestral_loop, "compact": compact_loop}[name]


def _cache_keyword(model) -> str:
    """transformers >= 5.24 names the KV cache argument `cache` (`past_key_values` is deprecated)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _forward_last_logits(model, input_ids, attention_mask, position_ids, past, cache_kw):
    """Logits [B, V] of the last position, and the updated cache."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              cache_kw: past, "use_cache": True}
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:  # a model whose forward has no logits_to_keep
        out = model(**kwargs)
    cache = out.get("cache")
    if cache is None:
        cache = out.get("past_key_values")
    if cache is None:
        raise NotImplementedError(f"{type(model).__name__} returned no KV cache with use_cache=True; cannot sample from it")
    return out.logits[:, -1], cache


def _ancestral_loop(model, prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float | None,
                    eos_ids: list[int], pad_id: int) -> torch.Tensor:
    """Completion block [B, L <= max_new_tokens]: token t+1 ~ softmax(logits_t / temperature)
    (argmax when temperature is None), stopping once every row has emitted an EOS.

    Left-padded prompts get explicit position ids (cumulative count of real tokens), the same ones
    the training pass uses, so the sampled and the scored distributions see identical inputs."""
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    attention = prompt_mask.long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache_kw = _cache_keyword(model)
    logits, past = _forward_last_logits(model, prompt_ids, attention, positions, None, cache_kw)
    next_position = positions[:, -1:] + 1
    tokens = []
    for step in range(max_new_tokens):
        if temperature is None:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1).squeeze(-1)
        token = token.masked_fill(finished, pad_id)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        attention = torch.cat([attention, torch.ones(B, 1, dtype=attention.dtype, device=device)], dim=1)
        logits, past = _forward_last_logits(model, token[:, None], attention, next_position, past, cache_kw)
        next_position = next_position + 1
    return torch.stack(tokens, dim=1)


def decode_completions(tokenizer, rollouts: Rollouts) -> list[str]:
    texts = []
    for ids, mask in zip(rollouts.completion_ids, rollouts.completion_mask):
        texts.append(tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True))
    return texts
