"""Per-sequence RLSC weights w_s = weight(L_s), computed detached and in float64.

L_s <= 0 is the sequence log-probability. Every weighting is evaluated from L in log space or
with exp of a non-positive number, so no weight overflows or becomes NaN for any finite L
(exp of a very negative L underflows to 0, which is the mathematically correct limit).
"""
from __future__ import annotations

import torch

WEIGHTINGS = ("rlsc", "rlsc-l1", "entropy", "length")


def check_external_weights(weights: torch.Tensor, n_seqs: int, device: torch.device) -> None:
    """External weights must be a floating tensor [n_seqs] on `device` (finiteness is a value
    check: linear_rlsc_loss makes it with its other value checks, in their one sync)."""
    if weights.dim() != 1 or weights.shape[0] != n_seqs:
        raise ValueError(f"weighting tensor must have shape [{n_seqs}] (one weight per sequence), got {list(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weighting tensor must be floating point, got {weights.dtype}")
    if weights.device != device:
        raise ValueError(f"weighting tensor is on {weights.device}, expected {device}")


def rlsc_weights(seq_logp: torch.Tensor, n_tokens: torch.Tensor, weighting="rlsc", alpha: float = 0.1) -> torch.Tensor:
    """Weights [S] float32 (detached) for sequence log-probs ``seq_logp`` [S].

    "rlsc":    exp(L) + alpha         (the paper's L2; p_old + alpha)
    "rlsc-l1": exp(L)                 (the paper's L1)
    "entropy": 1 + L                  (the paper's Table 1 "Shannon entropy" variant)
    "length":  exp(L / n) + alpha     (geometric-mean token probability; n = scored tokens)
    a tensor:  those weights, float32, one per sequence (external rewards)
    """
    L = seq_logp.detach().to(torch.float64)
    if isinstance(weighting, torch.Tensor):
        check_external_weights(weighting, L.shape[0], L.device)
        return weighting.detach().to(torch.float32)
    # L > 0 only through rounding; clamp so exp(L) stays a probability.
    L = L.clamp(max=0.0)
    if weighting == "rlsc":
        w = torch.exp(L) + alpha
    elif weighting == "rlsc-l1":
        w = torch.exp(L)
    elif weighting == "entropy":
        w = 1.0 + L
    elif weighting == "length":
        n = n_tokens.detach().to(torch.float64).clamp(min=1.0)
        w = torch.exp(L / n) + alpha
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a float tensor [S], got {weighting!r}")
    return w.to(torch.float32)
