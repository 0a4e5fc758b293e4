"""The native CPU backend (backend="native"): the single-pass RLSC loss in C++ (csrc/rlsc_native.cpp,
built by the package build as rlsc_kernels._native).

The chunk loop is the single-pass driver's (rlsc_kernels/single_pass/driver.py); per chunk this
module runs the logits with the library GEMM into one reused [rows, V] buffer, one fused pass
per row (lse, log-prob, entropy statistic; the buffer becomes exp(z - max)), then, with the
driver's per-token coefficients, the two gradient GEMMs (dH = dz W,
dW += dz^T h) with dz = c exp(z - max) + onehot(y) g (1 - p_y) applied through their small
operands (no sweep writes dz), all in float32 (float64 for float64 inputs).
dW is accumulated over the chunks in float32.

bf16 inputs (`gemm_operands`): where the CPU has bf16 matrix or vector units (AMX-BF16,
AVX512-BF16) and the loaded torch exports MKL's cblas_gemm_bf16bf16f32 (`bf16_gemm_status()`),
the three GEMMs take the bf16 operands as they are, with fp32 accumulation and fp32 outputs:
the logits are as exact as an fp32 GEMM of the same bf16 inputs, so every statistic (lse, logp,
entropy, weights) is the fp32 path's; only e = exp(z - r) (r: a per-row reference near the
max) and the small operand c h of dW are rounded to bf16 (a 16-bit logit gradient, the GPU bf16
path's bound), and dW still accumulates in fp32. The forward goes by vocabulary blocks whose fp32
logits stay in cache; the chunk buffer ends holding e as bf16 in the first half of each row's
bytes (opaque to this driver: it passes the same buffer, or row slices of it, to chunk_backward). No fp32 copy of W is made. Elsewhere, or with
native_matmul="fp32", bf16 and fp16 inputs are upcast to float32 (the weight once per call: one
W-sized float32 temporary next to the float32 dW) and take the float32 GEMMs.

Invalid target ids (check_values=False): an id outside [0, V) counts as ignored, as on every
backend (autograd.scored): log-prob 0, no gradient, no effect on its sequence's L_s. The C++
also bounds-checks every id it is handed on every call (n comparisons per chunk, no sync: the
tensors are on the CPU) and raises IndexError naming it, so no input reads or writes out of
bounds whatever the driver passes.

The two-sweep forward/backward (linear_logprobs, and extra upstream gradients of
linear_rlsc_loss's per-token outputs) are the PyTorch backend's: the C++ serves the single pass.
Threads: ATen's pool, so torch.set_num_threads applies.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..autograd import scored
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


def bf16_gemm_status(default: bool = True) -> Tuple[bool, str]:
    """(usable, why): whether bf16 inputs take the bf16 GEMMs here, by default (native_matmul
    "auto"; default=False: whether they can at all, for "bf16"). Detected once per process by
    the extension: the CPU's AMX-BF16 / AVX512-BF16 (cpuid, with the OS enabling their register
    state) and MKL's cblas_gemm_bf16bf16f32 in the loaded libraries. The default also wants an
    Intel CPU: MKL's bf16 kernels were measured on Intel only (elsewhere "bf16" opts in)."""
    if _EXT is None:
        return False, f"native extension not built ({unavailable_reason()})"
    usable, _amx, _avx512_bf16, _symbol, intel, why = _EXT.bf16_gemm_status()
    return bool(usable and (intel or not default)), why


def cpu_bf16_units() -> Tuple[bool, bool]:
    """(AMX-BF16, AVX512-BF16): the CPU's bf16 matrix / vector units, by cpuid with the OS enabling
    their register state (detected by the extension; (False, False) where it is not built)."""
    if _EXT is None:
        return False, False
    _usable, amx, avx512_bf16, _symbol, _intel, _why = _EXT.bf16_gemm_status()
    return bool(amx), bool(avx512_bf16)


def bf16_linear(hidden: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """hidden [M, K] @ weight [N, K]^T as float32 from bf16 CPU operands through MKL's
    cblas_gemm_bf16bf16f32 (products exact, fp32 accumulation and output), or None where that GEMM
    is not usable here (bf16_gemm_status(default=False)) or the inputs are not bf16 CPU matrices.
    Its point is exactness without an fp32 copy of the weight; its speed against the fp32 GEMM of
    the same values on an AMD EPYC with AVX512-BF16, idle: 0.77-1.07x at 17 x 576 x 49152 and
    0.93-0.97x at 136 rows over two runs, about even (benchmarks/results/cpu-bf16.md, AMD section)."""
    if (hidden.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or hidden.device.type != "cpu"
            or weight.device.type != "cpu" or hidden.dim() != 2 or weight.dim() != 2):
        return None
    if not bf16_gemm_status(default=False)[0]:
        return None
    return _EXT.bf16_linear(hidden, weight)


def gemm_dtype(dtype: torch.dtype, native_matmul: str = "auto") -> torch.dtype:
    """The dtype of the GEMM operands for inputs of `dtype`: bfloat16 for bf16 inputs on the bf16
    GEMMs (native_matmul "auto" where bf16_gemm_status() is usable, or "bf16", which raises where
    it is not), else the statistics dtype (float32; float64 for float64 inputs)."""
    acc = output_dtype(dtype)
    if dtype != torch.bfloat16 or native_matmul == "fp32":
        return acc
    usable, why = bf16_gemm_status(default=native_matmul == "auto")
    if usable:
        return torch.bfloat16
    if native_matmul == "bf16":
        raise RuntimeError(f"native_matmul='bf16': the bf16 GEMMs are not available here ({why}); "
                           "use native_matmul='auto' or 'fp32'")
    return acc


def gemm_operands(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype, opts: FusedOptions):
    """(weight, bias, operand dtype) as the C++ chunk kernels take them for inputs of `dtype`:
    weight contiguous in the operand dtype (gemm_dtype), bias in the statistics dtype (added in
    fp32 also on the bf16 GEMMs). Hidden rows go in as hidden[t0:t1].to(operand dtype)."""
    op_dtype = gemm_dtype(dtype, getattr(opts, "native_matmul", "auto"))
    acc = output_dtype(dtype)
    w = weight.to(op_dtype).contiguous()
    b = bias.to(acc).contiguous() if bias is not None else None
    return w, b, op_dtype


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
        self.w, self.b, self.op_dtype = gemm_operands(weight, bias, hidden.dtype, opts)
        self.temperature = opts.temperature
        self.entropy = opts.return_entropy
        valid = scored(targets, opts.ignore_index, weight.shape[0])  # ids outside [0, V) count as ignored
        self.targets = torch.where(valid, targets, torch.zeros_like(targets)).contiguous()
        self.buf = torch.empty(max_rows, weight.shape[0], dtype=self.acc)
        self._chunk = None

    def stats(self, t0, t1):
        h = self.hidden[t0:t1].to(self.op_dtype).contiguous()
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
        return 1.0  # dz is fp32 (fp64), or bf16 with fp32's range, here: no range to fit

    def finish(self):
        self._chunk = self.buf = None
