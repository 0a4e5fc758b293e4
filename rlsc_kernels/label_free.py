"""Per-token statistics of the label-free RL family, from hidden states, without [N, V] logits.

RLSC's siblings (Intuitor / RLIF, entropy minimisation, RENT, TTRL) need, per completion token t
with logits z_t = (W h_t + b) / T over a vocabulary of V:

    log-prob        logp_t = z_t,y_t - lse_t                      (linear_logprobs)
    entropy         H_t    = lse_t - sum_v p_t,v z_t,v             (linear_logprobs, return_entropy)
    self-certainty  SC_t   = KL(U || p_t) = -log V - (1/V) sum_v log p_t,v
                           = lse_t - mean_v z_t,v - log V

Self-certainty needs no kernel of its own: the mean logit is a matvec,
    sum_v z_t,v = (h_t . sum_v W_v + sum_v b_v) / T,
and lse_t = z_t,y_t - logp_t follows from the log-prob the kernels already return and the
target logit, a row gather z_t,y_t = (h_t . W_y_t + b_y_t) / T. Both are O(N D) on top of the
op, and every piece is differentiable (through linear_logprobs' own backward for logp).
A soft-capped head (z = c tanh((W h + b) / c) / T) has no closed form for the mean logit: it is
computed by one more sweep over the vocabulary in chunked PyTorch (fp32, each chunk's [N, chunk]
logits recomputed in the backward), so soft-capping costs one extra logits GEMM.

Per-sample temperature: `temperature` may be a tensor, one value per token, row or sequence
(rlsc_kernels/temperature.py: the shape rules, and the split of the sweeps by temperature that
linear_logprobs runs). Self-certainty needs nothing more: its closed-form pieces are divided by
each token's temperature. The temperature is a constant: no gradient flows to it.

Under torch.compile (also fullgraph=True) the op traces as it runs: linear_logprobs becomes the
registered custom ops (custom_ops.py; a per-token temperature's grouping happens inside them),
the closed-form pieces are plain tensor code, and the soft-cap sweep is torch.utils.checkpoint
(a higher-order op Dynamo captures).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .api import linear_logprobs
from .dtypes import output_dtype
from .options import check_softcap
from .plan import autocast_inputs, check_temperature
from .temperature import is_per_token, per_token_temperature
from .validation import check_head

__all__ = ["TokenStats", "linear_token_stats", "linear_self_certainty", "self_certainty_from_logp"]

#: elements of one [N, chunk] fp32 logits block in the soft-cap sweep (64 MB)
_SOFTCAP_BLOCK_ELEMENTS = 1 << 24


@dataclass
class TokenStats:
    """Per-token statistics, each shaped like targets, float32 (float64 for float64 inputs), 0
    where targets == ignore_index. logp always; entropy and self_certainty when asked (else None)."""

    logp: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    self_certainty: Optional[torch.Tensor] = None


def _target_logit(h, weight, bias, y_safe, stat_dtype):
    """(W_y . h + b_y) in the statistics' dtype [N] (a row gather: O(N D))."""
    z = (h.to(stat_dtype) * weight[y_safe].to(stat_dtype)).sum(-1)
    if bias is not None:
        z = z + bias[y_safe].to(stat_dtype)
    return z


def _capped_logit_sum(h, weight, bias, softcap, stat_dtype):
    """sum_v c tanh((W_v h + b_v) / c) [N], chunked over the vocabulary; each chunk's logits are
    recomputed in the backward (torch.utils.checkpoint), so memory stays one [N, chunk] block."""
    from torch.utils.checkpoint import checkpoint

    N, V = h.shape[0], weight.shape[0]
    chunk = max(1, min(V, _SOFTCAP_BLOCK_ELEMENTS // max(N, 1)))
    hs = h.to(stat_dtype)

    def block(hs, w, b):
        z = hs @ w.to(stat_dtype).T
        if b is not None:
            z = z + b.to(stat_dtype)
        return (softcap * torch.tanh(z / softcap)).sum(-1)

    total = torch.zeros(N, dtype=stat_dtype, device=h.device)
    for v0 in range(0, V, chunk):
        b = bias[v0:v0 + chunk] if bias is not None else None
        total = total + checkpoint(block, hs, weight[v0:v0 + chunk], b, use_reentrant=False)
    return total


def _stats_flat(h, weight, bias, y, *, temperature, ignore_index, entropy, self_certainty, softcap, options):
    """TokenStats of flat inputs h [N, D], y [N]. temperature: a float (a SymFloat or 0-d
    tensor while Dynamo traces), or [N], one per token."""
    out = linear_logprobs(h, weight, y, bias=bias, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=entropy, softcap=softcap, **options)
    logp, ent = out if entropy else (out, None)
    sc = None
    if self_certainty:
        vp = options.get("vocab_parallel")
        if vp is None:
            sc = self_certainty_from_logp(h, weight, y, logp, bias=bias, temperature=temperature, softcap=softcap,
                                          ignore_index=ignore_index)
        else:
            dt = output_dtype(h.dtype)
            valid = y != ignore_index
            z_y, z_sum, V = _logit_pieces_vocab_parallel(h, weight, bias, y, valid, softcap, dt, vp)
            sc = _self_certainty(z_y, z_sum, V, logp, valid, temperature, softcap, dt)
    return TokenStats(logp, ent, sc)


def self_certainty_from_logp(hidden, weight, targets, logp, *, bias=None, temperature=1.0, softcap=None,
                             ignore_index: int = -100) -> torch.Tensor:
    """Self-certainty KL(U || p_t) [N] of flat hidden [N, D] / targets [N] given the op's own
    log-probs logp [N] of those targets (linear_logprobs, or linear_rlsc_loss's token_logp) under
    the same head, temperature and softcap: lse_t = z_t,y_t - logp_t, so only a row gather and a
    matvec with the column sum of W are added (O(N D); a soft-cap adds one vocabulary sweep).
    Differentiable through hidden, weight, bias and logp; 0 at ignored targets. What a caller that
    already ran the loss uses to log self-certainty without a second pass over the vocabulary."""
    dt = output_dtype(hidden.dtype)
    valid = targets != ignore_index
    y_safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    z_y, z_sum = _logit_pieces(hidden, weight, bias, y_safe, valid, softcap, dt)
    return _self_certainty(z_y, z_sum, weight.shape[0], logp, valid, temperature, softcap, dt)


def _self_certainty(z_y, z_sum, V, logp, valid, temperature, softcap, dt):
    """lse - mean logit - log V per token from the uncapped target logit z_y and the (capped) logit
    sum z_sum, both before the temperature."""
    if softcap is not None:
        z_y = softcap * torch.tanh(z_y / softcap)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(dt)
    lse = z_y / temperature - logp.to(dt)
    log_v = math.log(V) if isinstance(V, int) else torch.log(V)
    sc = lse - z_sum / (V * temperature) - log_v
    return torch.where(valid, sc, torch.zeros_like(sc))


def _logit_pieces(h, weight, bias, y_safe, valid, softcap, dt):
    """(target logit W_y . h + b_y, sum over the vocabulary of the (capped) logits W_v . h + b_v), [N] each,
    before the temperature; the target logit is not capped yet."""
    z_y = _target_logit(h, weight, bias, y_safe, dt)
    if softcap is not None:
        return z_y, _capped_logit_sum(h, weight, bias, softcap, dt)
    z_sum = h.to(dt) @ weight.to(dt).sum(0)
    if bias is not None:
        z_sum = z_sum + bias.to(dt).sum()
    return z_y, z_sum


class _CopyToRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group's ranks (each rank's
    gradient w.r.t. the replicated hidden states covers its own vocabulary slice only)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (SUM) forward; the backward passes the (replicated) gradient to the local part."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _logit_pieces_vocab_parallel(h, weight, bias, y, valid, softcap, dt, vp):
    """_logit_pieces on a vocabulary split over ranks: each rank computes its slice's part of the
    target logit (0 unless the target is in its slice) and of the logit sum, and one SUM
    all-reduce of 2 N + 1 values (the last: the global V) merges them. Every rank holds the same
    tokens, so an empty batch makes no collective on any rank. V comes back as a 0-d tensor."""
    N = h.shape[0]
    if N == 0:
        zero = h.new_zeros(0, dtype=dt) + h.to(dt).sum() * 0.0
        return zero, zero, weight.shape[0]
    hc = _CopyToRanks.apply(h, vp.group)
    mine = valid & (y >= vp.start) & (y < vp.stop)
    y_local = torch.where(mine, y - vp.start, torch.zeros_like(y)).long()
    z_y, z_sum = _logit_pieces(hc, weight, bias, y_local, mine, softcap, dt)
    z_y = torch.where(mine, z_y, torch.zeros_like(z_y))
    packed = torch.cat([z_y, z_sum, torch.full((1,), float(weight.shape[0]), dtype=dt, device=h.device)])
    total = _SumOverRanks.apply(packed, vp.group)
    return total[:N], total[N:2 * N], total[-1].detach()  # V as a tensor: no host sync


def _check_options(options: dict) -> dict:
    allowed = ("filter_eps", "backend", "backward", "grad_matmul", "buffer_bytes", "check_values", "block_configs",
               "vocab_parallel")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"linear_token_stats got unexpected keyword arguments {unknown}; execution options are {allowed}")
    return options


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    entropy: bool = True,
    self_certainty: bool = True,
    softcap: Optional[float] = None,
    seq_index: Optional[torch.Tensor] = None,
    **options,
) -> TokenStats:
    """Log-prob, entropy and self-certainty of every token, from hidden states and the head.

    hidden [..., D], weight [V, D], bias [V] or None, targets [...] (the sampled tokens, or
    ignore_index for tokens to skip), as in linear_logprobs. Returns TokenStats of tensors shaped
    like targets, float32 (float64 for float64 inputs), 0 at ignored tokens:
      logp            log softmax(z)[y]
      entropy         -sum_v p_v log p_v                 (entropy=True)
      self_certainty  KL(U || p) = lse - mean_v z_v - log V >= 0   (self_certainty=True; the
                      Intuitor / RLIF reward, arXiv 2505.19590; independent of which target a
                      scored token has)
    with z = (hidden @ weight.T + bias) / temperature (softcap c: c tanh(. / c) before the
    temperature). Each output is differentiable w.r.t. hidden, weight and bias.

    temperature: a float > 0 (or a 0-d float tensor), or a tensor of positive values: shaped
      like targets (per token), [B] for targets [B, T] (per row), or [S] together with seq_index
      (shaped like targets, ids in [0, S); per sequence of a packed batch); linear_logprobs runs
      it (rlsc_kernels/temperature.py). No gradient flows to a temperature tensor. Its values
      (finite, > 0, seq_index ids in range) are checked with the other value checks unless
      check_values=False.
    Under torch.compile (also fullgraph=True): same results and gradients, through
      linear_logprobs' custom ops; a new float temperature is not a new compilation, nor are new
      values of a temperature tensor.
    options: linear_logprobs' execution keywords (backend, filter_eps, backward, grad_matmul,
      buffer_bytes, check_values, block_configs, vocab_parallel). With vocab_parallel the
      self-certainty's two closed-form pieces (target logit, logit sum) are merged over the ranks
      with one more SUM all-reduce of 8 bytes per token (fp32) + 4; its hidden-state gradient
      is summed over the ranks in the backward (4 D bytes per token).
    Cost beyond linear_logprobs: self-certainty is two O(N D) dot products per token and one
    O(V D) column sum of the weight per call; with softcap, one more logits sweep (chunked PyTorch).
    """
    hidden, weight, bias, autocast_off = autocast_inputs(hidden, weight, bias)
    check_head(hidden, weight, bias, targets, ignore_index)
    options = _check_options(dict(options))
    softcap = check_softcap(softcap)
    if is_per_token(temperature):  # checked here (shapes) and by linear_logprobs (values)
        temperature = per_token_temperature(temperature, targets, seq_index)
    else:
        temperature = check_temperature(temperature, tracing=torch.compiler.is_compiling())
    shape = targets.shape
    with autocast_off:
        stats = _stats_flat(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                            temperature=temperature, ignore_index=ignore_index, entropy=entropy,
                            self_certainty=self_certainty, softcap=softcap, options=options)
    return TokenStats(*(None if t is None else t.reshape(shape)
                        for t in (stats.logp, stats.entropy, stats.self_certainty)))


def linear_self_certainty(hidden, weight, targets, **kwargs) -> torch.Tensor:
    """Self-certainty KL(U || p) per token, shaped like targets (linear_token_stats with only
    that output; same arguments)."""
    kwargs.setdefault("entropy", False)
    return linear_token_stats(hidden, weight, targets, self_certainty=True, **kwargs).self_certainty
