"""Device helpers shared by the sweep kernels: one logits tile, and its gradient.

For token rows n and vocab columns v of one tile:
    z_nv  = (h_n . W_v + b_v) / T                          (fp32 accumulation over D)
    dz_nv = g_n ([v = y_n] - p_nv) - e_n p_nv (z_nv - mean_z_n),   p_nv = exp(z_nv - lse_n)
where g = dL/dlogp and e = dL/dentropy per token (zero for ignored tokens and padding rows).
At the target column, 1 - p = -expm1(logp_n) from the forward's log-prob (computed there as
(z_y - max) - log sum exp(z - max)), never 1 - exp(z - lse): with p close to 1 (a peaked
distribution, a two-token vocabulary) lse rounds log sum ~ 1 - p away and 1 - p cancels.
A target id outside [0, V) matches no column: it reads and writes nothing (its target logit
counts as 0 in the forward sweep), so unchecked garbage ids cannot touch memory out of bounds.
With SOFTCAP (cap c): z_nv = c tanh(u_nv / c) / T for u = h . W + b, and dz_nv (the gradient
with respect to u, up to the 1/T the callers apply) carries the factor 1 - tanh^2 = 1 - (z T / c)^2.
"""
import triton
import triton.language as tl


@triton.jit
def grouped_program(pid, n_row_blocks, n_cols, GROUP_N: tl.constexpr):
    """Maps a 1-D program id onto (row block, column) so that GROUP_N row blocks (token blocks)
    run through all n_cols columns (vocab blocks or splits) together: the programs in flight
    share a few hidden blocks and a few W blocks, which then stay in L2."""
    per_group = GROUP_N * n_cols
    first_row = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_row_blocks - first_row, GROUP_N)
    return first_row + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, offs_n, mask_n, offs_v, mask_v, D,
    stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, DOT_UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z [BLOCK_N, BLOCK_V] fp32; columns outside the vocabulary hold finite garbage (mask them)."""
    rows_h = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    cols_w = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    # invariant: acc = h[:, :d0] @ W[:, :d0]^T for the tile's rows and columns
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
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        # c tanh(u / c), with tanh(x) = 2 sigmoid(2x) - 1 (Triton has no portable tanh)
        acc = softcap * (2.0 * tl.sigmoid(acc * (2.0 / softcap)) - 1.0)
    return acc * inv_temperature


@triton.jit
def grad_logits_tile(
    z, offs_n, mask_n, offs_v, mask_v,
    targets_ptr, lse_ptr, logp_ptr, mean_z_ptr, grad_logp_ptr, grad_entropy_ptr, inv_temperature, softcap,
    HAS_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LOGP: tl.constexpr,
):
    """(dz [BLOCK_N, BLOCK_V] fp32, scale [BLOCK_N] = |g| + |e|); dz is 0 outside the tile's valid area."""
    valid = mask_n[:, None] & mask_v[None, :]
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(grad_logp_ptr + offs_n, mask=mask_n, other=0.0)
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
    is_target = offs_v.to(tl.int64)[None, :] == targets[:, None]
    if HAS_LOGP:
        logp = tl.load(logp_ptr + offs_n, mask=mask_n, other=0.0)
        dz = tl.where(is_target, -expm1(logp)[:, None], -p) * g[:, None]
    else:  # no accurate log-prob from the caller: 1 - p from z - lse, still without 1 - exp()
        dz = tl.where(is_target, -expm1(z - lse[:, None]), -p) * g[:, None]
    scale = tl.abs(g)
    if HAS_ENTROPY:
        e = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0)
        mean_z = tl.load(mean_z_ptr + offs_n, mask=mask_n, other=0.0)
        dz -= e[:, None] * p * tl.where(valid, z - mean_z[:, None], 0.0)
        scale += tl.abs(e)
    if SOFTCAP:
        tanh = z / (softcap * inv_temperature)
        dz = dz * (1.0 - tanh * tanh)
    return dz, scale


@triton.jit
def expm1(x):
    """exp(x) - 1 without cancellation near 0 (Triton has no portable expm1): Kahan's
    (u - 1) x / log(u), u = exp(x), for |x| < 0.5 (exact x where u rounds to 1), else u - 1."""
    u = tl.exp(x)
    um1 = u - 1.0
    small = tl.abs(x) < 0.5
    safe_log = tl.where(small & (u != 1.0), tl.log(u), 1.0)
    kahan = tl.where(u == 1.0, x, um1 * x / safe_log)
    return tl.where(small, kahan, um1)


@triton.jit
def tile_is_needed(dz, scale, filter_eps):
    """False when, for every row, the tile's gradient mass sum_v |dz| is at most eps * scale."""
    excess = tl.sum(tl.abs(dz), 1) - filter_eps * scale
    return tl.max(excess, 0) > 0.0


@triton.jit
def round_to_bf16_rtne(x):
    """fp32 -> nearest bf16 (ties to even), kept in fp32. Interpreter-only path: Triton's
    interpreter truncates fp32 -> bf16 conversions, while the GPU rounds to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
