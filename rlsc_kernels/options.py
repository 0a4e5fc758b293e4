"""The small frozen options object that travels with the fused op through autograd.

Every choice a caller may want (backward strategy, matmul choice, buffer budget, filter, block
sizes for tuning) is a field here, set from a keyword argument of the public op: nothing is read
from environment variables or module-level state at call time, so two threads may call the op
with different options at once. (Triton's own TRITON_INTERPRET is read by Triton once, when the
kernels are imported; backends.triton_interpreting() asks the kernels, not the environment.)
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

#: Gradient-filter threshold used by ``filter_eps="auto"`` for 16-bit inputs where the filter
#: really skips work: the bf16 machine epsilon (2^-7) divided by 32. A backward tile whose
#: gradient mass per token is below ``eps * (|g_logp| + |g_entropy|)`` changes a bf16 result by
#: less than its rounding step.
AUTO_FILTER_EPS = 2.0**-7 / 32

BACKWARD_STRATEGIES = ("sliced", "fused")
GRAD_MATMULS = ("library", "triton")
NATIVE_MATMULS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch parameters of one Triton kernel (block_v is unused by the matmuls)."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int = 8


@dataclass(frozen=True)
class BlockConfigs:
    """Triton block sizes for one call, for tests and tuning; a None field keeps the shipped value.

    forward: the forward sweep. grad_logits: the sliced backward's tile kernel. backward: the
    fused backward's kernel. matmul: the sliced backward's block-sparse matmuls (block_n = output
    rows, block_d = output columns) with K step matmul_block_k, which must divide the
    grad_logits tile sizes.
    """

    forward: Optional[KernelConfig] = None
    grad_logits: Optional[KernelConfig] = None
    backward: Optional[KernelConfig] = None
    matmul: Optional[KernelConfig] = None
    matmul_block_k: Optional[int] = None


@dataclass(frozen=True)
class FusedOptions:
    """Options of one fused linear log-prob call.

    temperature: logits are divided by it before the softmax (> 0).
    ignore_index: targets equal to it get log-prob 0, entropy 0 and no gradient.
    return_entropy: also compute the entropy of each token's distribution.
    filter_eps: None for the exact backward, or the per-token relative gradient mass below which
        a backward tile (token block x vocab block) is skipped (Triton backend only).
    backward: the Triton backward strategy, "sliced" (logit-gradient slices + two matmuls) or
        "fused" (one kernel with fp32 atomics).
    grad_matmul: the sliced backward's matmuls, "library" (torch.mm / cuBLAS) or "triton"
        (block-sparse: skips the tiles the filter dropped).
    buffer_bytes: budget in bytes for the largest temporary block a backend holds at a time
        (torch: a logits block; Triton sliced: the logit-gradient slice; Triton fused: the fp32
        dweight slice of a 16-bit weight); None = the backend's default.
    softcap: logit soft-cap c > 0, or None (off): the logits are c * tanh((W h + b) / c), then
        divided by the temperature (the order of the models that cap, e.g. Gemma 2, and of their
        sampling: the model's forward caps, generation then divides by T).
    block_configs: Triton block sizes for this call (tests, tuning); None = the shipped ones.
    dweight_fp32: return dweight in fp32 for 16-bit inputs (set by the autograd boundary for an
        fp32 master weight under autocast, not by callers): the fp32 accumulation is never
        rounded to 16 bits.
    native_matmul: the native CPU backend's GEMMs for bf16 inputs: "bf16" (bf16 operands, fp32
        accumulation and fp32 outputs, on AMX-BF16 / AVX512-BF16 through MKL; raises where
        unavailable), "fp32" (operands upcast to fp32) or "auto" (bf16 where available). Other
        input dtypes always take their own precision.
    """

    temperature: float = 1.0
    ignore_index: int = -100
    return_entropy: bool = False
    filter_eps: Optional[float] = None
    backward: str = "sliced"
    grad_matmul: str = "library"
    buffer_bytes: Optional[int] = None
    softcap: Optional[float] = None
    block_configs: Optional[BlockConfigs] = None
    dweight_fp32: bool = False
    native_matmul: str = "auto"


def check_softcap(softcap) -> Optional[float]:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (0.0 < float(softcap) < float("inf")):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    return float(softcap)


def check_backward(backward) -> str:
    if backward not in BACKWARD_STRATEGIES:
        raise ValueError(f"backward must be one of {BACKWARD_STRATEGIES}, got {backward!r}")
    return backward


def check_grad_matmul(grad_matmul) -> str:
    if grad_matmul not in GRAD_MATMULS:
        raise ValueError(f"grad_matmul must be one of {GRAD_MATMULS}, got {grad_matmul!r}")
    return grad_matmul


def check_native_matmul(native_matmul) -> str:
    if native_matmul not in NATIVE_MATMULS:
        raise ValueError(f"native_matmul must be one of {NATIVE_MATMULS}, got {native_matmul!r}")
    return native_matmul


def check_buffer_bytes(buffer_bytes) -> Optional[int]:
    if buffer_bytes is None:
        return None
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, numbers.Integral) or buffer_bytes <= 0:
        raise ValueError(f"buffer_bytes must be None or an int > 0 (bytes), got {buffer_bytes!r}")
    return int(buffer_bytes)


def check_block_configs(block_configs) -> Optional[BlockConfigs]:
    if block_configs is not None and not isinstance(block_configs, BlockConfigs):
        raise TypeError(f"block_configs must be None or an rlsc_kernels.BlockConfigs, got {type(block_configs).__name__}")
    return block_configs


def filter_skips_work(backward: str, grad_matmul: str) -> bool:
    """Whether a filtered tile is really skipped on this Triton backward path. On the default
    sliced backward with library matmuls a skipped tile is written as zeros into dense matmuls:
    no work is saved there, only accuracy lost."""
    return backward == "fused" or grad_matmul == "triton"


def resolve_filter_eps(filter_eps, dtype, backward: str = "sliced", grad_matmul: str = "library") -> Optional[float]:
    """Turn the user's ``filter_eps`` into a float threshold or None (exact).

    "auto" filters only where the filter buys time: 16-bit inputs (a skipped tile is below the
    output's rounding step; fp32/fp64 callers asked for full precision) on a backward path that
    really skips the filtered tiles (backward="fused" or grad_matmul="triton"). Everywhere else
    "auto" is exact. A float is used as given on every Triton path.
    """
    import torch

    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be None, 'auto' or a float >= 0, got {filter_eps!r}")
        if dtype in (torch.bfloat16, torch.float16) and filter_skips_work(backward, grad_matmul):
            return AUTO_FILTER_EPS
        return None
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(f"filter_eps must be None, 'auto' or a float >= 0, got {type(filter_eps).__name__}")
    if not (filter_eps >= 0.0) or filter_eps != filter_eps or filter_eps == float("inf"):
        raise ValueError(f"filter_eps must be a finite float >= 0, got {filter_eps!r}")
    return float(filter_eps) if filter_eps > 0 else None
