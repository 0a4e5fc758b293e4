"""Synthetic head inputs that look like what RLSC trains on.

Never time zeros: the backward's gradient filtering and the softmax's cost depend on how peaked
the distributions are. The inputs here imitate a real model:

- hidden [N, D] = standard normal rows, each scaled by a log-normal per-token factor (real
  hidden states give some tokens flat and most tokens sharp distributions);
- weight [V, D] = standard normal / sqrt(D), times one logit scale c, found by bisection on a
  probe of the first tokens so that the mean entropy of softmax(hidden @ weight.T / T) equals a
  target measured on a real model (benchmarks/measure_entropy.py, recorded in results/);
- targets [N] are samples from that softmax at T (Gumbel-max), as RLSC samples its completions;
- seq_index [N]: n_seqs equal-length sequences, packed.

Sampling walks over token chunks, so no [N, V] fp32 tensor exists at once (the largest
temporary is a few [chunk, V] fp32 tensors, about 1 GB for V = 152k).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

#: name -> (D, V) of the heads the comparison covers.
HEADS = {
    "smollm2-135m": (576, 49152),
    "qwen2.5-math-1.5b": (1536, 151936),
    "qwen2.5-math-7b": (3584, 152064),
}
TEMPERATURE = 0.5  # the paper's sampling temperature
ALPHA = 0.1  # the paper's L2 offset
ENTROPY_FILE = Path(__file__).parent / "results" / "entropy.json"
#: Used when results/entropy.json is missing; the value measured there (SmolLM2-135M-Instruct,
#: own GSM8K completions, T = 0.5) is the default.
FALLBACK_ENTROPY = 0.4


def default_target_entropy() -> float:
    """Mean token entropy (nats, at T = 0.5) measured on the embedded model, or the fallback."""
    try:
        return float(json.loads(ENTROPY_FILE.read_text())["mean_entropy"])
    except (OSError, KeyError, ValueError):
        return FALLBACK_ENTROPY


@dataclass
class HeadInputs:
    """One benchmark problem. hidden [N, D] and weight [V, D] in `dtype`; targets, seq_index [N] int64."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    seq_index: torch.Tensor
    n_seqs: int
    temperature: float
    logit_scale: float
    mean_entropy: float  # measured over all N tokens with the final (rounded) weight

    @property
    def N(self) -> int:
        return self.hidden.shape[0]

    def slice(self, n_tokens: int, n_seqs: int) -> "HeadInputs":
        """The first n_tokens tokens regrouped into n_seqs equal sequences (for reference checks)."""
        n_tokens = min(n_tokens, self.N) // n_seqs * n_seqs
        seq = torch.arange(n_seqs, device=self.hidden.device).repeat_interleave(n_tokens // n_seqs)
        return HeadInputs(self.hidden[:n_tokens], self.weight, self.targets[:n_tokens], seq, n_seqs,
                          self.temperature, self.logit_scale, self.mean_entropy)


def token_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy [rows] (nats) of softmax(z) for fp32 logits z [rows, V]: lse - sum_v p_v z_v."""
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse[:, None])
    return lse - (p * z).sum(-1)


def fit_logit_scale(z0: torch.Tensor, target_entropy: float, iters: int = 30) -> float:
    """Scale c > 0 with mean_t entropy(softmax(c * z0_t)) = target_entropy (bisection on log c).

    The entropy of softmax(c z) decreases monotonically in c (its derivative is -c Var_p(z)).
    """
    lo, hi = math.log(1e-3), math.log(1e4)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(token_entropy(z0 * math.exp(mid)).mean()) > target_entropy:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def sample_targets(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, generator: torch.Generator,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, float]:
    """targets [N] ~ softmax(hidden @ weight.T / T) by Gumbel-max, chunk by chunk; and the mean entropy."""
    N, V = hidden.shape[0], weight.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, min(N, (1 << 26) // V))  # ~256 MB of fp32 logits per chunk
    targets = torch.empty(N, dtype=torch.int64, device=hidden.device)
    ent_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, N, chunk_tokens):
        z = (hidden[s : s + chunk_tokens] @ weight.T).float().div_(temperature)
        ent_sum += token_entropy(z).double().sum()
        u = torch.rand(z.shape, generator=generator, device=z.device).clamp_(min=1e-20)
        targets[s : s + chunk_tokens] = (z - torch.log(-torch.log(u))).argmax(-1)
        del z, u
    return targets, float(ent_sum) / N


def make_inputs(V: int, D: int, n_seqs: int, seq_len: int, *, dtype=torch.bfloat16, device="cpu",
                target_entropy: float | None = None, temperature: float = TEMPERATURE, seed: int = 0,
                token_spread: float = 0.5, probe_tokens: int = 256) -> HeadInputs:
    """A realistic problem of n_seqs x seq_len tokens for a head of width D and vocabulary V."""
    if target_entropy is None:
        target_entropy = default_target_entropy()
    device = torch.device(device)
    N = n_seqs * seq_len
    g = torch.Generator(device=device).manual_seed(seed)
    spread = torch.exp(token_spread * torch.randn(N, 1, generator=g, device=device))
    hidden = (torch.randn(N, D, generator=g, device=device) * spread).to(dtype)
    w0 = torch.randn(V, D, generator=g, device=device).div_(math.sqrt(D))
    probe = hidden[:probe_tokens].float()
    scale = fit_logit_scale((probe @ w0.T) / temperature, target_entropy)
    weight = w0.mul_(scale).to(dtype)
    del w0
    targets, mean_entropy = sample_targets(hidden, weight, temperature, g)
    seq_index = torch.arange(n_seqs, device=device).repeat_interleave(seq_len)
    return HeadInputs(hidden, weight, targets, seq_index, n_seqs, temperature, scale, mean_entropy)
