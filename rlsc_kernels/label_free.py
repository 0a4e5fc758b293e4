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

Per-sample temperature: `temperature` may be a tensor, one value per token or per sequence.
Without bias and soft-cap, softmax((W h) / T_t) = softmax(W (h / T_t)): one call on the scaled
hidden states (one extra rounding of h / T_t to the input dtype). With a bias (b / T_t would be a
different bias per token) or a soft-cap (applied before the temperature), the tokens are grouped
by distinct temperature value and the op runs once per value: exact, and cheap for schedules over
samples (at most S distinct values), but W is read once per distinct value. The temperature is
a constant: no gradient flows to it.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .api import linear_logprobs
from .reference import output_dtype
from .validation import check_head, check_temperature, check_tensor

__all__ = ["TokenStats", "linear_token_stats", "linear_self_certainty"]

#: elements of one [N, chunk] fp32 logits block in the soft-cap sweep (64 MB)
_SOFTCAP_BLOCK_ELEMENTS = 1 << 24
_AUTOCAST_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class TokenStats:
    """Per-token statistics, each shaped like targets, float32 (float64 for float64 inputs), 0
    where targets == ignore_index. logp always; entropy and self_certainty when asked (else None)."""

    logp: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    self_certainty: Optional[torch.Tensor] = None


def _autocast(hidden, weight, bias):
    """As the public ops do under torch.autocast: inputs in the region's dtype, op run with autocast off."""
    device_type = hidden.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if enabled else None
    except (RuntimeError, TypeError, ValueError):
        dtype = None
    if dtype is None:
        return hidden, weight, bias, contextlib.nullcontext()

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTABLE else t

    return cast(hidden), cast(weight), cast(bias), torch.autocast(device_type, enabled=False)


def _token_temperature(temperature, targets, seq_index) -> Optional[torch.Tensor]:
    """None for a float temperature, else the per-token temperatures [N] (flattened like targets)."""
    if not isinstance(temperature, torch.Tensor):
        check_temperature(temperature)
        return None
    check_tensor("temperature", temperature, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if temperature.device != targets.device:
        raise ValueError(f"temperature is on {temperature.device} but targets are on {targets.device}")
    shape = tuple(temperature.shape)
    if shape == tuple(targets.shape):
        return temperature.reshape(-1)
    if seq_index is not None:
        check_tensor("seq_index", seq_index, dtypes=(torch.int64, torch.int32))
        if tuple(seq_index.shape) != tuple(targets.shape):
            raise ValueError(f"seq_index must have the shape of targets {list(targets.shape)}, got {list(seq_index.shape)}")
        if temperature.dim() != 1:
            raise ValueError(f"with seq_index, temperature must be [S] (one value per sequence), got {list(shape)}")
        if seq_index.numel() and (int(seq_index.min()) < 0 or int(seq_index.max()) >= shape[0]):
            raise ValueError(f"seq_index holds ids outside [0, {shape[0]}) = the sequences temperature has values for")
        return temperature[seq_index.long().reshape(-1)]
    if targets.dim() >= 2 and shape == tuple(targets.shape[:1]):
        return temperature[:, None].expand(targets.shape).reshape(-1)
    raise ValueError(
        f"temperature must be a float, a tensor shaped like targets {list(targets.shape)} (per token), "
        f"[B] = [{targets.shape[0] if targets.dim() else 0}] for targets [B, T] (per row), or [S] with seq_index "
        f"(per sequence); got shape {list(shape)}")


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


def _stats_flat(h, weight, bias, y, *, temperature: float, ignore_index, entropy, self_certainty, softcap, options):
    """TokenStats of flat inputs h [N, D], y [N] at one float temperature."""
    out = linear_logprobs(h, weight, y, bias=bias, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=entropy, softcap=softcap, **options)
    logp, ent = out if entropy else (out, None)
    sc = None
    if self_certainty:
        dt = output_dtype(h.dtype)
        valid = y != ignore_index
        vp = options.get("vocab_parallel")
        if vp is None:
            V = weight.shape[0]
            y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
            z_y, z_sum = _logit_pieces(h, weight, bias, y_safe, valid, softcap, dt)
        else:
            z_y, z_sum, V = _logit_pieces_vocab_parallel(h, weight, bias, y, valid, softcap, dt, vp)
        if softcap is not None:
            z_y = softcap * torch.tanh(z_y / softcap)
        lse = z_y / temperature - logp.to(dt)
        log_v = math.log(V) if isinstance(V, int) else torch.log(V)
        sc = lse - z_sum / (V * temperature) - log_v
        sc = torch.where(valid, sc, torch.zeros_like(sc))
    return TokenStats(logp, ent, sc)


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

    temperature: a float > 0, or a tensor of positive values: shaped like targets (per token),
      [B] for targets [B, T] (per row), or [S] together with seq_index (shaped like targets, ids
      in [0, S); per sequence of a packed batch). No gradient flows to a temperature tensor.
    options: linear_logprobs' execution keywords (backend, filter_eps, backward, grad_matmul,
      buffer_bytes, check_values, block_configs, vocab_parallel). With vocab_parallel the
      self-certainty's two closed-form pieces (target logit, logit sum) are merged over the ranks
      with one more SUM all-reduce of 8 bytes per token (fp32) + 4; its hidden-state gradient
      is summed over the ranks in the backward (4 D bytes per token).
    Cost beyond linear_logprobs: self-certainty is two O(N D) dot products per token and one
    O(V D) column sum of the weight per call; with softcap, one more logits sweep (chunked PyTorch).
    """
    hidden, weight, bias, autocast_off = _autocast(hidden, weight, bias)
    check_head(hidden, weight, bias, targets, ignore_index)
    options = _check_options(dict(options))
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not 0 < float(softcap) < math.inf):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    token_t = _token_temperature(temperature, targets, seq_index)
    if token_t is not None and options.get("check_values", True):
        bad = ~(torch.isfinite(token_t) & (token_t > 0))
        if bool(bad.any()):
            raise ValueError("temperature tensor must hold finite values > 0")
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    kw = dict(ignore_index=ignore_index, entropy=entropy, self_certainty=self_certainty, softcap=softcap,
              options=options)
    with autocast_off:
        if token_t is None:
            stats = _stats_flat(h, weight, bias, y, temperature=float(temperature), **kw)
        elif bias is None and softcap is None:
            scaled = h / token_t.detach().to(h.dtype if h.dtype == torch.float64 else torch.float32)[:, None]
            stats = _stats_flat(scaled.to(h.dtype), weight, bias, y, temperature=1.0, **kw)
        else:
            stats = _grouped_by_temperature(h, weight, bias, y, token_t.detach(), kw)
    return TokenStats(*(None if t is None else t.reshape(shape)
                        for t in (stats.logp, stats.entropy, stats.self_certainty)))


def _grouped_by_temperature(h, weight, bias, y, token_t, kw) -> TokenStats:
    """One op call per distinct temperature value; results scattered back into token order."""
    N = h.shape[0]
    values = torch.unique(token_t).tolist() if N else []
    if not values:
        return _stats_flat(h, weight, bias, y, temperature=1.0, **kw)
    if len(values) == 1:
        return _stats_flat(h, weight, bias, y, temperature=float(values[0]), **kw)
    dt = output_dtype(h.dtype)
    outs = {"logp": [], "entropy": [], "self_certainty": []}
    order = []
    for t in values:
        idx = (token_t == t).nonzero().squeeze(-1)
        order.append(idx)
        part = _stats_flat(h[idx], weight, bias, y[idx], temperature=float(t), **kw)
        for name in outs:
            outs[name].append(getattr(part, name))
    perm = torch.cat(order)
    result = {}
    for name, parts in outs.items():
        if parts[0] is None:
            result[name] = None
            continue
        result[name] = torch.zeros(N, dtype=dt, device=h.device).index_copy(0, perm, torch.cat(parts).to(dt))
    return TokenStats(result["logp"], result["entropy"], result["self_certainty"])


def linear_self_certainty(hidden, weight, targets, **kwargs) -> torch.Tensor:
    """Self-certainty KL(U || p) per token, shaped like targets (linear_token_stats with only
    that output; same arguments)."""
    kwargs.setdefault("entropy", False)
    return linear_token_stats(hidden, weight, targets, self_certainty=True, **kwargs).self_certainty
