"""Sweep 2, sliced variant, step 1: recompute the logits of one vocab slice and store their
gradient dz / T in the input dtype (backward strategy "sliced").

For every tile (token block n, vocab block v) of the slice [v_lo, v_hi):
    dz_tile = (1/T) tiles.grad_logits_tile(...)   -> grad_logits[n-rows, v - v_lo]  (16-bit)
    tile_mask[n, v] = tile is needed (FILTER) or 1;   dbias[v] += column sums (fp32 atomics)
Skipped tiles are not written when the block-sparse matmuls (grad_matmul.py) follow, which read
the mask and never touch them; they are written as zeros (ZERO_SKIPPED) when dense library
matmuls follow. Nothing is accumulated across programs except dbias, so dhidden and dweight
come out deterministic.
"""
import triton
import triton.language as tl

from .tiles import grad_logits_tile, grouped_program, logits_tile, round_to_bf16_rtne, tile_is_needed


@triton.jit
def grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    lse_ptr, logp_ptr, mean_z_ptr, grad_logp_ptr, grad_entropy_ptr,
    grad_logits_ptr, tile_mask_ptr, dbias_ptr,
    N, D, v_lo, v_hi, n_vblocks,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_gn,
    inv_temperature, filter_eps, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_LOGP: tl.constexpr, EVEN_D: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr, ZERO_SKIPPED: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_vblocks, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_v = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_hi
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, mask_n, offs_v, mask_v, D,
                    stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature, softcap,
                    HAS_BIAS, SOFTCAP, EVEN_D, DOT_UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    dz, scale = grad_logits_tile(z, offs_n, mask_n, offs_v, mask_v, targets_ptr, lse_ptr, logp_ptr, mean_z_ptr,
                                 grad_logp_ptr, grad_entropy_ptr, inv_temperature, softcap, HAS_ENTROPY, SOFTCAP,
                                 HAS_LOGP)
    keep = True
    if FILTER:
        keep = tile_is_needed(dz, scale, filter_eps)
        tl.store(tile_mask_ptr + pid_n * n_vblocks + pid_v, keep.to(tl.int8))
        if ZERO_SKIPPED:
            dz = dz * keep.to(tl.float32)
            keep = True
    if keep:
        dz = dz * inv_temperature
        if COMPUTE_DB:
            tl.atomic_add(dbias_ptr + (offs_v - v_lo), tl.sum(dz, 0), mask=mask_v, sem="relaxed")
        if DOT_UPCAST:
            dz = round_to_bf16_rtne(dz)
        out = grad_logits_ptr + offs_n.to(tl.int64)[:, None] * stride_gn + (offs_v - v_lo)[None, :]
        tl.store(out, dz.to(grad_logits_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])
