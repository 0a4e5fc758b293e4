"""Sweep 2, fused variant: recompute each logits tile and accumulate dhidden, dweight, dbias
with fp32 atomics (backward strategy "fused").

For a tile (token block n, vocab block v), with dz from tiles.grad_logits_tile:
    dh_t += (1/T) sum_v dz_tv W_v,   dW_v += (1/T) sum_t dz_tv h_t,   db_v += (1/T) sum_t dz_tv
Partial sums go to fp32 buffers with atomic adds (no tile owns an output). FILTER skips a tile
whose gradient mass is below eps per token (tiles.tile_is_needed). The launcher calls the kernel
once per vocab slice [v_lo, v_hi), dweight pointing at an fp32 buffer for that slice only.
"""
import triton
import triton.language as tl

from .tiles import grad_logits_tile, grouped_program, logits_tile, round_to_bf16_rtne, tile_is_needed


@triton.jit
def backward_sweep_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    lse_ptr, logp_ptr, mean_z_ptr, grad_logp_ptr, grad_entropy_ptr,
    dhidden_ptr, dweight_ptr, dbias_ptr,
    N, D, v_lo, v_hi,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn, stride_dwv,
    inv_temperature, filter_eps, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_LOGP: tl.constexpr, EVEN_D: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(v_hi - v_lo, BLOCK_V), GROUP_N)

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
    if keep:
        dz = dz * inv_temperature
        if COMPUTE_DB:
            tl.atomic_add(dbias_ptr + (offs_v - v_lo), tl.sum(dz, 0), mask=mask_v, sem="relaxed")
        if DOT_UPCAST:
            dz_op = round_to_bf16_rtne(dz)
        else:
            dz_op = dz.to(hidden_ptr.dtype.element_ty)
        rows_h = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            if COMPUTE_DH:
                # dh[n, d] += dz[n, v] @ W[v, d]
                w = tl.load(weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                            mask=mask_v[:, None] & mask_d[None, :], other=0.0)
                if DOT_UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dhidden_ptr + offs_n.to(tl.int64)[:, None] * stride_dhn + offs_d[None, :], dh,
                              mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
            if COMPUTE_DW:
                # dW[v, d] += dz[n, v]^T @ h[n, d]
                h = tl.load(rows_h + offs_d[None, :] * stride_hd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if DOT_UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dweight_ptr + (offs_v - v_lo).to(tl.int64)[:, None] * stride_dwv + offs_d[None, :], dw,
                              mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")
