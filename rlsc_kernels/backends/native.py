"""The native CPU backend (backend="native"): the single-pass RLSC loss in C++ (csrc/rlsc_native.cpp,
built by the package build as rlsc_kernels._native).

The chunk loop is the single-pass driver's (rlsc_kernels/single_pass/driver.py); per chunk this
module runs the logits with the library GEMM into one reused [rows, V] buffer, one fused pass
per row (lse, log-prob, entropy statistic; the buffer becomes exp(z - max)), then, with the
driver's per-token coefficients, the two gradient GEMMs (dH = dz W,
dW += dz^T h) with dz = c exp(z - max) + onehot(y) g (1 - p_y) applied through their small
operands (no sweep writes dz), all in float32 (float64 for float64 inputs).
dW is accumulated over the chunks in float32; 16-bit weights are upcast to float32 once per
call (one W-sized float32 temporary next to the float32 dW).

The two-sweep forward/backward (linear_logprobs, and extra upstream gradients of
linear_rlsc_loss's per-token outputs) are the PyTorch backend's: the C++ serves the single pass.
Threads: ATen's pool, so torch.set_num_threads applies.
"""
from __future__ import annotations

import torch

from ..options import FusedOptions
from ..dtypes import output_dtype
from . import torch_chunked


def _import_extension():
    try:
        from .. import _native
    except ImportError as e:
        return None, e
    return _native, None


#: The compiled extension, or None with the reason it could not be imported (no compiler at
#: install time, a failed build, or a torch it was not built against).
_EXT, _EXT_ERROR = _import_extension()

#: Default logits budget per chunk: 128 MB of float32 (682 tokens at V = 49152, so two
#: 256-token sequences per chunk). Set per call with buffer_bytes.
BUFFER_BYTES = 1 << 27


def available() -> bool:
    return _EXT is not None


def unavailable_reason() -> str:
    return f"{type(_EXT_ERROR).__name__}: {_EXT_ERROR}" if _EXT_ERROR is not None else ""


def extension():
    if _EXT is None:
        raise RuntimeError(
            "backend='native' needs the compiled CPU extension rlsc_kernels._native, which is not available "
            f"({unavailable_reason()}). Reinstall with a C++ compiler present: "
            "pip install --no-build-isolation -e . ; or use backend='torch'"
        )
    return _EXT


def forward(hidden, weight, bias, targets, opts: FusedOptions):
    """Two-sweep forward: the PyTorch backend's."""
    return torch_chunked.forward(hidden, weight, bias, targets, opts)


def backward(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, opts: FusedOptions, needs):
    """Two-sweep backward: the PyTorch backend's."""
    return torch_chunked.backward(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, opts, needs)


class SinglePassOps:
    """The driver's primitives (single_pass/driver.py) on CPU tensors: the C++ chunk_forward and
    chunk_backward, each called from one place."""

    def __init__(self, hidden, weight, bias, targets, opts: FusedOptions, max_rows: int):
        self.ext = extension()
        if hidden.device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got hidden on {hidden.device}")
        self.acc = output_dtype(hidden.dtype)
        self.hidden = hidden
        self.w = weight.to(self.acc).contiguous()
        self.b = bias.to(self.acc).contiguous() if bias is not None else None
        self.temperature = opts.temperature
        self.entropy = opts.return_entropy
        valid = targets != opts.ignore_index
        self.targets = torch.where(valid, targets, torch.zeros_like(targets)).contiguous()
        self.buf = torch.empty(max_rows, weight.shape[0], dtype=self.acc)
        self._chunk = None

    def stats(self, t0, t1):
        h = self.hidden[t0:t1].to(self.acc).contiguous()
        y = self.targets[t0:t1]
        z = self.buf[: t1 - t0]
        lse, logp, sumexp, rest, mean_z = self.ext.chunk_forward(z, h, self.w, self.b, y, self.temperature,
                                                                  self.entropy)
        self._chunk = (h, y, z, sumexp, rest)
        return lse, logp, mean_z if self.entropy else None

    def grads(self, t0, t1, g, dh, parts):
        h, y, z, sumexp, rest = self._chunk
        self._chunk = None
        g = g.contiguous()
        if not parts:  # dhidden only
            parts = [(0, t1 - t0, None, None)]
        for r0, r1, dw, db in parts:
            self.ext.chunk_backward(z[r0:r1], h[r0:r1], self.w, y[r0:r1], g[r0:r1], sumexp[r0:r1], rest[r0:r1],
                                    dh[r0:r1] if dh is not None else None, dw, db)

    def grad_scale(self, bound):
        return 1.0  # dz is fp32 (fp64) here: no range to fit

    def finish(self):
        self._chunk = self.buf = None
