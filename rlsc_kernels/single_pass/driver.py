"""The one chunk driver of the single pass; the backends supply four primitives.

Per chunk (tokens [t0, t1), plan.py's Chunk), with T the temperature:
    lse, logp, mean_z = ops.stats(t0, t1)       GEMM 1 (the logits block, held by ops) + a row pass
    L_s += sum_t logp_t                          index_add over the chunk's tokens
    (w_s, c_s) = weigh(L_s, n_s, s0)             for the sequences that closed in this chunk
    close the sequence carried over from earlier chunks (split layout): its dhidden rows from
        earlier chunks *= c_s, dweight += c_s * open accumulator (or dweight *= c_s when dweight
        itself was the accumulator)
    g_t = K c_s(t) / T (K c0 / T for the rows of a sequence still open: c_s is not known yet;
        c0 = -1 / S for "mean", -1 for "sum", the size of a typical c_s; its rows are rescaled
        by c_s / c0 when it closes)
    ops.grads(t0, t1, g, dh rows, parts)        dz = g ([v = y] - p); GEMM 2: dH = dz W;
                                                 GEMM 3: for each part (r0, r1, dw, db) of the
                                                 chunk's rows, dw += dz[r0:r1]^T h, db += sum dz
K is the backend's gradient-operand scale (`ops.grad_scale`, a power of two, 1 except for fp16
GEMM operands): fp16's range is narrow, so the 16-bit dz is formed K times larger (|K g| <= 2^14)
and dhidden rows, dweight and dbias are divided by K in fp32 (exact). The driver owns every allocation of the outputs and accumulators, the L_s sums, the weighting,
g, skipping empty chunks and the open-sequence bookkeeping; a backend owns its logits buffer and
how it runs the GEMMs and the row passes.

Backend contract: `module.SinglePassOps(hidden, weight, bias, targets, opts, max_rows, **kw)`:
    .acc                the statistics / gradient dtype (float32; float64 for float64 inputs)
    .stats(t0, t1)      -> (lse [n], logp [n], mean_z [n] or None) in .acc, for rows [t0, t1);
                        logp of ignored tokens may be anything finite (the driver masks it).
                        Keeps whatever the chunk's grads need (the logits block).
    .grads(t0, t1, g, dh, parts)
                        g [n] .acc per-row coefficient (0 for ignored tokens); dh: rows [n, D]
                        of dhidden to overwrite with dz W, or None; parts: [(r0, r1, dw, db)]
                        (chunk-relative rows; dw [V, D], db [V] accumulators in .acc or None)
                        to add dz[r0:r1]^T h[r0:r1] and sum(dz[r0:r1]) into.
    .grad_scale(bound)  -> K (a power of two) given a bound on |g| (None: unknown)
    .finish()           releases the logits block (before the driver's last allocations)
hidden [N, D] (input dtype), weight [V, D], bias [V] or None, targets [N] int64, seq [N] int64
sorted ascending in [0, S).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..autograd import scored
from ..dtypes import output_dtype
from ..options import FusedOptions
from .plan import Weigh, as_chunks


@dataclass
class SinglePassResult:
    """The driver's result; gradients are those of the loss for grad_output = 1.

    token_logp [N], token_entropy [N] or None, seq_logp [S], seq_weight [S], lse [N],
    mean_z [N] or None: float32 (float64 for float64 inputs); ignored tokens have logp 0.
    dhidden [N, D], dweight [V, D], dbias [V]: float32 (float64 for float64 inputs), or None
    where not needed; dweight is accumulated over the chunks in that type.
    """

    token_logp: torch.Tensor
    token_entropy: Optional[torch.Tensor]
    seq_logp: torch.Tensor
    seq_weight: torch.Tensor
    lse: torch.Tensor
    mean_z: Optional[torch.Tensor]
    dhidden: Optional[torch.Tensor]
    dweight: Optional[torch.Tensor]
    dbias: Optional[torch.Tensor]


def check_chunks(chunks, N: int, S: int) -> None:
    t = s = 0
    for c in chunks:
        if c.t0 != t or c.t1 < c.t0 or c.s0 != s or c.s1 < c.s0:
            raise ValueError(f"chunks must tile the tokens [0, {N}) and sequences [0, {S}) in order, got {list(chunks)}")
        t, s = c.t1, c.s1
    if t != N or s != S:
        raise ValueError(f"chunks must tile the tokens [0, {N}) and sequences [0, {S}) in order, got {list(chunks)}")


def run(backend, hidden, weight, bias, targets, seq, chunks, weigh: Weigh, opts: FusedOptions, needs,
        **ops_kwargs) -> SinglePassResult:
    """The single pass over `chunks` (plan.py: Chunk, or (t0, t1, s0, s1) tuples of whole
    sequences) with `backend`'s primitives (a module with SinglePassOps). No host sync."""
    chunks = as_chunks(chunks)
    N, D = hidden.shape
    V = weight.shape[0]
    S = weigh.n_seqs
    check_chunks(chunks, N, S)
    acc = output_dtype(hidden.dtype)
    dev = hidden.device
    need_h, need_w, need_b = (bool(x) for x in needs)
    need_b = need_b and bias is not None
    any_grad = need_h or need_w or need_b
    inv_t = 1.0 / opts.temperature
    max_rows = max((c.t1 - c.t0 for c in chunks), default=0)
    with torch.no_grad():
        ops = backend.SinglePassOps(hidden, weight, bias, targets, opts, max_rows, **ops_kwargs)
        valid = scored(targets, opts.ignore_index, weight.shape[0])  # ids outside [0, V): ignored
        token_logp = torch.zeros(N, dtype=acc, device=dev)
        lse = torch.zeros(N, dtype=acc, device=dev)
        mean_z = torch.zeros(N, dtype=acc, device=dev) if opts.return_entropy else None
        seq_logp = torch.zeros(S, dtype=acc, device=dev)
        seq_weight = torch.zeros(S, dtype=torch.float32, device=dev)
        open_coef = -weigh.scale  # c0: the coefficient of a sequence's rows until it is weighed
        coef = torch.full((S,), open_coef, dtype=acc, device=dev)
        bound = weigh.coef_bound()
        K = float(ops.grad_scale(bound * inv_t if bound is not None else None)) if any_grad else 1.0
        n_tokens = torch.zeros(S, dtype=torch.int64, device=dev).index_add_(0, seq, valid.long())
        dh = torch.empty(N, D, dtype=acc, device=dev) if need_h else None
        dw = torch.zeros(V, D, dtype=acc, device=dev) if need_w else None
        db = torch.zeros(V, dtype=acc, device=dev) if need_b else None
        open_w = open_b = None  # the open sequence's dweight / dbias share (split layout)
        open_in_dw = False  # dweight / dbias themselves hold the open share (nothing else added yet)
        touched = False  # whether any rows went into dw / db
        for c in chunks:
            t0, t1 = c.t0, c.t1
            n = t1 - t0
            if n:
                lse_c, logp_c, mz_c = ops.stats(t0, t1)
                logp_c = torch.where(valid[t0:t1], logp_c, torch.zeros((), dtype=acc, device=dev))
                token_logp[t0:t1] = logp_c
                lse[t0:t1] = lse_c
                if mean_z is not None:
                    mean_z[t0:t1] = mz_c
                seq_logp.index_add_(0, seq[t0:t1], logp_c)
            if c.s1 > c.s0:
                sw, cf = weigh(seq_logp[c.s0:c.s1], n_tokens[c.s0:c.s1], c.s0)
                seq_weight[c.s0:c.s1] = sw
                coef[c.s0:c.s1] = cf
            if not n or not any_grad:
                continue
            if c.carry_start < t0:  # sequence s0 was open since carry_start and closes here
                c_s = coef[c.s0:c.s0 + 1] * (1.0 / open_coef)
                if dh is not None:
                    dh[c.carry_start:t0] *= c_s[:, None]
                if open_in_dw:
                    if dw is not None:
                        dw.mul_(c_s[:, None])
                    if db is not None:
                        db.mul_(c_s)
                    open_in_dw = False
                else:
                    if dw is not None:
                        dw.addcmul_(open_w, c_s[:, None])
                    if db is not None:
                        db.addcmul_(open_b, c_s)
            g = torch.where(valid[t0:t1], coef[seq[t0:t1]] * (inv_t * K), torch.zeros((), dtype=acc, device=dev))
            r_open = max(c.open_start, t0) - t0
            parts = []
            if r_open > 0:
                parts.append((0, r_open, dw, db))
                touched = True
            if r_open < n:
                if c.open_start >= t0:  # a sequence opens in this chunk
                    if not touched:
                        open_in_dw = True
                    else:
                        if dw is not None:
                            open_w = torch.zeros_like(dw) if open_w is None else open_w.zero_()
                        if db is not None:
                            open_b = torch.zeros_like(db) if open_b is None else open_b.zero_()
                    touched = True
                if open_in_dw:
                    parts.append((r_open, n, dw, db))
                else:
                    parts.append((r_open, n, open_w, open_b))
            if dw is None and db is None:
                parts = []
            ops.grads(t0, t1, g, dh[t0:t1] if dh is not None else None, parts)
            if K != 1.0 and dh is not None:
                dh[t0:t1] *= 1.0 / K
        open_w = open_b = None
        ops.finish()
        if K != 1.0:
            for acc_grad in (dw, db):
                if acc_grad is not None:
                    acc_grad *= 1.0 / K
    entropy = None
    if mean_z is not None:
        entropy = torch.where(valid, lse - mean_z, torch.zeros((), dtype=acc, device=dev))
    return SinglePassResult(token_logp, entropy, seq_logp, seq_weight, lse, mean_z, dh, dw, db)
