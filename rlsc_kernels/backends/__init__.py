"""Backend dispatch: which implementation of the two vocabulary sweeps serves a call.

"auto" picks Triton for CUDA tensors (when Triton imports), the native C++ backend on CPU (when
its extension was built; else PyTorch, with a warning) and the chunked PyTorch backend everywhere
else; "reference" is the naive full-logits version.
"""
from __future__ import annotations

import warnings

import torch

from ..kernels.interpreter import triton_interpreting  # noqa: F401 (re-exported)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


_warned_no_native = False


def native_available() -> bool:
    """Whether the compiled CPU extension (csrc/, rlsc_kernels._native) imports."""
    from . import native

    return native.available()


def _native_or_torch() -> str:
    """backend="auto" on CPU: the native backend, or PyTorch with a one-line warning (once)."""
    global _warned_no_native
    if native_available():
        return "native"
    if not _warned_no_native:
        _warned_no_native = True
        from . import native

        warnings.warn(
            f"rlsc_kernels: native CPU backend not built ({native.unavailable_reason()}); using the PyTorch backend",
            RuntimeWarning,
            stacklevel=5,  # the caller of linear_logprobs / linear_rlsc_loss
        )
    return "torch"


def resolve(backend: str, hidden: torch.Tensor) -> str:
    """Returns "triton", "torch", "native" or "reference"; raises if the requested one cannot serve `hidden`."""
    if backend == "auto":
        if hidden.is_cuda and hidden.dtype != torch.float64 and triton_available():
            return "triton"
        if hidden.device.type == "cpu":
            return _native_or_torch()
        return "torch"
    if backend == "native":
        if hidden.device.type != "cpu":
            raise ValueError(f"backend='native' is the CPU backend; hidden is on {hidden.device}")
        from . import native

        native.extension()  # raises a clear error where the extension was not built
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which failed to import")
        if not (hidden.is_cuda or triton_interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (hidden is on {hidden.device}); "
                "set TRITON_INTERPRET=1 before the kernels are first imported to run them on CPU tensors in Triton's "
                "interpreter"
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
    if name == "native":
        from . import native

        return native
    raise ValueError(f"no fused backend named {name!r}")
