"""Single pass, step 2: turn a chunk's fp32 logits block into the logit gradient, in place.

With the chunk's per-token statistics and coefficients known (g_t = dLoss/dL_s(t) / T from the
driver, 1 / T for the rows of a sequence still open, zero for ignored tokens):
    z_tv = (x_tv + b_v) / T,   p_tv = exp(z_tv - lse_t)
    dx_tv = g_t ([v = y_t] - p_tv)
written over the logits in the GEMM operand dtype (fp32, or bf16 / fp16 for 16-bit inputs).
The target entry is g_t (-expm1(logp_t)) from the row's log-prob, not g_t (1 - p_ty), which
cancels when p_ty is close to 1. Target ids are only compared with column indices, never used
as an address: an id outside [0, V) (possible with check_values=False) matches no column, so
its row's gradient is -g_t p_tv everywhere (the stats kernel gave it logp = -lse_t).

16-bit output in place: row t's 16-bit gradients take the first half of row t's own fp32 bytes
(the launcher passes the buffer viewed as 16-bit with twice the row stride). Writing vocab block
k (columns [k B, k B + B)) overwrites fp32 columns [k B / 2, k B / 2 + B / 2), which this row's
program has already read (blocks <= k) and never reads again (later blocks start at (k + 1) B).
One program owns each row, and a barrier before every store makes sure all of its threads have
read block k before any of them writes: no other row and no unread column is touched.
"""
import triton
import triton.language as tl

from .tiles import round_to_bf16_rtne


@triton.jit
def _one_minus_exp(x):
    """1 - exp(x) for x <= 0 without cancellation: -expm1(x) by Kahan's exp(x) - 1 = (u - 1) x / log(u)
    (u = exp(x)) near 0, where 1 - u would lose digits, and 1 - u below -0.5, where it does not."""
    u = tl.exp(x)
    safe_u = tl.where((u == 1.0) | (u == 0.0), 0.5, u)  # log(safe_u) is finite and nonzero
    near = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(safe_u))
    return tl.where(x > -0.5, -near, 1.0 - u)


@triton.jit
def single_pass_grad_kernel(
    logits_ptr, grad_ptr, bias_ptr, targets_ptr, lse_ptr, logp_ptr, coef_ptr,
    n_rows, V, stride_ln, stride_gn, inv_temperature,
    HAS_BIAS: tl.constexpr, ROUND_BF16_RTNE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
    logp = tl.minimum(tl.load(logp_ptr + offs_n, mask=mask_n, other=0.0), 0.0)
    g_target = g * _one_minus_exp(logp)
    rows_in = logits_ptr + offs_n.to(tl.int64)[:, None] * stride_ln
    rows_out = grad_ptr + offs_n.to(tl.int64)[:, None] * stride_gn
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask = mask_n[:, None] & (offs_v < V)[None, :]
        x = tl.load(rows_in + offs_v[None, :], mask=mask, other=0.0)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)[None, :]
        p = tl.exp(x * inv_temperature - lse[:, None])
        is_target = (offs_v.to(tl.int64)[None, :] == targets[:, None]) & (offs_v < V)[None, :]
        dx = tl.where(is_target, g_target[:, None], -g[:, None] * p)
        if ROUND_BF16_RTNE:
            dx = round_to_bf16_rtne(dx)
        tl.debug_barrier()
        tl.store(rows_out + offs_v[None, :], dx.to(grad_ptr.dtype.element_ty), mask=mask)
