"""The naive full-logits implementation: the paper's Algorithm 1, and the test oracle.

Run in float64 it is the oracle every backend is judged against; run in the input dtype it is
the "same-dtype PyTorch" baseline whose error sets the tolerance for low-precision results.
It materialises the whole [N, V] logits (and autograd keeps them), so it is for tests and
benchmarks, never for training at scale.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dtypes import output_dtype  # noqa: F401  (re-exported: it lives below every path now)
from .options import FusedOptions


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    opts: FusedOptions,
    temperature=None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs [N] (and entropy [N]) of ``targets`` [N] under softmax((hidden @ weight.T + bias) / T),
    or with opts.softcap = c under softmax(c * tanh((hidden @ weight.T + bias) / c) / T).

    hidden [N, D], weight [V, D], bias [V] or None. The logits GEMM runs in the input dtype
    (as the paper's code does), the softmax in float32 (float64 for float64 inputs).
    Differentiable through plain autograd. temperature: overrides opts.temperature (a 0-d
    tensor while Dynamo traces a schedule's changing value).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    z = logits.to(output_dtype(hidden.dtype))
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    z = z / (opts.temperature if temperature is None else temperature)
    log_probs = torch.log_softmax(z, dim=-1)
    # ids outside [0, V) (let through by check_values=False) count as ignored, as in autograd.py
    valid = (targets != opts.ignore_index) & (targets >= 0) & (targets < weight.shape[0])
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = None
    if opts.return_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy
