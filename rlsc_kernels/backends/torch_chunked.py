"""The PyTorch backend: two sweeps over the vocabulary, chunked over tokens, on any device.

It never holds more than one [token chunk x vocab slice] block of logits. It is the CPU default
and the fallback where Triton is missing. All statistics and gradients are accumulated in
float32 (float64 for float64 inputs); 16-bit weights are upcast one vocab slice at a time.

Math (docs/design.md §2), for token t and vocab entry v:
    z_tv = (W_v . h_t + b_v) / T,  lse_t = logsumexp_v z_tv,  logp_t = z_t,y_t - lse_t
    mean_z_t = sum_v p_tv z_tv,    entropy_t = lse_t - mean_z_t
    dz_tv = g_t ([v = y_t] - p_tv) - e_t p_tv (z_tv - mean_z_t)     (g = dL/dlogp, e = dL/dentropy)
    At v = y_t, 1 - p is -expm1(logp_t), with logp_t = (z_ty - m_t) - log s_t (m = the running max,
    s = sum exp(z - m)): forming lse = m + log s first would round log s ~ 1 - p away when p ~ 1,
    and 1 - exp(z - lse) would cancel to a few ulps of 1.
An id outside [0, V) that is not ignore_index matches no vocab entry: no gather or scatter
reads or writes out of bounds; its target logit counts as 0.
    dh_t = (1/T) sum_v dz_tv W_v,  dW_v = (1/T) sum_t dz_tv h_t,  db_v = (1/T) sum_t dz_tv
With soft-capping (opts.softcap = c): z_tv = c tanh(u_tv / c) / T for u = W h + b, and dz_tv is
multiplied by 1 - tanh^2(u_tv / c) before the three matmuls.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..dtypes import output_dtype
from ..options import FusedOptions

#: Upper bound on the elements of one logits block (tokens x vocab) held at a time (128 MB in
#: fp32): on 2 CPU cores at the SmolLM2 head, 2^25 ran fwd+bwd 25% faster than 2^23 (thin chunks
#: make the dweight matmul a poor one), while the block stays far below the full logits.
BLOCK_ELEMENTS = 1 << 25
#: Vocabulary slice for 16-bit weights (each slice is upcast to float32 once per token chunk).
VOCAB_SLICE = 16384


def flush_subnormal_(x: torch.Tensor) -> torch.Tensor:
    """Sets x's subnormal entries to 0, in place, on CPU. Peaked distributions put many
    probabilities (and logit gradients) below the smallest normal float; x86 CPUs compute with
    subnormals up to ~200x slower (a [1024, 49152] x [49152, 576] fp32 GEMM: 0.27 s normal,
    63 s subnormal on this project's 2-core machine), and they change no result beyond
    rounding: each is below 2^-126 of the largest term it is summed with."""
    if x.device.type == "cpu":
        x.masked_fill_(x.abs() < torch.finfo(x.dtype).tiny, 0.0)
    return x


def _slices(weight: torch.Tensor):
    V = weight.shape[0]
    step = V if weight.dtype in (torch.float32, torch.float64) else VOCAB_SLICE
    for v0 in range(0, V, step):
        yield v0, min(V, v0 + step)


def _chunk_rows(V: int, acc: torch.dtype, opts: FusedOptions) -> int:
    """Token rows per chunk: a [rows, V] block of acc-dtype logits fits opts.buffer_bytes
    (default BLOCK_ELEMENTS elements)."""
    elements = opts.buffer_bytes // (torch.finfo(acc).bits // 8) if opts.buffer_bytes is not None else BLOCK_ELEMENTS
    return max(1, elements // max(V, 1))


def _slice_logits(h: torch.Tensor, weight, bias, v0: int, v1: int, acc: torch.dtype, opts: FusedOptions):
    """z = (h W^T + b) / T, or c * tanh((h W^T + b) / c) / T with opts.softcap = c."""
    w = weight[v0:v1].to(acc)
    z = h @ w.T
    if bias is not None:
        z += bias[v0:v1].to(acc)
    if opts.softcap is not None:
        z = torch.tanh(z.div_(opts.softcap)).mul_(opts.softcap)
    z /= opts.temperature
    return z, w


def forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, opts: FusedOptions
):
    """Returns logp [N], entropy [N] or None, and (lse [N], mean_z [N] or None, logp [N]) for the backward.
    Entries of ignored tokens are arbitrary here; autograd.py zeroes them."""
    N = hidden.shape[0]
    acc = output_dtype(hidden.dtype)
    dev = hidden.device
    lse = torch.empty(N, dtype=acc, device=dev)
    logp = torch.empty(N, dtype=acc, device=dev)
    mean_z = torch.empty(N, dtype=acc, device=dev) if opts.return_entropy else None
    valid = targets != opts.ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    rows = _chunk_rows(weight.shape[0], acc, opts)
    with torch.no_grad():
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            h = hidden[n0:n1].to(acc)
            y = safe_targets[n0:n1]
            # Running (max, sum exp, sum exp * z) over vocab slices: an online logsumexp.
            m = torch.full((n1 - n0,), -float("inf"), dtype=acc, device=dev)
            s = torch.zeros(n1 - n0, dtype=acc, device=dev)
            a = torch.zeros(n1 - n0, dtype=acc, device=dev) if mean_z is not None else None
            ty = torch.zeros(n1 - n0, dtype=acc, device=dev)
            for v0, v1 in _slices(weight):
                z, _ = _slice_logits(h, weight, bias, v0, v1, acc, opts)
                m_new = torch.maximum(m, z.max(dim=1).values)
                scale = torch.exp(m - m_new)
                ez = flush_subnormal_(torch.exp(z - m_new[:, None]))
                s = s * scale + ez.sum(1)
                if a is not None:
                    a = a * scale + (ez * z).sum(1)
                m = m_new
                in_slice = (y >= v0) & (y < v1)
                idx = (y - v0).clamp(0, v1 - v0 - 1)
                ty += torch.where(in_slice, z.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(ty))
            log_s = torch.log(s)
            lse[n0:n1] = m + log_s
            logp[n0:n1] = (ty - m) - log_s  # not ty - lse: see the module docstring
            if a is not None:
                mean_z[n0:n1] = a / s
    entropy = lse - mean_z if mean_z is not None else None
    return logp, entropy, (lse, mean_z, logp)


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    saved: Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    opts: FusedOptions,
    needs: Tuple[bool, bool, bool],
):
    """Gradients (dhidden, dweight, dbias) for per-token upstream grads; None where not needed.

    filter_eps is accepted and ignored: this backend is always exact. saved = forward's
    (lse, mean_z, logp), or (lse, mean_z) (1 - p then from z - lse, less exact for p ~ 1). Every intermediate is float32 (float64): the upstream gradients meet
    the logits in full precision and only the returned gradients are rounded (by the caller).
    """
    lse, mean_z, logp = (*saved, None)[:3]  # (lse, mean_z) from callers without the log-prob
    N, D = hidden.shape
    acc = output_dtype(hidden.dtype)
    dev = hidden.device
    valid = targets != opts.ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    g = grad_logp.to(acc) if grad_logp is not None else None
    e = grad_entropy.to(acc) if grad_entropy is not None and mean_z is not None else None
    need_h, need_w, need_b = needs
    dh = torch.zeros(N, D, dtype=acc, device=dev) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=dev) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=dev) if (need_b and bias is not None) else None
    rows = _chunk_rows(weight.shape[0], acc, opts)
    inv_t = 1.0 / opts.temperature
    with torch.no_grad():
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            h = hidden[n0:n1].to(acc)
            y = safe_targets[n0:n1]
            for v0, v1 in _slices(weight):
                z, w = _slice_logits(h, weight, bias, v0, v1, acc, opts)
                p = flush_subnormal_(torch.exp(z - lse[n0:n1, None]))
                dz = torch.zeros_like(z)
                if g is not None:
                    gc = g[n0:n1]
                    dz -= gc[:, None] * p
                    # at the target, g (1 - p) as -g expm1(z_y - lse): no cancellation when p ~ 1
                    in_slice = (y >= v0) & (y < v1)
                    idx = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
                    x = logp[n0:n1] if logp is not None else z.gather(1, idx).squeeze(1) - lse[n0:n1]
                    at_target = -gc * torch.expm1(x)
                    dz.scatter_(1, idx, torch.where(in_slice, at_target, dz.gather(1, idx).squeeze(1))[:, None])
                if e is not None:
                    dz -= e[n0:n1, None] * p * (z - mean_z[n0:n1, None])
                dz *= inv_t
                if opts.softcap is not None:
                    # z = c tanh(u / c) / T: du = dz (1 - tanh^2) / T, tanh = z T / c
                    dz *= 1.0 - (z * (opts.temperature / opts.softcap)).square()
                flush_subnormal_(dz)
                if dh is not None:
                    dh[n0:n1] += dz @ w
                if dw is not None:
                    dw[v0:v1] += dz.T @ h
                if db is not None:
                    db[v0:v1] += dz.sum(0)
    return dh, dw, db
