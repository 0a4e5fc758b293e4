"""Sweep 2: recompute each logits tile and accumulate dhidden, dweight and dbias.

For a tile (token block n, vocab block v), with p_tv = exp(z_tv - lse_t) and the per-token
upstream gradients g_t = dL/dlogp_t, e_t = dL/dentropy_t (zero for ignored tokens):
    dz_tv = g_t ([v = y_t] - p_tv) - e_t p_tv (z_tv - mean_z_t)
    dh_t += (1/T) sum_v dz_tv W_v,   dW_v += (1/T) sum_t dz_tv h_t,   db_v += (1/T) sum_t dz_tv
Partial sums go to fp32 buffers with atomic adds (each tile owns no output exclusively).
FILTER: a tile where, for every token, sum_v |dz_tv| <= eps (|g_t| + |e_t|) is skipped: it
would change no output by more than eps relative to that token's gradient scale.
The launcher calls the kernel once per vocab slice [v_lo, v_hi), with dweight pointing at an
fp32 buffer for that slice only, so no fp32 buffer the size of W is ever held for 16-bit W.
"""
import triton
import triton.language as tl


@triton.jit
def _round_to_bf16_rtne(x):
    """fp32 -> nearest bf16 (ties to even), kept in fp32. Interpreter-only path: Triton's
    interpreter truncates fp32 -> bf16 conversions, while the GPU rounds to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def backward_sweep_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    lse_ptr, mean_z_ptr, grad_logp_ptr, grad_entropy_ptr,
    dhidden_ptr, dweight_ptr, dbias_ptr,
    N, D, v_lo, v_hi,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn, stride_dwv,
    inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, EVEN_D: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped tile order: GROUP_N token blocks sweep the vocab together, so the tiles running at
    # one time share their W blocks and hidden blocks in L2.
    pid = tl.program_id(0)
    n_nblocks = tl.cdiv(N, BLOCK_N)
    n_vblocks = tl.cdiv(v_hi - v_lo, BLOCK_V)
    tiles_per_group = GROUP_N * n_vblocks
    group = pid // tiles_per_group
    first_n = group * GROUP_N
    group_size = tl.minimum(n_nblocks - first_n, GROUP_N)
    pid_n = first_n + (pid % tiles_per_group) % group_size
    pid_v = (pid % tiles_per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_v = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_hi
    rows_h = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    cols_w = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv

    logits = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            h = tl.load(rows_h + offs_d[None, :] * stride_hd, mask=mask_n[:, None], other=0.0)
            w = tl.load(cols_w + offs_d[:, None] * stride_wd, mask=mask_v[None, :], other=0.0)
        else:
            mask_d = offs_d < D
            h = tl.load(rows_h + offs_d[None, :] * stride_hd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(cols_w + offs_d[:, None] * stride_wd, mask=mask_v[None, :] & mask_d[:, None], other=0.0)
        if DOT_UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        logits = tl.dot(h, w, logits, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    z = logits * inv_temperature

    valid = mask_n[:, None] & mask_v[None, :]
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(grad_logp_ptr + offs_n, mask=mask_n, other=0.0)
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
    is_target = offs_v.to(tl.int64)[None, :] == targets[:, None]
    dz = tl.where(is_target, g[:, None], 0.0) - g[:, None] * p
    scale = tl.abs(g)
    if HAS_ENTROPY:
        e = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0)
        mean_z = tl.load(mean_z_ptr + offs_n, mask=mask_n, other=0.0)
        dz -= e[:, None] * p * tl.where(valid, z - mean_z[:, None], 0.0)
        scale += tl.abs(e)

    keep = True
    if FILTER:
        excess = tl.sum(tl.abs(dz), 1) - filter_eps * scale
        keep = tl.max(excess, 0) > 0.0
    if keep:
        dz = dz * inv_temperature
        if COMPUTE_DB:
            tl.atomic_add(dbias_ptr + (offs_v - v_lo), tl.sum(dz, 0), mask=mask_v, sem="relaxed")
        if DOT_UPCAST:
            dz_op = _round_to_bf16_rtne(dz)
        else:
            dz_op = dz.to(hidden_ptr.dtype.element_ty)
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
