"""The decode loops: completion token ids drawn after given prompt ids, one token per step.

    from rlsc.decoding import decode
    ids = decode(model, prompt_ids, prompt_mask, max_new_tokens=64, temperature=0.5,
                 eos_ids=[eos], pad_id=pad, sampler="dynamic")        # [B, L <= 64]

This is the public entry point (the benchmarks use it); rlsc.sampling.sample wraps it with prompt
encoding, autocast and the completion mask. Every loop draws token t+1 from softmax(z_t / T),
where z_t / T = FusedHead(model).logits(h_t, T): the float32 logits of the model's head computed
from the body's last hidden state h_t exactly as the fused op computes them when the loss scores
the sample (same 16-bit inputs under autocast or a bf16 model, products exact, sums in fp32; the
logit scale and soft-cap applied in fp32). A 16-bit lm_head (bf16 logits) is never sampled from,
so the sampled distribution is the one the loss scores, up to the body's own rounding between a
KV-cache forward and a full forward. greedy: the argmax of the same logits.

The loops (all consume the random stream the same way: one uniform number per row over all B rows
per step, finished rows included, so for one seed they return the same tokens up to rounding; the
draw is rlsc.decoding.draw_from_logprobs):
- "dynamic": the model's dynamic KV cache, every row every step.
- "compact": the dynamic cache, but rows that have emitted EOS leave the batch (their later draws
  are discarded as in "dynamic").
- "static": a transformers StaticCache of fixed length (prompt + max_new_tokens, rounded up to
  CACHE_BUCKET) and a fixed-shape attention mask, so each step has the same shapes; compile=True
  (default on CUDA) runs the body through torch.compile(mode="reduce-overhead") (CUDA graphs). The
  mask is 1 exactly on the written slots of each row (prompt tokens, then each generated token's
  slot set just before the step that writes it); the prefill passes the prompt-length prefix of it.
  So no attention implementation ever attends to an unwritten (zero) cache slot: eager and SDPA
  mask them causally anyway, and FlashAttention-2 (which drops an all-ones mask and aligns its
  causal mask bottom-right over the whole cache) unpads to the written slots.
- "auto": "compact" on a CPU (the rows that finished early cost nothing there, and evaluation
  decodes its greedy answer in the samples' batch: 1.5x faster than "dynamic" on the demo's
  evaluation, benchmarks/results/eval-sampler-cpu.md), "dynamic" on other devices. The static
  loop is correct on CPU (tested, also under an emulation of FlashAttention-2's masking) but has
  not been recorded correct and faster on a GPU (benchmarks/gpu_check.sh records it); until it
  is, it is opt-in.
"""
from __future__ import annotations

import inspect

import torch

from rlsc_kernels.integrations.transformers import FusedHead

from .models import body_and_head, cache_keyword

SAMPLERS = ("auto", "dynamic", "static", "compact")
CACHE_BUCKET = 256  # static caches are sized in multiples of this, so varying prompt lengths reuse one graph


def resolve_sampler(sampler: str, device: torch.device) -> str:
    """The decode loop `sampler` names; "auto" is "compact" on a CPU, else "dynamic" (see the module docstring)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "auto":
        return "compact" if device.type == "cpu" else "dynamic"
    return sampler


class _Stepper:
    """The model as a decode loop sees it: (body inputs, cache) -> (float32 logits / T of the last
    position [B, V], cache), through the body and FusedHead."""

    def __init__(self, model, temperature: float | None):
        self.body, _ = body_and_head(model)
        self.head = FusedHead(model, reuse_weight=True)   # under the caller's autocast: its compute dtype
        self.temperature = 1.0 if temperature is None else temperature
        self.cache_kw = cache_keyword(self.body) or "past_key_values"
        self.takes_cache_position = "cache_position" in inspect.signature(self.body.forward).parameters

    def __call__(self, input_ids, attention_mask, position_ids, cache, *, fn=None, cache_position=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  self.cache_kw: cache, "use_cache": True}
        if cache_position is not None and self.takes_cache_position:
            kwargs["cache_position"] = cache_position
        out = (fn or self.body)(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        new_cache = out.get("cache") if hasattr(out, "get") else None
        if new_cache is None:
            new_cache = out.get("past_key_values") if hasattr(out, "get") else None
        if new_cache is None:
            new_cache = cache
        if new_cache is None:
            raise NotImplementedError(f"{type(self.body).__name__} returned no KV cache with use_cache=True; cannot sample from it")
        return self.head.logits(hidden[:, -1], self.temperature), new_cache


def _draw(logits: torch.Tensor, greedy: bool, greedy_rows: torch.Tensor | None = None, entropy: bool = False):
    """(token [B], its log-probability [B] under log_softmax(logits), the entropy [B] of
    softmax(logits) in nats or None unless `entropy`): argmax when greedy or on `greedy_rows`;
    elsewhere one draw per row from softmax(logits) (the logits are divided by T already), in row
    order (the random stream is consumed as if the greedy rows were not there). Always in float32,
    outside autocast (CPU autocast would run softmax in bf16)."""
    with torch.autocast(logits.device.type, enabled=False):
        logp = torch.log_softmax(logits.float(), dim=-1)
        ent = _entropy(logp) if entropy else None
        if greedy:
            token = logp.argmax(-1)
        elif greedy_rows is None:
            token = draw_from_logprobs(logp)
        else:
            token = logp.argmax(-1)
            sampled = ~greedy_rows
            token[sampled] = draw_from_logprobs(logp[sampled])
        return token, logp.gather(-1, token[:, None]).squeeze(-1), ent


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v per row of log-probabilities [B, V]; tokens with p_v = 0 add nothing."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def draw_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """One token per row [B] drawn from the distribution with log-probabilities logp [B, V] (float32,
    rows normalised): the inverse of the row's cumulative distribution, summed in float64, at one
    uniform float64 number per row from torch's generator (torch.rand(B), so a seed fixes the
    draws). Token v is drawn exactly when u lies in [c_{v-1}, c_v), c the cumulative sums: with
    probability p_v to float64 rounding, never for p_v = 0. Same distribution as torch.multinomial,
    without its V exponential numbers per row (5-10% of a CPU decode step at V = 49152)."""
    cdf = torch.cumsum(logp.exp(), dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    u = torch.rand(logp.shape[0], 1, dtype=torch.float64, device=logp.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))   # u < total: never past the last p_v > 0
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def _finish(tokens: list, logps: list, return_logp: bool, ents: list | None = None):
    """The completion block [B, L], then [B, L] log-probabilities if return_logp, then [B, L]
    entropies if they were collected (ents not None): a tuple when anything follows the block."""
    ids = torch.stack(tokens, dim=1)
    extra = ([torch.stack(logps, dim=1)] if return_logp else []) + ([torch.stack(ents, dim=1)] if ents is not None else [])
    return (ids, *extra) if extra else ids


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float | None, eos_ids: list[int], pad_id: int, sampler: str = "dynamic",
           greedy_rows: torch.Tensor | None = None, compile: bool | None = None, return_logp: bool = False,
           prompt_rows: torch.Tensor | None = None, return_entropy: bool = False):
    """Completion block [B, L <= max_new_tokens] long after left-padded prompts prompt_ids [B, P]
    (prompt_mask [B, P], True on real tokens): token t+1 ~ softmax(FusedHead logits / temperature)
    (argmax when temperature is None), rows padded with pad_id after their first EOS, stopping once
    every row has one. Runs under the caller's autocast (if any); the model should be in eval mode.
    greedy_rows ([B] bool, "compact" only) take the argmax while the others sample. compile
    ("static" only; default: on CUDA) records the decode step as a CUDA graph. return_logp=True
    also returns each drawn token's log-probability [B, L] float32 under the distribution it was
    drawn from (log_softmax of the logits / T; the argmax's under T = 1 when greedy): summed over
    a completion, the sampler's own log p of the sample, which the loss must reproduce.
    return_entropy=True also returns (last) the entropy [B, L] float32, in nats, of each position's
    distribution (softmax of the logits / T; under T = 1 when greedy), e.g. to measure how sharp
    the sampled distribution is without a second forward.
    prompt_rows ([B] long, optional): prompt_ids / prompt_mask then hold distinct prompts [U, P]
    and output row b continues prompt prompt_rows[b]; each prompt is prefilled once and its KV
    cache rows copied to its B rows (a question's 16 samples share one prefill: the same tokens,
    up to the rounding of a batch of one against a batch of 16)."""
    name = resolve_sampler(sampler, prompt_ids.device)
    if prompt_rows is not None and name == "static":   # a static cache is sized for all rows from the start
        prompt_ids, prompt_mask, prompt_rows = prompt_ids[prompt_rows], prompt_mask[prompt_rows], None
    if greedy_rows is not None and name != "compact":
        raise ValueError(f"greedy_rows needs the compact sampler, got sampler={sampler!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos_ids, pad_id=pad_id,
              return_logp=return_logp, return_entropy=return_entropy)
    if name == "static":
        return _static_loop(model, prompt_ids, prompt_mask, compile=prompt_ids.device.type == "cuda" if compile is None
                            else compile, **kw)
    if name == "compact":
        return _compact_loop(model, prompt_ids, prompt_mask, greedy_rows=greedy_rows, prompt_rows=prompt_rows, **kw)
    return _dynamic_loop(model, prompt_ids, prompt_mask, prompt_rows=prompt_rows, **kw)


def _prefill(step, prompt_ids, prompt_mask, prompt_rows):
    """(logits [B, V], cache, attention [B, P], position ids [B, P]) after the prompts, one row per
    output row: the distinct prompts run once and their rows are copied by prompt_rows."""
    attention = prompt_mask.long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits, past = step(prompt_ids, attention, positions, None)
    if prompt_rows is not None:
        past.reorder_cache(prompt_rows)
        logits, attention, positions = logits[prompt_rows], attention[prompt_rows], positions[prompt_rows]
    return logits, past, attention, positions


def _ancestral(logits, advance, finished, eos, *, max_new_tokens, greedy, pad_id, return_logp, return_entropy,
               greedy_rows=None):
    """The token loop every sampler shares: draw from `logits` (argmax on greedy_rows), pad rows
    that already ended, stop at the cap or when every row has an EOS, else logits = advance(i,
    token) (the loop's own forward of the drawn tokens). `finished` [B] bool is updated in place."""
    tokens, logps, ents = [], [], [] if return_entropy else None
    for i in range(max_new_tokens):
        token, logp, ent = _draw(logits, greedy, greedy_rows, entropy=return_entropy)
        token = token.masked_fill(finished, pad_id)
        tokens.append(token)
        logps.append(logp)
        if ents is not None:
            ents.append(ent)
        finished |= torch.isin(token, eos)
        if i + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = advance(i, token)
    return _finish(tokens, logps, return_logp, ents)


def _dynamic_loop(model, prompt_ids, prompt_mask, *, max_new_tokens, temperature, eos_ids, pad_id, return_logp,
                  return_entropy=False, prompt_rows=None):
    """Left-padded prompts get explicit position ids (cumulative count of real tokens), the same
    ones the training pass uses, so the sampled and the scored distributions see identical inputs."""
    device = prompt_ids.device
    step = _Stepper(model, temperature)
    logits, past, attention, positions = _prefill(step, prompt_ids, prompt_mask, prompt_rows)
    B = logits.shape[0]
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    next_position = positions[:, -1:] + 1

    def advance(i, token):
        nonlocal attention, past, next_position
        attention = torch.cat([attention, torch.ones(B, 1, dtype=attention.dtype, device=device)], dim=1)
        next_logits, past = step(token[:, None], attention, next_position, past)
        next_position = next_position + 1
        return next_logits

    return _ancestral(logits, advance, finished, eos, max_new_tokens=max_new_tokens, greedy=temperature is None,
                      pad_id=pad_id, return_logp=return_logp, return_entropy=return_entropy)


def _compact_loop(model, prompt_ids, prompt_mask, *, max_new_tokens, temperature, eos_ids, pad_id, return_logp,
                  return_entropy=False, greedy_rows=None, prompt_rows=None):
    """The forward runs only on rows without an EOS yet; finished rows keep their last logits and
    their draws are discarded. `greedy_rows` take the argmax while the others sample: evaluation
    decodes its greedy answer in the same batch as the samples, and the samples get the tokens a
    separate call would."""
    device = prompt_ids.device
    step = _Stepper(model, temperature)
    logits, past, attention, positions = _prefill(step, prompt_ids, prompt_mask, prompt_rows)
    B = logits.shape[0]
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = logits.clone()
    active = torch.arange(B, device=device)            # rows of the full batch still in the cache
    next_position = positions[:, -1:] + 1

    def advance(i, token):
        nonlocal active, attention, next_position, past
        keep = (~finished[active]).nonzero().squeeze(-1)
        if keep.numel() < active.numel():               # drop the rows that just finished
            past.batch_select_indices(keep)
            active, attention, next_position = active[keep], attention[keep], next_position[keep]
        attention = torch.cat([attention, torch.ones(active.numel(), 1, dtype=attention.dtype, device=device)], 1)
        row_logits, past = step(token[active, None], attention, next_position, past)
        logits[active] = row_logits                     # finished rows keep their last logits
        next_position = next_position + 1
        return logits

    return _ancestral(logits, advance, finished, eos, max_new_tokens=max_new_tokens, greedy=temperature is None,
                      greedy_rows=greedy_rows, pad_id=pad_id, return_logp=return_logp, return_entropy=return_entropy)


def _compute_dtype(model) -> torch.dtype:
    """The dtype the body computes in now: the autocast dtype where autocast is on, else its weights'."""
    param = next(model.parameters())
    device_type = param.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else param.dtype


class _StaticDecoder:
    """A StaticCache (and, with compile, the compiled body) kept on the model per (rows, cache
    length, compile, compute dtype) and reset between calls: a compiled graph is tied to the cache
    tensors it was recorded with, and a cache holds keys in the dtype it was first written in."""

    def __init__(self, model, length: int, compile: bool):
        from transformers import StaticCache

        body, _ = body_and_head(model)
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.fn = torch.compile(body, mode="reduce-overhead", fullgraph=False, dynamic=False) if compile else None

    @classmethod
    def for_model(cls, model, rows: int, length: int, compile: bool) -> "_StaticDecoder":
        decoders = model.__dict__.setdefault("_rlsc_static_decoders", {})
        key = (rows, length, compile, _compute_dtype(model))
        if key in decoders:
            decoders[key].cache.reset()
        else:
            decoders[key] = cls(model, length, compile)
        return decoders[key]


def _static_loop(model, prompt_ids, prompt_mask, *, max_new_tokens, temperature, eos_ids, pad_id, return_logp,
                 return_entropy=False, compile=False):
    B, P = prompt_ids.shape
    device = prompt_ids.device
    total = -(-(P + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    decoder = _StaticDecoder.for_model(model, B, total, compile)
    step = _Stepper(model, temperature)
    # 1 exactly on the written slots: the prompt now, each new token's slot just before it is written
    attention = torch.zeros(B, total, dtype=torch.long, device=device)
    attention[:, :P] = prompt_mask.long()
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits, _ = step(prompt_ids, attention[:, :P], positions, decoder.cache,            # prefill: eager
                     cache_position=torch.arange(P, device=device))
    next_position = positions[:, -1:] + 1

    def advance(i, token):
        nonlocal next_position
        attention[:, P + i] = 1
        next_logits, _ = step(token[:, None], attention, next_position, decoder.cache, fn=decoder.fn,
                              cache_position=torch.tensor([P + i], device=device))
        next_position = next_position + 1
        return next_logits

    return _ancestral(logits, advance, finished, eos, max_new_tokens=max_new_tokens, greedy=temperature is None,
                      pad_id=pad_id, return_logp=return_logp, return_entropy=return_entropy)


def release_static_decoders(model) -> None:
    """Drops the static caches (and compiled graphs) kept on `model` by the static loop, freeing their memory."""
    model.__dict__.pop("_rlsc_static_decoders", None)
