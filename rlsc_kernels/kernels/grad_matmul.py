"""Sweep 2, sliced variant, step 2: the two block-sparse matmuls that turn one vocab slice's
logit gradients G = dz / T [N, VS] into parameter gradients (backward strategy "sliced").

    grad_weight_kernel:  dW[v_lo + i, d]  = scale * sum_t G[t, i] h[t, d]  (K = tokens; stored
                          once, in the weight's dtype, after fp32 accumulation over all N tokens
                          and the fp32 multiplication by the launcher's power-of-two scale, so
                          the only rounding to 16 bits is the last one)
    grad_hidden_kernel:  dh[t, d]        += sum_i G[t, i] W[v_lo + i, d] (K = the slice's vocab;
                          fp32 dh, added once per slice)
Each program owns one output tile (no atomics). K steps whose (token block, vocab block) tile
was filtered out (tile_mask == 0) are skipped; MASK_BLOCK_* are grad_logits_kernel's blocks.
"""
import triton
import triton.language as tl

from .tiles import round_to_bf16_rtne


@triton.jit
def grad_weight_kernel(
    grad_logits_ptr, hidden_ptr, tile_mask_ptr, dweight_ptr, scale_ptr,
    N, D, VS, n_mask_vblocks,
    stride_gn, stride_hn, stride_hd, stride_dwv,
    USE_MASK: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    MASK_BLOCK_N: tl.constexpr, MASK_BLOCK_V: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_i = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_i = offs_i < VS
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_col = (pid_v * BLOCK_V) // MASK_BLOCK_V
    acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    # invariant: acc = G[:k0, tile]^T @ h[:k0, tile] over the token blocks kept so far
    for k0 in range(0, N, BLOCK_K):
        needed = True
        if USE_MASK:
            needed = tl.load(tile_mask_ptr + (k0 // MASK_BLOCK_N) * n_mask_vblocks + mask_col) != 0
        if needed:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < N
            g_t = tl.load(grad_logits_ptr + offs_k.to(tl.int64)[None, :] * stride_gn + offs_i[:, None],
                          mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            h = tl.load(hidden_ptr + offs_k.to(tl.int64)[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            if DOT_UPCAST:
                g_t = g_t.to(tl.float32)
                h = h.to(tl.float32)
            acc = tl.dot(g_t, h, acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(scale_ptr)
    if DOT_UPCAST:  # interpreter-only: round like the GPU's conversion (see tiles.round_to_bf16_rtne)
        acc = round_to_bf16_rtne(acc)
    out = dweight_ptr + offs_i.to(tl.int64)[:, None] * stride_dwv + offs_d[None, :]
    tl.store(out, acc.to(dweight_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_d[None, :])


@triton.jit
def grad_hidden_kernel(
    grad_logits_ptr, weight_ptr, tile_mask_ptr, dhidden_ptr,
    N, D, VS, n_mask_vblocks,
    stride_gn, stride_wv, stride_wd, stride_dhn,
    USE_MASK: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    MASK_BLOCK_N: tl.constexpr, MASK_BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_row = ((pid_n * BLOCK_N) // MASK_BLOCK_N) * n_mask_vblocks
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # invariant: acc = G[tile, :k0] @ W_slice[:k0, tile] over the vocab blocks kept so far
    for k0 in range(0, VS, BLOCK_K):
        needed = True
        if USE_MASK:
            needed = tl.load(tile_mask_ptr + mask_row + k0 // MASK_BLOCK_V) != 0
        if needed:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < VS
            g = tl.load(grad_logits_ptr + offs_n.to(tl.int64)[:, None] * stride_gn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(weight_ptr + offs_k.to(tl.int64)[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            if DOT_UPCAST:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
    # This program is the only writer of its tile in this launch, so the add is deterministic;
    # an atomic add keeps the old values out of registers (a load-add-store epilogue spilled).
    out = dhidden_ptr + offs_n.to(tl.int64)[:, None] * stride_dhn + offs_d[None, :]
    tl.atomic_add(out, acc, mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
