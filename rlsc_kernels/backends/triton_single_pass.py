"""Triton backend of the single-pass RLSC loss (rlsc_kernels/single_pass.py): library GEMMs plus
two row-wise Triton kernels per chunk of whole sequences.

Per chunk (tokens [t0, t1), sequences [s0, s1)), with x = h W^T the raw logits:
    x = h W^T                      GEMM 1 (cuBLAS), fp32 output: the [n, V] logits block
    lse, logp, mean_z, entropy     kernels/single_pass_stats.py reads x once (bias, 1/T inside)
    L_s, (w_s, c_s) = weigh(L_s)   a few [S]-sized torch ops, no host sync
    dx = (c_s(t) / T)([v = y] - p)  kernels/single_pass_grad.py, written over x in place
    dH = dx W                      GEMM 2, fp32 output into dhidden's rows
    dW += dx^T h                   GEMM 3, accumulated in fp32 over the chunks
    db += sum_t dx                 a column sum (only with a bias that needs a gradient)

Precision. The logits block is fp32 (torch.mm(..., out_dtype=torch.float32) on CUDA: bf16 /
fp16 products accumulated and stored in fp32), so a logit of magnitude 20-40 carries fp32's
error, not bf16's ~0.1 (which would put p off by ~10%). The statistics are fp32. The gradient
block is rounded once to the input dtype for the two gradient GEMMs, as in the two-sweep
"sliced" backward; tests/rlsc_kernels/test_triton_single_pass.py checks the result against the
float64 oracle and against the two-sweep exact mode.

Memory (beyond inputs and outputs), for tokens n per chunk:
  - the logits block: 4 n V bytes. The 16-bit gradient is written over it in place (row t's
    gradient takes the first half of row t's bytes), so there is no second block. The default
    budget BUFFER_BYTES = 640 MiB holds one 1024-token sequence at the Qwen2.5-7B head
    (1024 x 152064 x 4 B = 594 MiB); opts.buffer_bytes changes it (the framework plans the
    chunks from it).
  - dW in fp32: 4 V D bytes, held for the whole forward (2.18 GB at the 7B head). The chunks
    split the tokens, so dW is a sum over chunks; rounding each chunk's product to bf16 before
    summing biases training (TRL measured entropy drifting lower over a few dozen steps), so
    the sum is kept in fp32 (torch.addmm(..., out_dtype=torch.float32) on CUDA). The two-sweep
    "sliced" backward needs no such buffer (it slices the vocabulary and sums over all tokens
    inside one GEMM). For 16-bit weights the sum is rounded once to the weight dtype at the end
    of the forward (after the logits block is freed), so the peak holds the fp32 sum and its
    16-bit copy together for a moment (3 V D bytes beyond the two-sweep path's 2 V D: 2.18 GB
    more at the 7B head), and only the 16-bit dweight (2 V D bytes) is saved for the backward.
    Returning the fp32 sum instead would keep 4 V D bytes alive until the backward and make the
    backward's scaling by grad_output allocate another 4 V D. For fp32 weights nothing changes.
  - dH [N, D] fp32 and O(N) statistics.

int64 offsets: the kernels index rows with int64 (n V can pass 2^31 for a large budget).
No host syncs: chunk bounds are Python ints, everything else stays on the device.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton

from ..kernels.configs import GRAD_CONFIG, SINGLE_PASS_CONFIGS, STATS_CONFIG, RowConfig  # noqa: F401 (re-exported)
from ..kernels.interpreter import triton_interpreting
from ..kernels.single_pass_grad import single_pass_grad_kernel
from ..kernels.single_pass_stats import single_pass_stats_kernel
from ..options import FusedOptions
from ..single_pass import SinglePassResult

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


def _check(hidden, weight, bias, targets, seq, chunks):
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"the Triton single pass takes bf16, fp16 or fp32 hidden, got {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1 or seq.dim() != 1:
        raise ValueError("the Triton single pass takes flat hidden [N, D], weight [V, D], targets [N], seq [N]")
    N = hidden.shape[0]
    t = 0
    for t0, t1, s0, s1 in chunks:
        if t0 != t or t1 < t0 or s1 < s0:
            raise ValueError(f"chunks must tile the tokens [0, {N}) in order, got {list(chunks)}")
        t = t1
    if t != N:
        raise ValueError(f"chunks must tile the tokens [0, {N}) in order, got {list(chunks)}")


def rlsc_single_pass(hidden, weight, bias, targets, seq, chunks, weigh, opts: FusedOptions, needs,
                     *, configs: Optional[Dict[str, RowConfig]] = None) -> SinglePassResult:
    """The single-pass RLSC loss over whole-sequence chunks (contract: rlsc_kernels/single_pass.py).

    hidden [N, D] bf16/fp16/fp32, weight [V, D] (same dtype), bias [V] or None, targets [N]
    int64, seq [N] int64 sorted; chunks [(t0, t1, s0, s1)]. Returns token_logp, token_entropy,
    lse, mean_z [N] fp32, seq_logp / seq_weight [S] fp32, dhidden [N, D] fp32, dweight [V, D]
    in the weight's dtype (accumulated over the chunks in fp32, rounded once at the end), dbias
    [V] fp32: the gradients of the loss for grad_output = 1. configs: {"stats": RowConfig,
    "grad": RowConfig} (tests: small blocks).
    """
    _check(hidden, weight, bias, targets, seq, chunks)
    configs = {**SHIPPED_CONFIGS, **(configs or {})}
    N, D = hidden.shape
    V = weight.shape[0]
    S = chunks[-1][3] if chunks else 0
    dev = hidden.device
    need_h, need_w, need_b = needs
    need_b = bool(need_b) and bias is not None
    inv_t = 1.0 / opts.temperature
    targets = targets.contiguous()
    bias_arg = bias.contiguous() if bias is not None else None
    weight_t = weight.T
    f32 = dict(dtype=torch.float32, device=dev)

    token_logp = torch.empty(N, **f32)
    lse = torch.empty(N, **f32)
    mean_z = torch.empty(N, **f32) if opts.return_entropy else None
    entropy = torch.empty(N, **f32) if opts.return_entropy else None
    seq_logp = torch.zeros(S, **f32)
    seq_weight = torch.zeros(S, **f32)
    valid = targets != opts.ignore_index
    n_tokens = torch.zeros(S, dtype=torch.int64, device=dev).index_add_(0, seq, valid.long())
    dh = torch.empty(N, D, **f32) if need_h else None
    dw = torch.empty(V, D, **f32) if need_w else None
    db = torch.zeros(V, **f32) if need_b else None

    max_rows = max((t1 - t0 for t0, t1, _, _ in chunks), default=0)
    # One buffer for every chunk: the fp32 logits, then (16-bit inputs) the gradient over them.
    buf = torch.empty(max_rows, V, **f32)
    narrow = hidden.dtype != torch.float32
    round_rtne = triton_interpreting() and hidden.dtype == torch.bfloat16  # the interpreter truncates
    stats_cfg, grad_cfg = configs["stats"], configs["grad"]
    first_dw = True
    for t0, t1, s0, s1 in chunks:
        n = t1 - t0
        if n == 0:
            sw, _ = weigh(seq_logp[s0:s1], n_tokens[s0:s1])
            seq_weight[s0:s1] = sw
            continue
        h = hidden[t0:t1]
        logits = buf[:n]
        _mm_fp32(h, weight_t, logits)
        single_pass_stats_kernel[(triton.cdiv(n, stats_cfg.block_n),)](
            logits, bias_arg if bias_arg is not None else logits, targets[t0:t1],
            lse[t0:t1], token_logp[t0:t1], mean_z[t0:t1] if mean_z is not None else lse[t0:t1],
            entropy[t0:t1] if entropy is not None else lse[t0:t1],
            n, V, logits.stride(0), inv_t, opts.ignore_index,
            HAS_BIAS=bias_arg is not None, HAS_ENTROPY=mean_z is not None,
            BLOCK_N=stats_cfg.block_n, BLOCK_V=stats_cfg.block_v, num_warps=stats_cfg.num_warps,
        )
        local = seq[t0:t1] - s0
        chunk_logp = torch.zeros(s1 - s0, **f32).index_add_(0, local, token_logp[t0:t1])
        seq_logp[s0:s1] = chunk_logp
        sw, coef = weigh(chunk_logp, n_tokens[s0:s1])
        seq_weight[s0:s1] = sw
        if not (need_h or need_w or need_b):
            continue
        g = torch.where(valid[t0:t1], coef.float()[local], 0.0)
        grad = logits.view(hidden.dtype)[:, :V] if narrow else logits  # row t: first half of its own bytes
        single_pass_grad_kernel[(triton.cdiv(n, grad_cfg.block_n),)](
            logits, grad, bias_arg if bias_arg is not None else logits, targets[t0:t1], lse[t0:t1], g,
            n, V, logits.stride(0), grad.stride(0), inv_t,
            HAS_BIAS=bias_arg is not None, ROUND_BF16_RTNE=round_rtne,
            BLOCK_N=grad_cfg.block_n, BLOCK_V=grad_cfg.block_v, num_warps=grad_cfg.num_warps,
        )
        if dh is not None:
            _mm_fp32(grad, weight, dh[t0:t1])
        if dw is not None:
            _addmm_fp32(dw, grad.T, h, first_dw)
            first_dw = False
        if db is not None:
            db += grad.sum(0, dtype=torch.float32)
    if dw is not None and first_dw:
        dw.zero_()  # no chunk had tokens
    buf = logits = grad = None  # free the logits block before the 16-bit copy of dW exists
    if dw is not None and weight.dtype != torch.float32:
        dw = dw.to(weight.dtype)
    return SinglePassResult(token_logp, entropy, seq_logp, seq_weight, lse, mean_z, dh, dw, db)
