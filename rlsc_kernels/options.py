"""The small frozen options object that travels with the fused op through autograd."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Gradient-filter threshold used by ``filter_eps="auto"`` for 16-bit inputs: the bf16 machine
#: epsilon (2^-7) divided by 32. A backward tile whose gradient mass per token is below
#: ``eps * (|g_logp| + |g_entropy|)`` changes a bf16 result by less than its rounding step.
AUTO_FILTER_EPS = 2.0**-7 / 32


@dataclass(frozen=True)
class FusedOptions:
    """Options of one fused linear log-prob call.

    temperature: logits are divided by it before the softmax (> 0).
    ignore_index: targets equal to it get log-prob 0, entropy 0 and no gradient.
    return_entropy: also compute the entropy of each token's distribution.
    filter_eps: None for the exact backward, or the per-token relative gradient mass below which
        a backward tile (token block x vocab block) is skipped (Triton backend only).
    """

    temperature: float = 1.0
    ignore_index: int = -100
    return_entropy: bool = False
    filter_eps: Optional[float] = None


def resolve_filter_eps(filter_eps, dtype) -> Optional[float]:
    """Turn the user's ``filter_eps`` into a float threshold or None (exact).

    "auto" filters for 16-bit inputs only: there a skipped tile is below the output's rounding
    step; fp32/fp64 callers asked for full precision, so "auto" is exact for them.
    """
    import torch

    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be None, 'auto' or a float >= 0, got {filter_eps!r}")
        return AUTO_FILTER_EPS if dtype in (torch.bfloat16, torch.float16) else None
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(f"filter_eps must be None, 'auto' or a float >= 0, got {type(filter_eps).__name__}")
    if not (filter_eps >= 0.0) or filter_eps != filter_eps or filter_eps == float("inf"):
        raise ValueError(f"filter_eps must be a finite float >= 0, got {filter_eps!r}")
    return float(filter_eps) if filter_eps > 0 else None
