"""Sweep 1: per-token logsumexp, target logit and entropy statistic, never storing logits.

For a token block n and the vocab blocks of one split s, with z_tv = (W_v . h_t + b_v) / T:
    m_t = max_v z_tv,   s_t = sum_v exp(z_tv - m_t),   a_t = sum_v exp(z_tv - m_t) z_tv,
    tz_t = z_t,y_t   (0 when y_t is outside this split)
Loop invariant over the split's vocab blocks: (m, s, a) are the online max / rescaled sums of
every block seen so far. Program order: GROUP_N token blocks times all splits run together, so
the programs in flight share a few hidden blocks (which stay in L2) and walk the vocabulary in
step (each W block is fetched once per group). With every token block in flight at once, the
hidden states would not fit in L2 and would be re-read from memory for every vocab block. The launcher merges the splits: lse = M + log sum_s S_s exp(M_s - M),
mean_z = sum_s A_s exp(M_s - M) / sum_s S_s exp(M_s - M), and entropy = lse - mean_z.
"""
import triton
import triton.language as tl

from .tiles import grouped_program, logits_tile


@triton.jit
def forward_sweep_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_zsum_ptr, part_target_ptr,
    N, V, D, vblocks_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    n_nblocks = tl.cdiv(N, BLOCK_N)
    pid_n, pid_s = grouped_program(tl.program_id(0), n_nblocks, tl.num_programs(0) // n_nblocks, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    tz = tl.zeros((BLOCK_N,), tl.float32)

    total_vblocks = tl.cdiv(V, BLOCK_V)
    first_vblock = pid_s * vblocks_per_split
    n_vblocks = tl.minimum(vblocks_per_split, total_vblocks - first_vblock)
    for vb in range(0, n_vblocks):
        offs_v = (first_vblock + vb) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, mask_n, offs_v, mask_v, D,
                        stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature, softcap,
                        HAS_BIAS, SOFTCAP, EVEN_D, DOT_UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * rescale + tl.sum(p, 1)
        if HAS_ENTROPY:
            a = a * rescale + tl.sum(p * tl.where(mask_v[None, :], z, 0.0), 1)
        is_target = offs_v.to(tl.int64)[None, :] == targets[:, None]
        tz += tl.sum(tl.where(is_target, z, 0.0), 1)
        m = m_new

    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(part_max_ptr + out, m, mask=mask_n)
    tl.store(part_sum_ptr + out, s, mask=mask_n)
    tl.store(part_target_ptr + out, tz, mask=mask_n)
    if HAS_ENTROPY:
        tl.store(part_zsum_ptr + out, a, mask=mask_n)
