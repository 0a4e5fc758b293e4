"""Single pass, step 1: per-token statistics from a chunk's fp32 logits block.

The chunk's raw logits x = h W^T (fp32, from the library GEMM) are read once, row by row:
    z_tv = (x_tv + b_v) / T
    m_t = max_v z_tv,   s_t = sum_v exp(z_tv - m_t),   a_t = sum_v exp(z_tv - m_t) z_tv
    lse_t = m_t + log s_t,   logp_t = (z_t,y_t - m_t) - log s_t   (0 for ignored tokens)
    mean_z_t = a_t / s_t,    entropy_t = lse_t - mean_z_t
Loop invariant over the vocab blocks: (m, s, a) are the online max / rescaled sums of every
block seen so far, tz the target logit if it was in one of them. One program owns BLOCK_N whole
rows, so no statistic is merged across programs.
Target ids are only compared with column indices, never used as an address: an id outside
[0, V) (possible with check_values=False) matches no column, so tz = 0 and logp = -lse; nothing
is read or written out of bounds.
"""
import triton
import triton.language as tl


@triton.jit
def single_pass_stats_kernel(
    logits_ptr, bias_ptr, targets_ptr,
    lse_ptr, logp_ptr, mean_z_ptr, entropy_ptr,
    n_rows, V, stride_ln, inv_temperature, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    rows = logits_ptr + offs_n.to(tl.int64)[:, None] * stride_ln

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    tz = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        x = tl.load(rows + offs_v[None, :], mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        z = tl.where(mask_v[None, :], x * inv_temperature, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * rescale + tl.sum(p, 1)
        if HAS_ENTROPY:
            a = a * rescale + tl.sum(p * tl.where(mask_v[None, :], z, 0.0), 1)
        is_target = (offs_v.to(tl.int64)[None, :] == targets[:, None]) & mask_v[None, :]
        tz += tl.sum(tl.where(is_target, z, 0.0), 1)
        m = m_new

    log_s = tl.log(s)
    lse = m + log_s
    scored = targets != ignore_index
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    # (tz - m) - log s, not tz - lse: lse rounds log s (small when the target dominates) at the
    # scale of m, which would put p_y's 1 - p_y (from this log-prob) percents off
    tl.store(logp_ptr + offs_n, tl.where(scored, (tz - m) - log_s, 0.0), mask=mask_n)
    if HAS_ENTROPY:
        mean_z = a / s
        tl.store(mean_z_ptr + offs_n, mean_z, mask=mask_n)
        tl.store(entropy_ptr + offs_n, tl.where(scored, lse - mean_z, 0.0), mask=mask_n)
