"""Triton backend of the single-pass RLSC loss: library GEMMs plus two row-wise Triton kernels per
chunk. The chunk loop, L_s, the weights and g are the driver's (rlsc_kernels/single_pass/driver.py);
this module supplies its primitives (SinglePassOps).

Per chunk (tokens [t0, t1)), with x = h W^T the raw logits and g_t the driver's coefficient:
    x = h W^T                      GEMM 1 (cuBLAS), fp32 output: the [n, V] logits block
    lse, logp, mean_z, entropy     kernels/single_pass_stats.py reads x once (bias, 1/T inside)
    dx = g_t ([v = y] - p)         kernels/single_pass_grad.py, written over x in place
    dH = dx W                      GEMM 2, fp32 output into dhidden's rows
    dW += dx^T h                   GEMM 3 per part of the rows, accumulated in fp32
    db += sum_t dx                 a column sum (only with a bias that needs a gradient)

Precision. The logits block is fp32 (torch.mm(..., out_dtype=torch.float32) on CUDA: bf16 /
fp16 products accumulated and stored in fp32), so a logit of magnitude 20-40 carries fp32's
error, not bf16's ~0.1 (which would put p off by ~10%). The statistics are fp32. The gradient
block is rounded once to the input dtype for the two gradient GEMMs, as in the two-sweep
"sliced" backward; for fp16 it is formed K times larger (grad_scale: a power of two with
|K g| <= 2^14, divided out in fp32 by the driver), since grad_output, which GradScaler makes
large, is not known yet. tests/rlsc_kernels/test_triton_single_pass.py checks the result
against the float64 oracle and against the two-sweep exact mode.

Memory (beyond inputs and outputs), for tokens n per chunk:
  - the logits block: 4 n V bytes. The 16-bit gradient is written over it in place (row t's
    gradient takes the first half of row t's bytes), so there is no second block. The default
    budget BUFFER_BYTES = 640 MiB holds 1102 tokens at the Qwen2.5-7B head (V = 152064);
    opts.buffer_bytes changes it, and single_pass/plan.py's cost model decides what a longer
    sequence gets (a larger block or the open accumulator, at most 4 V D more).
  - dW in fp32: 4 V D bytes (2.18 GB at the 7B head), saved in fp32 for the backward, which
    applies grad_output in fp32 and rounds to the weight dtype once (issue 16: rounding in the
    forward made fp16 + GradScaler's 2^16 overflow). The chunks split the tokens, so dW is a sum
    over chunks; rounding each chunk's product to bf16 before summing biases training (TRL
    measured entropy drifting lower over a few dozen steps). The two-sweep "sliced" backward
    needs no such buffer (it slices the vocabulary and sums over all tokens inside one GEMM).
  - dH [N, D] fp32 and O(N) statistics.

Target ids are compared with column indices, never used as addresses (see the kernels): an id
outside [0, V) with check_values=False reads and writes nothing out of bounds.
int64 offsets: the kernels index rows with int64 (n V can pass 2^31 for a large budget).
No host syncs: chunk bounds are Python ints, everything else stays on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import triton

from ..kernels.configs import GRAD_CONFIG, SINGLE_PASS_CONFIGS, STATS_CONFIG, RowConfig  # noqa: F401 (re-exported)
from ..kernels.interpreter import triton_interpreting
from ..kernels.single_pass_grad import single_pass_grad_kernel
from ..kernels.single_pass_stats import single_pass_stats_kernel
from ..options import FusedOptions

#: Default budget (bytes) for one chunk's fp32 logits block: one 1024-token sequence at the
#: Qwen2.5-7B head (V = 152064) fits (594 MiB).
BUFFER_BYTES = 640 << 20


# The shipped row-kernel configurations live in kernels/configs.py (read by aot.py too).
SHIPPED_CONFIGS = SINGLE_PASS_CONFIGS


# ----------------------------------------------------------------------------------------------
# library GEMMs with fp32 results from 16-bit operands

_OUT_DTYPE_WORKS: Dict[str, bool] = {}


def _out_dtype_supported(device: torch.device) -> bool:
    """torch.mm / addmm with out_dtype=float32 for 16-bit operands: CUDA, torch >= 2.8."""
    key = str(device)
    if key not in _OUT_DTYPE_WORKS:
        ok = device.type == "cuda"
        if ok:
            try:
                a = torch.zeros(2, 2, dtype=torch.bfloat16, device=device)
                out = torch.zeros(2, 2, dtype=torch.float32, device=device)
                torch.mm(a, a, out_dtype=torch.float32, out=out)
                torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        _OUT_DTYPE_WORKS[key] = ok
    return _OUT_DTYPE_WORKS[key]


def gemm_path(device: torch.device, dtype: torch.dtype) -> str:
    """How the single pass's GEMMs get fp32 results on this device (for benchmark records)."""
    if dtype == torch.float32:
        return "fp32 GEMMs"
    if _out_dtype_supported(device):
        return "16-bit GEMMs with fp32 output (out_dtype)"
    return "16-bit operands upcast to fp32 (the library has no fp32 output for them here)"


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b, products accumulated in fp32 and never rounded to a's dtype.

    Where the library has no fp32 output for 16-bit operands (CPU: the interpreter tests), the
    operands are upcast: exact products, fp32 sums, as the GPU's GEMM computes them."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif _out_dtype_supported(a.device):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (fp32) += a @ b (acc = a @ b when first), without rounding a @ b to a's dtype."""
    beta = 0.0 if first else 1.0  # beta 0: acc's (uninitialised) contents are ignored, NaNs included
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, beta=beta, out=acc)
    elif _out_dtype_supported(a.device):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        torch.addmm(acc, a.float(), b.float(), beta=beta, out=acc)


# ----------------------------------------------------------------------------------------------


class SinglePassOps:
    """The driver's primitives (single_pass/driver.py) with library GEMMs and the two row kernels.

    configs: {"stats": RowConfig, "grad": RowConfig} (tests: small blocks)."""

    def __init__(self, hidden, weight, bias, targets, opts: FusedOptions, max_rows: int,
                 configs: Optional[Dict[str, RowConfig]] = None):
        if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"the Triton single pass takes bf16, fp16 or fp32 hidden, got {hidden.dtype}")
        if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
            raise ValueError("the Triton single pass takes flat hidden [N, D], weight [V, D], targets [N]")
        configs = {**SHIPPED_CONFIGS, **(configs or {})}
        self.stats_cfg, self.grad_cfg = configs["stats"], configs["grad"]
        self.acc = torch.float32
        self.hidden = hidden
        self.weight = weight
        self.bias = bias.contiguous() if bias is not None else None
        self.targets = targets.contiguous()
        self.inv_t = 1.0 / opts.temperature
        self.ignore_index = opts.ignore_index
        self.entropy = opts.return_entropy
        dev = hidden.device
        # One buffer for every chunk: the fp32 logits, then (16-bit inputs) the gradient over them.
        self.buf = torch.empty(max_rows, weight.shape[0], dtype=torch.float32, device=dev)
        self.narrow = hidden.dtype != torch.float32
        self.round_rtne = triton_interpreting() and hidden.dtype == torch.bfloat16  # the interpreter truncates
        self._chunk = None

    def stats(self, t0, t1):
        n, V = t1 - t0, self.weight.shape[0]
        h = self.hidden[t0:t1]
        logits = self.buf[:n]
        _mm_fp32(h, self.weight.T, logits)
        f32 = dict(dtype=torch.float32, device=h.device)
        lse, logp = torch.empty(n, **f32), torch.empty(n, **f32)
        mean_z = torch.empty(n, **f32) if self.entropy else None
        entropy = torch.empty(n, **f32) if self.entropy else None
        y = self.targets[t0:t1]
        cfg = self.stats_cfg
        single_pass_stats_kernel[(triton.cdiv(n, cfg.block_n),)](
            logits, self.bias if self.bias is not None else logits, y,
            lse, logp, mean_z if mean_z is not None else lse, entropy if entropy is not None else lse,
            n, V, logits.stride(0), self.inv_t, self.ignore_index,
            HAS_BIAS=self.bias is not None, HAS_ENTROPY=self.entropy,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )
        self._chunk = (h, y, logits, lse, logp)
        return lse, logp, mean_z

    def grads(self, t0, t1, g, dh, parts):
        h, y, logits, lse, logp = self._chunk
        self._chunk = None
        n, V = t1 - t0, self.weight.shape[0]
        grad = logits.view(self.hidden.dtype)[:, :V] if self.narrow else logits  # row t: first half of its bytes
        cfg = self.grad_cfg
        single_pass_grad_kernel[(triton.cdiv(n, cfg.block_n),)](
            logits, grad, self.bias if self.bias is not None else logits, y, lse, logp, g,
            n, V, logits.stride(0), grad.stride(0), self.inv_t,
            HAS_BIAS=self.bias is not None, ROUND_BF16_RTNE=self.round_rtne,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )
        if dh is not None:
            _mm_fp32(grad, self.weight, dh)
        for r0, r1, dw, db in parts:
            if dw is not None:
                _addmm_fp32(dw, grad[r0:r1].T, h[r0:r1], False)
            if db is not None:
                db += grad[r0:r1].sum(0, dtype=torch.float32)

    def grad_scale(self, bound):
        """fp16 operands: a power of two K with K |g| <= 2^14, so that the 16-bit dz = K g ([v = y] - p)
        keeps probabilities down to ~2^-38 instead of flushing those below ~6e-8 / |g| (grad_output
        is not known yet; GradScaler's scale would have done this in the two sweeps). bf16 has
        fp32's range and fp32 needs nothing: 1."""
        if self.hidden.dtype != torch.float16 or not bound:
            return 1.0
        return 2.0 ** max(-24, min(24, math.floor(math.log2(2.0**14 / bound))))

    def finish(self):
        self._chunk = self.buf = None
