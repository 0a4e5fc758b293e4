"""`--liger-kernels`: Liger-Kernel's Triton kernels for the model body (RMSNorm, SwiGLU, RoPE) on CUDA.

Applied through Liger's own transformers patch for the model type (`apply_liger_kernel_to_<type>`,
on the loaded instance), with Liger's cross-entropy and fused linear cross-entropy off: the
trainer's head is rlsc_kernels' fused loss, which never materialises the logits. Liger patches
RoPE at the level of the transformers modeling module (its design), so every model of that type in
the process uses it afterwards.
"""
from __future__ import annotations

import inspect

import torch

#: the body kernels we ask for; Liger's cross-entropy and fused linear cross-entropy stay off
BODY_KERNELS = ("rms_norm", "swiglu", "rope")


def apply_liger_kernels(model, device: torch.device) -> list[str]:
    """Patches `model` in place with Liger's body kernels; returns the kernels applied.

    Raises ValueError for a model type Liger has no patch for or a device other than CUDA, and
    RuntimeError when liger-kernel is not installed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise RuntimeError("--liger-kernels needs the liger-kernel package (pip install liger-kernel)") from e
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None:
        raise ValueError(f"--liger-kernels: Liger-Kernel has no patch for model type {model_type!r}; "
                         f"supported: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}")
    if torch.device(device).type != "cuda":
        raise ValueError(f"--liger-kernels needs a CUDA device (Liger's kernels are Triton GPU kernels); "
                         f"got device {torch.device(device).type!r}")
    params = inspect.signature(apply_fn).parameters
    kwargs = {name: True for name in BODY_KERNELS if name in params}
    kwargs.update({name: False for name in ("cross_entropy", "fused_linear_cross_entropy") if name in params})
    apply_fn(model=base, **kwargs)
    return [name for name in BODY_KERNELS if kwargs.get(name)]
