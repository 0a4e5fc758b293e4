"""Which floating types the op computes in: the ground floor every path, backend and reference imports.

Statistics (log-probs, lse, entropy, sequence sums) and accumulated gradients are float32, or
float64 when the inputs are float64 (the oracle). Nothing here imports the rest of the package.
"""
from __future__ import annotations

import torch


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float32, or float64 when the inputs are float64 (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
