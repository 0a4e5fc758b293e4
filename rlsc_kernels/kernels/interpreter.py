"""Whether the Triton kernels run compiled (GPU) or in Triton's interpreter (CPU tensors)."""
from __future__ import annotations


def triton_interpreting() -> bool:
    """Whether our Triton kernels run in Triton's interpreter (on CPU tensors).

    That is Triton's own switch, TRITON_INTERPRET, and Triton reads it once: when ``@triton.jit``
    decorates a kernel, at the kernel module's first import. So this asks the kernel object what
    Triton made of it, and reads no environment variable: setting TRITON_INTERPRET after the
    kernels were imported changes nothing, here as in Triton (set it before importing
    rlsc_kernels' Triton backend, as tests/conftest.py does)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .forward_sweep import forward_sweep_kernel

    return isinstance(forward_sweep_kernel, InterpretedFunction)
