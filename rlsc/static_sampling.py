"""Faster decode loops with the same contract as `rlsc.sampling._ancestral_loop`.

Both loops draw token t+1 from softmax(logits_t / T) of the model's own forward (argmax when T is
None) exactly as the dynamic loop does, consuming the random stream the same way (one
`torch.multinomial` over all B rows per step, finished rows included), so for the same seed they
return the same tokens as the dynamic loop up to floating-point rounding of the forward.

- "static" (for CUDA): a transformers `StaticCache` of fixed length (prompt + max_new_tokens) and a
  fixed-shape attention mask, so every decode step has the same shapes; with `compile=True` the
  decode forward goes through `torch.compile(mode="reduce-overhead")`, which records it as a CUDA
  graph (one launch per token instead of one per kernel). On CPU it runs without compilation.
- "compact" (for CPU): the dynamic KV cache, but rows that have emitted EOS leave the batch, so the
  forward only computes the rows still generating. Finished rows keep their last logits; their
  draws are discarded (replaced by padding) as in the dynamic loop.
"""
from __future__ import annotations

import inspect

import torch

SAMPLERS = ("auto", "dynamic", "static", "compact")


def resolve_sampler(sampler: str, device: torch.device) -> str:
    """The decode loop `sampler` names; "auto" is "static" on CUDA and "dynamic" elsewhere (on 2
    shared CPU cores "compact" gave identical records but no measured speed-up, so it is opt-in)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "auto":
        return "static" if device.type == "cuda" else "dynamic"
    return sampler


def _draw(logits: torch.Tensor, temperature: float | None, greedy_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax where temperature is None or on `greedy_rows`; elsewhere one draw per row from
    softmax(logits / temperature), in row order (the random stream is consumed as if the greedy
    rows were not there)."""
    if temperature is None:
        return logits.argmax(-1)
    if greedy_rows is None:
        return torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1).squeeze(-1)
    token = logits.argmax(-1)
    sampled = ~greedy_rows
    token[sampled] = torch.multinomial(torch.softmax(logits[sampled].float() / temperature, dim=-1), 1).squeeze(-1)
    return token


def _forward_params(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _cache_of(out):
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache


@torch.no_grad()
def compact_loop(model, prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float | None,
                 eos_ids: list[int], pad_id: int, greedy_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Completion block [B, L <= max_new_tokens]; the forward runs only on rows without an EOS yet.
    `greedy_rows` ([B] bool) take the argmax while the others sample: evaluation decodes its greedy
    answer in the same batch as the samples, and the samples get the tokens a separate call would."""
    from .sampling import _cache_keyword, _forward_last_logits

    B = prompt_ids.shape[0]
    device = prompt_ids.device
    attention = prompt_mask.long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache_kw = _cache_keyword(model)
    logits, past = _forward_last_logits(model, prompt_ids, attention, positions, None, cache_kw)
    logits = logits.float().clone()
    active = torch.arange(B, device=device)            # rows of the full batch still in the cache
    next_position = positions[:, -1:] + 1
    tokens = []
    for step in range(max_new_tokens):
        token = _draw(logits, temperature, greedy_rows).masked_fill(finished, pad_id)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        keep = (~finished[active]).nonzero().squeeze(-1)
        if keep.numel() < active.numel():               # drop the rows that just finished
            past.batch_select_indices(keep)
            active, attention, next_position = active[keep], attention[keep], next_position[keep]
        attention = torch.cat([attention, torch.ones(active.numel(), 1, dtype=attention.dtype, device=device)], 1)
        row_logits, past = _forward_last_logits(model, token[active, None], attention, next_position, past, cache_kw)
        logits[active] = row_logits.float()
        next_position = next_position + 1
    return torch.stack(tokens, dim=1)


CACHE_BUCKET = 256  # static caches are sized in multiples of this, so varying prompt lengths reuse one graph


class _Decoder:
    """The model's forward over a StaticCache, for one token per row: fixed shapes every step. One
    decoder is kept on the model per (rows, cache length, compile) and its cache is reset between
    calls: a compiled graph is tied to the cache tensors it was recorded with."""

    def __init__(self, model, rows: int, length: int, compile: bool):
        from transformers import StaticCache

        params = _forward_params(model)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.pass_cache_position = "cache_position" in params   # older transformers: explicit positions
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.fn = torch.compile(model, mode="reduce-overhead", fullgraph=False, dynamic=False) if compile else model

    @classmethod
    def for_model(cls, model, rows: int, length: int, compile: bool) -> "_Decoder":
        decoders = model.__dict__.setdefault("_rlsc_static_decoders", {})
        key = (rows, length, compile)
        if key in decoders:
            decoders[key].cache.reset()
        else:
            decoders[key] = cls(model, rows, length, compile)
        return decoders[key]

    def __call__(self, fn, input_ids, attention_mask, position_ids, cache_position):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  self.cache_kw: self.cache, "use_cache": True, "logits_to_keep": 1}
        if self.pass_cache_position:
            kwargs["cache_position"] = cache_position
        return fn(**kwargs).logits[:, -1]


@torch.no_grad()
def static_loop(model, prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float | None,
                eos_ids: list[int], pad_id: int, compile: bool = False) -> torch.Tensor:
    """Completion block [B, L <= max_new_tokens] decoded over a StaticCache of at least P +
    max_new_tokens positions (rounded up to a multiple of CACHE_BUCKET). The attention mask has the
    cache's full length from the start (ones past the prompt: the causal mask already hides the
    positions not yet written), so each decode step sees inputs of identical shapes, which is what
    lets `compile=True` replay one CUDA graph per token."""
    B, P = prompt_ids.shape
    device = prompt_ids.device
    total = -(-(P + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    decoder = _Decoder.for_model(model, B, total, compile)
    attention = torch.cat([prompt_mask.long(), torch.ones(B, total - P, dtype=torch.long, device=device)], 1)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = decoder(model, prompt_ids, attention, positions, torch.arange(P, device=device))  # prefill: eager
    next_position = positions[:, -1:] + 1
    cache_position = torch.tensor([P], device=device)
    tokens = []
    for step in range(max_new_tokens):
        token = _draw(logits, temperature).masked_fill(finished, pad_id)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = decoder(decoder.fn, token[:, None], attention, next_position, cache_position)
        if compile:
            logits = logits.clone()   # the CUDA graph's output buffer is overwritten by the next replay
        next_position = next_position + 1
        cache_position = cache_position + 1
    return torch.stack(tokens, dim=1)


def release_static_decoders(model) -> None:
    """Drops the static caches (and compiled graphs) kept on `model` by static_loop, freeing their memory."""
    model.__dict__.pop("_rlsc_static_decoders", None)
