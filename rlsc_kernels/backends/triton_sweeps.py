"""Triton backend: launchers for the forward and backward sweep kernels.

The launchers check what the kernels assume, allocate outputs, pick block sizes and grids; the
kernels (rlsc_kernels/kernels/) never guess. Memory beyond the inputs: O(N) statistics, dhidden
in fp32 [N, D], dbias fp32 [V], and for dweight either the fp32 output itself (fp32 weight) or
one fp32 vocab slice of at most VOCAB_SLICE_BYTES that is converted into the 16-bit output after
its launch. dweight is therefore always accumulated in fp32.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import triton

from ..kernels.backward_sweep import backward_sweep_kernel
from ..kernels.forward_sweep import forward_sweep_kernel
from ..options import FusedOptions
from . import triton_interpreting

#: Largest fp32 dweight slice held at once when the weight is 16-bit.
VOCAB_SLICE_BYTES = 128 << 20


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int = 8


# The block sizes we ship (compiled for sm_90 in the test suite). 16-bit inputs get tensor-core
# sized tiles, chosen so that the sm_90 build spills nothing (python -m rlsc_kernels.kernels.aot:
# forward 128x128x64 spilled 48 bytes, 64x256x64 none; backward 128x128x64 spilled 760 bytes,
# 128x128x32 none). fp32 inputs get smaller tiles (twice the bytes per element, an IEEE dot).
FORWARD_CONFIGS = {
    "16bit": KernelConfig(block_n=64, block_v=256, block_d=64, num_warps=8, num_stages=3),
    "fp32": KernelConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2),
}
BACKWARD_CONFIGS = {
    "16bit": KernelConfig(block_n=128, block_v=128, block_d=32, num_warps=8, num_stages=2),
    "fp32": KernelConfig(block_n=32, block_v=64, block_d=32, num_warps=4, num_stages=2),
}
_overrides: dict = {}


def _env_config(name: str) -> Optional[KernelConfig]:
    """RLSC_KERNELS_FWD_CONFIG / RLSC_KERNELS_BWD_CONFIG = "block_n,block_v,block_d,warps,stages" (tuning)."""
    value = os.environ.get(name)
    if not value:
        return None
    bn, bv, bd, warps, stages = (int(x) for x in value.split(","))
    return KernelConfig(bn, bv, bd, warps, stages)


def config_for(kind: str, dtype: torch.dtype) -> KernelConfig:
    if kind in _overrides:
        return _overrides[kind]
    env = _env_config("RLSC_KERNELS_FWD_CONFIG" if kind == "forward" else "RLSC_KERNELS_BWD_CONFIG")
    if env is not None:
        return env
    table = FORWARD_CONFIGS if kind == "forward" else BACKWARD_CONFIGS
    return table["fp32" if dtype == torch.float32 else "16bit"]


@contextlib.contextmanager
def override_configs(forward: Optional[KernelConfig] = None, backward: Optional[KernelConfig] = None):
    """Temporarily use other block sizes (tests use small blocks so tiny shapes span many tiles)."""
    saved = dict(_overrides)
    if forward is not None:
        _overrides["forward"] = forward
    if backward is not None:
        _overrides["backward"] = backward
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dot_flags(dtype: torch.dtype) -> Tuple[bool, str]:
    """(DOT_UPCAST, DOT_PRECISION). The interpreter's bf16 tl.dot is wrong (DESIGN.md section 5),
    so interpreted bf16 runs upcast operands to fp32: an interpreter-only path, never on a GPU.
    fp32 inputs follow torch's own matmul setting: IEEE fp32 unless the caller allowed tf32."""
    interpreting = triton_interpreting()
    upcast = interpreting and dtype == torch.bfloat16
    precision = "ieee"
    if dtype == torch.float32 and not interpreting and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    return upcast, precision


def _check_kernel_inputs(hidden, weight, bias, targets):
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"the Triton backend takes bf16, fp16 or fp32 hidden, got {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError("the Triton launchers take flat hidden [N, D], weight [V, D], targets [N]")


def forward(hidden, weight, bias, targets, opts: FusedOptions):
    """Sweep 1. Returns logp [N] fp32, entropy [N] fp32 or None, and (lse, mean_z|None) for sweep 2."""
    _check_kernel_inputs(hidden, weight, bias, targets)
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = config_for("forward", hidden.dtype)
    n_blocks = triton.cdiv(N, cfg.block_n)
    total_vblocks = triton.cdiv(V, cfg.block_v)
    # Split the vocabulary so that a few programs per SM are in flight even for small N.
    splits = min(total_vblocks, max(1, triton.cdiv(4 * _sm_count(hidden.device), n_blocks)))
    vblocks_per_split = triton.cdiv(total_vblocks, splits)
    splits = triton.cdiv(total_vblocks, vblocks_per_split)
    parts = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device)
    part_max, part_sum, part_zsum, part_target = parts.unbind(0)
    upcast, precision = _dot_flags(hidden.dtype)
    forward_sweep_kernel[(n_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, targets,
        part_max, part_sum, part_zsum, part_target,
        N, V, D, vblocks_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / opts.temperature,
        HAS_BIAS=bias is not None, HAS_ENTROPY=opts.return_entropy, EVEN_D=D % cfg.block_d == 0,
        DOT_UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # Merge the splits' online statistics (O(splits * N), negligible).
    m = part_max.max(0).values
    rescale = torch.exp(part_max - m)
    total = (part_sum * rescale).sum(0)
    lse = m + torch.log(total)
    valid = targets != opts.ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logp = torch.where(valid, part_target.sum(0) - lse, zero)
    mean_z = entropy = None
    if opts.return_entropy:
        mean_z = (part_zsum * rescale).sum(0) / total
        entropy = torch.where(valid, lse - mean_z, zero)
    return logp, entropy, (lse, mean_z)


def _vocab_slice_rows(V: int, D: int, block_v: int, weight_dtype: torch.dtype, need_w: bool) -> int:
    if not need_w or weight_dtype == torch.float32:
        return V
    rows = max(block_v, (VOCAB_SLICE_BYTES // (4 * D)) // block_v * block_v)
    return min(V, rows)


def backward(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, opts: FusedOptions, needs):
    """Sweep 2. Returns (dhidden fp32 [N, D] | None, dweight [V, D] fp32 or weight dtype | None, dbias fp32 [V] | None)."""
    _check_kernel_inputs(hidden, weight, bias, targets)
    lse, mean_z = saved
    N, D = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    dev = hidden.device
    valid = targets != opts.ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    g = torch.where(valid, grad_logp.float(), zero).contiguous() if grad_logp is not None else torch.zeros(N, device=dev)
    has_entropy = grad_entropy is not None and mean_z is not None
    e = torch.where(valid, grad_entropy.float(), zero).contiguous() if has_entropy else g

    cfg = config_for("backward", hidden.dtype)
    upcast, precision = _dot_flags(hidden.dtype)
    dh = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_h else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    slice_rows = _vocab_slice_rows(V, D, cfg.block_v, weight.dtype, need_w)
    if need_w and weight.dtype == torch.float32:
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
            lse, mean_z if has_entropy else lse, g, e,
            dh if dh is not None else g,
            (dw_slice if dw is not dw_slice else dw[v_lo:]) if need_w else g,
            db[v_lo:] if db is not None else g,
            N, D, v_lo, v_hi,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            D, D,
            1.0 / opts.temperature, float(filter_eps or 0.0),
            HAS_BIAS=bias is not None, HAS_ENTROPY=has_entropy, EVEN_D=D % cfg.block_d == 0,
            COMPUTE_DH=need_h, COMPUTE_DW=need_w, COMPUTE_DB=need_b,
            FILTER=filter_eps is not None, DOT_UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if dw_slice is not None and dw_slice is not dw:
            dw[v_lo:v_hi].copy_(dw_slice[: v_hi - v_lo])
    return dh, dw, db
