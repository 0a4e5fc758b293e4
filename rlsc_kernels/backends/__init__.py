"""Backend dispatch: which implementation of the two vocabulary sweeps serves a call.

"auto" picks Triton for CUDA tensors (when Triton imports) and the chunked PyTorch backend
everywhere else; "reference" is the naive full-logits version.
"""
from __future__ import annotations

import os

import torch


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve(backend: str, hidden: torch.Tensor) -> str:
    """Returns "triton", "torch" or "reference"; raises if the requested one cannot serve `hidden`."""
    if backend == "auto":
        if hidden.is_cuda and hidden.dtype != torch.float64 and triton_available():
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which failed to import")
        if not (hidden.is_cuda or triton_interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (hidden is on {hidden.device}); "
                "set TRITON_INTERPRET=1 to run the kernels on CPU tensors in Triton's interpreter"
            )
        if hidden.dtype == torch.float64:
            raise TypeError("backend='triton' accepts bfloat16, float16 and float32 inputs, got float64")
    return backend


def get(name: str):
    """The module implementing forward()/backward() for a fused backend name."""
    if name == "torch":
        from . import torch_chunked

        return torch_chunked
    if name == "triton":
        from . import triton_sweeps

        return triton_sweeps
    raise ValueError(f"no fused backend named {name!r}")
