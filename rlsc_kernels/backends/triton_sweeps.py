"""Triton backend: launchers for the forward and backward sweep kernels.

The launchers check what the kernels assume, allocate outputs, pick block sizes and grids; the
kernels (rlsc_kernels/kernels/) never guess.

Two backward strategies, both accumulating dweight and dhidden in fp32 and neither holding an
[N, V] buffer or an fp32 buffer the size of W for 16-bit weights:
  "sliced" (default): per vocab slice, one kernel stores the slice's logit gradients [N, VS]
      (16-bit, at most buffer_bytes or GRAD_LOGITS_BYTES, VS >= MIN_SLICE_ROWS by default), then two matmuls produce
      dweight for the slice (fp32 accumulation over all tokens, stored once in the weight dtype)
      and add the slice's dhidden into fp32 dhidden. The matmuls are the library's (torch.mm,
      cuBLAS on GPU: grad_matmul="library", the default) or our block-sparse Triton ones that
      skip the tiles the filter dropped (grad_matmul="triton"). Deterministic up to dbias.
  "fused": one kernel per vocab slice recomputes each tile and adds its dhidden / dweight
      contributions with fp32 atomics; dweight goes through an fp32 slice buffer of at most
      buffer_bytes or VOCAB_SLICE_BYTES. No [N, VS] buffer, but atomic traffic and non-deterministic sums.
Choose with the op's backward="sliced"|"fused" keyword (FusedOptions.backward); buffer sizes
with buffer_bytes, block sizes with block_configs (tests, tuning).

Upstream gradients meet the logits in fp32 and the result is rounded to 16 bits once, at the
end. The 16-bit intermediates (the sliced backward's logit-gradient slices, the fused kernel's dot
operands) are formed from g / sigma and e / sigma, where sigma is a power of two >= max_t |g_t| +
|e_t| computed on the device (no sync): a GradScaler scale of 2^16 (inf in fp16) or a tiny
upstream gradient (flushed to zero in fp16) then cannot overflow or underflow them, and the fp32
accumulators are multiplied by sigma (exactly: a power of two) before the last rounding.

A target id outside [0, V) that is not ignore_index matches no column in any kernel: nothing is
read or written out of bounds for any target value (its target logit counts as 0).

Layout is settled here: hidden and weight are passed with their strides; targets, bias and the
per-token vectors are made contiguous, since the kernels read them with stride 1.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from ..kernels.backward_sweep import backward_sweep_kernel
from ..kernels.configs import (  # noqa: F401 (re-exported)
    BACKWARD_CONFIGS, FORWARD_CONFIGS, GRAD_LOGITS_CONFIGS, MATMUL_BLOCK_K, MATMUL_CONFIGS,
)
from ..kernels.forward_sweep import forward_sweep_kernel
from ..kernels.grad_logits import grad_logits_kernel
from ..kernels.grad_matmul import grad_hidden_kernel, grad_weight_kernel
from ..kernels.interpreter import triton_interpreting
from ..options import BACKWARD_STRATEGIES, GRAD_MATMULS, FusedOptions, KernelConfig  # noqa: F401 (re-exported)

#: Largest fp32 dweight slice held at once when the weight is 16-bit ("fused" backward).
VOCAB_SLICE_BYTES = 128 << 20
#: Target size of the [N, VS] logit-gradient buffer ("sliced" backward) ...
GRAD_LOGITS_BYTES = 256 << 20
#: ... but never fewer vocab rows per slice than this: each slice re-reads and re-writes fp32
#: dhidden, so very thin slices would trade memory for bandwidth badly.
MIN_SLICE_ROWS = 4096


# The block sizes we ship live in kernels/configs.py (the ground floor, read by aot.py too).


def config_for(kind: str, dtype: torch.dtype, opts: FusedOptions) -> KernelConfig:
    """kind: "forward", "grad_logits" (sliced backward's tile kernel), "backward" (fused
    backward's kernel) or "matmul" (sliced backward's block-sparse matmuls). The call's
    opts.block_configs wins over the shipped tables."""
    chosen = getattr(opts.block_configs, kind, None) if opts.block_configs is not None else None
    if chosen is not None:
        return chosen
    table = {"forward": FORWARD_CONFIGS, "backward": BACKWARD_CONFIGS, "grad_logits": GRAD_LOGITS_CONFIGS,
             "matmul": MATMUL_CONFIGS}[kind]
    return table["fp32" if dtype == torch.float32 else "16bit"]


def matmul_block_k(dtype: torch.dtype, opts: Optional[FusedOptions] = None) -> int:
    chosen = opts.block_configs.matmul_block_k if opts is not None and opts.block_configs is not None else None
    return chosen or MATMUL_BLOCK_K["fp32" if dtype == torch.float32 else "16bit"]


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dot_flags(dtype: torch.dtype) -> Tuple[bool, str]:
    """(DOT_UPCAST, DOT_PRECISION). The interpreter's bf16 tl.dot is wrong (docs/design.md §5),
    so interpreted bf16 runs upcast operands to fp32: an interpreter-only path, never on a GPU.
    fp32 inputs follow torch's own matmul setting: IEEE fp32 unless the caller allowed tf32."""
    interpreting = triton_interpreting()
    upcast = interpreting and dtype == torch.bfloat16
    precision = "ieee"
    if dtype == torch.float32 and not interpreting and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    return upcast, precision


def _kernel_inputs(hidden, weight, bias, targets):
    """Checks what the kernels assume and settles layout: the kernels take strides for hidden
    and weight, and read bias and targets with stride 1, so those two are made contiguous (a
    sliced, expanded or offset view would otherwise be read wrongly). Returns (bias, targets)."""
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"the Triton backend takes bf16, fp16 or fp32 hidden, got {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError("the Triton launchers take flat hidden [N, D], weight [V, D], targets [N]")
    return (bias.contiguous() if bias is not None else None), targets.contiguous()


def forward(hidden, weight, bias, targets, opts: FusedOptions):
    """Sweep 1. Returns logp [N] fp32, entropy [N] fp32 or None, and (lse, mean_z|None, logp) for sweep 2.
    logp = (target logit - max) - log(sum exp(z - max)), not target - lse, which would round the
    log-sum (~ 1 - p for a peaked token) away; the backward takes 1 - p_target = -expm1(logp)."""
    bias, targets = _kernel_inputs(hidden, weight, bias, targets)
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = config_for("forward", hidden.dtype, opts)
    n_blocks = triton.cdiv(N, cfg.block_n)
    total_vblocks = triton.cdiv(V, cfg.block_v)
    # Split the vocabulary so that one group of token blocks times the splits fills the GPU
    # (see the kernel's note on program order).
    splits = min(total_vblocks, max(1, triton.cdiv(_sm_count(hidden.device), min(cfg.group_n, n_blocks))))
    vblocks_per_split = triton.cdiv(total_vblocks, splits)
    splits = triton.cdiv(total_vblocks, vblocks_per_split)
    parts = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device)
    part_max, part_sum, part_zsum, part_target = parts.unbind(0)
    upcast, precision = _dot_flags(hidden.dtype)
    forward_sweep_kernel[(n_blocks * splits,)](
        hidden, weight, bias if bias is not None else hidden, targets,
        part_max, part_sum, part_zsum, part_target,
        N, V, D, vblocks_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / opts.temperature, float(opts.softcap or 1.0),
        HAS_BIAS=bias is not None, SOFTCAP=opts.softcap is not None, HAS_ENTROPY=opts.return_entropy,
        EVEN_D=D % cfg.block_d == 0,
        DOT_UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # Merge the splits' online statistics (O(splits * N), negligible).
    m = part_max.max(0).values
    rescale = torch.exp(part_max - m)
    total = (part_sum * rescale).sum(0)
    log_total = torch.log(total)
    lse = m + log_total
    logp = (part_target.sum(0) - m) - log_total
    mean_z = entropy = None
    if opts.return_entropy:
        mean_z = (part_zsum * rescale).sum(0) / total
        entropy = lse - mean_z
    return logp, entropy, (lse, mean_z, logp)


def _vocab_slice_rows(V: int, D: int, block_v: int, weight_dtype: torch.dtype, need_w: bool,
                      buffer_bytes: Optional[int]) -> int:
    if not need_w or weight_dtype == torch.float32:
        return V
    rows = max(block_v, ((buffer_bytes or VOCAB_SLICE_BYTES) // (4 * D)) // block_v * block_v)
    return min(V, rows)


def backward(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, opts: FusedOptions, needs):
    """Sweep 2. Returns (dhidden fp32 [N, D] | None, dweight [V, D] fp32 or weight dtype | None, dbias fp32 [V] | None)."""
    bias, targets = _kernel_inputs(hidden, weight, bias, targets)
    # saved = forward's (lse, mean_z, logp); (lse, mean_z) from callers without the log-prob
    lse, mean_z, logp = (None if t is None else t.contiguous() for t in (*saved, None)[:3])
    N = hidden.shape[0]
    need_h, need_w, need_b = needs
    dev = hidden.device
    # Upstream gradients per token (already zero for ignored tokens: autograd.py).
    g = grad_logp.float().contiguous() if grad_logp is not None else torch.zeros(N, device=dev)
    has_entropy = grad_entropy is not None and mean_z is not None
    e = grad_entropy.float().contiguous() if has_entropy else None
    sigma = None
    if hidden.dtype != torch.float32:
        sigma = gradient_scale(g, e)
        g = g / sigma
        e = e / sigma if e is not None else None
    run = _backward_sliced if opts.backward == "sliced" else _backward_fused
    dh, dw, db = run(hidden, weight, bias, targets, lse, logp, mean_z if has_entropy else None, g, e, opts,
                     need_h, need_w, need_b and bias is not None, sigma)
    if sigma is not None:  # the fp32 accumulators: exact multiplication by a power of two
        dh = dh.mul_(sigma) if dh is not None else None
        db = db.mul_(sigma) if db is not None else None
    return dh, dw, db


def gradient_scale(g: torch.Tensor, e: Optional[torch.Tensor]) -> torch.Tensor:
    """0-d fp32 power of two sigma >= max_t |g_t| + |e_t| (1 when that is 0 or not finite), on
    g's device, without a sync. Dividing by it is exact (barring fp32 underflow below 2^-126
    of the largest gradient)."""
    mass = g.abs() if e is None else g.abs() + e.abs()
    top = mass.max() if mass.numel() else mass.new_zeros(())
    sigma = torch.exp2(torch.ceil(torch.log2(top)).clamp(-120.0, 120.0))
    return torch.where(torch.isfinite(top) & (top > 0), sigma, torch.ones_like(sigma))


def _slice_rows(N: int, V: int, block_v: int, itemsize: int, buffer_bytes: Optional[int]) -> int:
    """Vocab rows per slice of the [N, VS] logit-gradient buffer. The default budget keeps at
    least MIN_SLICE_ROWS rows; a budget the caller set explicitly is honoured down to one block."""
    if buffer_bytes is None:
        rows = max(MIN_SLICE_ROWS, GRAD_LOGITS_BYTES // max(1, N * itemsize))
    else:
        rows = buffer_bytes // max(1, N * itemsize)
    rows = max(block_v, rows // block_v * block_v)
    return min(rows, triton.cdiv(V, block_v) * block_v)


def _backward_sliced(hidden, weight, bias, targets, lse, logp, mean_z, g, e, opts, need_h, need_w, need_b, sigma):
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    tile = config_for("grad_logits", hidden.dtype, opts)
    sparse = opts.grad_matmul == "triton"
    if sparse:
        mm = config_for("matmul", hidden.dtype, opts)
        block_k = matmul_block_k(hidden.dtype, opts)
        for name, small, big in (("block_n", mm.block_n, tile.block_n), ("block_n", mm.block_n, tile.block_v),
                                 ("block_k", block_k, tile.block_n), ("block_k", block_k, tile.block_v)):
            if big % small:
                raise ValueError(f"matmul {name}={small} must divide the grad-logits tile {tile.block_n}x{tile.block_v}")
    upcast, precision = _dot_flags(hidden.dtype)
    filter_eps = opts.filter_eps
    use_mask = filter_eps is not None
    slice_rows = _slice_rows(N, V, tile.block_v, hidden.element_size(), opts.buffer_bytes)
    # Zeroed on CPU (Triton's interpreter): PyTorch's CPU bf16 GEMM reads the columns past a row
    # slice's width (the last slice is narrower than the buffer) and multiplies them by zero
    # padding, so a NaN left there in uninitialised memory turned rows of dhidden into NaN.
    alloc = torch.zeros if dev.type == "cpu" else torch.empty
    grad_logits = alloc(N, slice_rows, dtype=hidden.dtype, device=dev)
    n_nblocks = triton.cdiv(N, tile.block_n)
    tile_mask = torch.empty(n_nblocks * triton.cdiv(slice_rows, tile.block_v), dtype=torch.int8, device=dev)
    one = torch.ones((), dtype=torch.float32, device=dev)
    dh = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_h else None
    dw_dtype = torch.float32 if opts.dweight_fp32 else weight.dtype
    dw = torch.empty(V, D, dtype=dw_dtype, device=dev) if need_w else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    flags = dict(DOT_UPCAST=upcast, DOT_PRECISION=precision)
    for v_lo in range(0, V, slice_rows):
        v_hi = min(V, v_lo + slice_rows)
        vs = v_hi - v_lo
        n_mask_vblocks = triton.cdiv(vs, tile.block_v)
        grad_logits_kernel[(n_nblocks * n_mask_vblocks,)](
            hidden, weight, bias if bias is not None else hidden, targets,
            lse, logp if logp is not None else lse, mean_z if mean_z is not None else lse, g, e if e is not None else g,
            grad_logits, tile_mask, db[v_lo:] if db is not None else g,
            N, D, v_lo, v_hi, n_mask_vblocks,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), grad_logits.stride(0),
            1.0 / opts.temperature, float(filter_eps or 0.0), float(opts.softcap or 1.0),
            HAS_BIAS=bias is not None, SOFTCAP=opts.softcap is not None, HAS_ENTROPY=e is not None,
            HAS_LOGP=logp is not None,
            EVEN_D=D % tile.block_d == 0,
            COMPUTE_DB=need_b, FILTER=use_mask, ZERO_SKIPPED=not sparse, **flags,
            BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_D=tile.block_d, GROUP_N=tile.group_n,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
        if not sparse:
            _library_matmuls(grad_logits[:, :vs], hidden, weight[v_lo:v_hi], dh, dw[v_lo:v_hi] if need_w else None,
                             sigma)
            continue
        common = dict(USE_MASK=use_mask, **flags, BLOCK_D=mm.block_d, BLOCK_K=block_k,
                      MASK_BLOCK_N=tile.block_n, MASK_BLOCK_V=tile.block_v,
                      num_warps=mm.num_warps, num_stages=mm.num_stages)
        if need_w:
            w_out = dw[v_lo:]
            grad_weight_kernel[(triton.cdiv(vs, mm.block_n), triton.cdiv(D, mm.block_d))](
                grad_logits, hidden, tile_mask, w_out, one if sigma is None else sigma,
                N, D, vs, n_mask_vblocks,
                grad_logits.stride(0), hidden.stride(0), hidden.stride(1), w_out.stride(0),
                BLOCK_V=mm.block_n, **common,
            )
        if need_h:
            w_slice = weight[v_lo:]
            grad_hidden_kernel[(triton.cdiv(N, mm.block_n), triton.cdiv(D, mm.block_d))](
                grad_logits, w_slice, tile_mask, dh,
                N, D, vs, n_mask_vblocks,
                grad_logits.stride(0), w_slice.stride(0), w_slice.stride(1), dh.stride(0),
                BLOCK_N=mm.block_n, **common,
            )
    return dh, dw, db


_FP32_OUT_MATMUL: dict = {}


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result from 16-bit operands where the library can (torch.mm's
    out_dtype, CUDA only), so a slice's dhidden is not rounded to 16 bits before it is added."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    key = a.device.type
    if _FP32_OUT_MATMUL.get(key, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _FP32_OUT_MATMUL[key] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_MATMUL[key] = False
    return torch.mm(a, b)


def _library_matmuls(grad_logits, hidden, weight_slice, dh, dw_slice, sigma=None):
    """dW[slice] = sigma (G^T h) and dh += G W[slice] (fp32; the caller multiplies dh by sigma
    once). G is the slice's [N, VS] logit-gradient block, normalised by sigma. G^T h is
    accumulated in fp32 inside the GEMM and stored in the weight dtype; it is of the size of a
    unit upstream gradient's result, so it neither overflows nor flushes, and the scaling by the
    power of two sigma is exact (no fp32 temporary the size of the slice: at small N a slice can
    hold the whole vocabulary)."""
    if dw_slice is not None and dw_slice.dtype == grad_logits.dtype:
        torch.mm(grad_logits.T, hidden, out=dw_slice)
        if sigma is not None:
            dw_slice.mul_(sigma)
    elif dw_slice is not None:  # fp32 dweight of 16-bit inputs (opts.dweight_fp32): blocks of rows
        for r0 in range(0, dw_slice.shape[0], MIN_SLICE_ROWS):
            r1 = min(dw_slice.shape[0], r0 + MIN_SLICE_ROWS)
            part = dw_slice[r0:r1]
            part.copy_(_mm_fp32_out(grad_logits[:, r0:r1].T, hidden))
            if sigma is not None:
                part.mul_(sigma)
    if dh is not None:
        dh += _mm_fp32_out(grad_logits, weight_slice)


def _backward_fused(hidden, weight, bias, targets, lse, logp, mean_z, g, e, opts, need_h, need_w, need_b, sigma):
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    has_entropy = e is not None
    if e is None:
        e = g
    cfg = config_for("backward", hidden.dtype, opts)
    upcast, precision = _dot_flags(hidden.dtype)
    dh = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_h else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    wide_dw = weight.dtype == torch.float32 or opts.dweight_fp32
    slice_rows = _vocab_slice_rows(V, D, cfg.block_v, torch.float32 if wide_dw else weight.dtype, need_w,
                                   opts.buffer_bytes)
    if need_w and wide_dw:
        dw = torch.zeros(V, D, dtype=torch.float32, device=dev)
        dw_slice = dw
    elif need_w:
        dw = torch.empty(V, D, dtype=weight.dtype, device=dev)
        dw_slice = torch.empty(slice_rows, D, dtype=torch.float32, device=dev)
    else:
        dw = dw_slice = None
    filter_eps = opts.filter_eps
    n_blocks = triton.cdiv(N, cfg.block_n)
    for v_lo in range(0, V, slice_rows):
        v_hi = min(V, v_lo + slice_rows)
        if dw_slice is not None and dw_slice is not dw:
            dw_slice.zero_()
        grid = (n_blocks * triton.cdiv(v_hi - v_lo, cfg.block_v),)
        backward_sweep_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets,
            lse, logp if logp is not None else lse, mean_z if has_entropy else lse, g, e,
            dh if dh is not None else g,
            (dw_slice if dw is not dw_slice else dw[v_lo:]) if need_w else g,
            db[v_lo:] if db is not None else g,
            N, D, v_lo, v_hi,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            D, D,
            1.0 / opts.temperature, float(filter_eps or 0.0), float(opts.softcap or 1.0),
            HAS_BIAS=bias is not None, SOFTCAP=opts.softcap is not None, HAS_ENTROPY=has_entropy,
            HAS_LOGP=logp is not None,
            EVEN_D=D % cfg.block_d == 0,
            COMPUTE_DH=need_h, COMPUTE_DW=need_w, COMPUTE_DB=need_b,
            FILTER=filter_eps is not None, DOT_UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if dw_slice is not None and dw_slice is not dw:
            if sigma is not None:
                dw_slice.mul_(sigma)  # fp32, before the one rounding to the weight dtype
            dw[v_lo:v_hi].copy_(dw_slice[: v_hi - v_lo])
    if dw is not None and dw is dw_slice and sigma is not None:
        dw.mul_(sigma)
    return dh, dw, db
