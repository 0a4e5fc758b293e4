"""The single-pass RLSC loss in plain PyTorch: the readable reference of the algorithm, and the
torch backend's implementation (any device).

Per chunk of whole sequences (tokens [t0, t1), sequences [s0, s1)), with T the temperature:
    z = (h W^T + b) / T                     one GEMM, [n, V] in fp32 (fp64 for fp64 inputs)
    m = max_v z,  e = exp(z - m),  s = sum_v e,  lse = m + log s
    logp_t = z_t,y_t - lse_t,  mean_z_t = sum_v e z / s,  entropy_t = lse_t - mean_z_t
    L_s = sum_{t in s} logp_t,  (w_s, c_s) = weigh(L_s)       c_s = dLoss/dL_s
    dz = (c_s(t) / T) ([v = y_t] - e / s)   written over e, in place
    dH = dz W,  dW += dz^T h,  db += sum_t dz   the two gradient GEMMs
The chunk's logits buffer (and, with entropy, one more of its size) is all the extra memory
beyond the outputs and the fp32 dW accumulator. 16-bit weights are upcast to fp32 once per call
(one W-sized fp32 temporary next to dW).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..options import FusedOptions
from ..reference import output_dtype
from ..single_pass import SinglePassResult
from .torch_chunked import flush_subnormal_


def rlsc_single_pass(hidden, weight, bias, targets, seq, chunks, weigh, opts: FusedOptions, needs) -> SinglePassResult:
    N, D = hidden.shape
    V = weight.shape[0]
    n_seqs = chunks[-1][3]
    acc = output_dtype(hidden.dtype)
    dev = hidden.device
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    inv_t = 1.0 / opts.temperature
    with torch.no_grad():
        w = weight.to(acc)
        b = bias.to(acc) if bias is not None else None
        valid = targets != opts.ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        token_logp = torch.zeros(N, dtype=acc, device=dev)
        lse = torch.zeros(N, dtype=acc, device=dev)
        mean_z = torch.zeros(N, dtype=acc, device=dev) if opts.return_entropy else None
        seq_logp = torch.zeros(n_seqs, dtype=acc, device=dev)
        seq_weight = torch.zeros(n_seqs, dtype=torch.float32, device=dev)
        n_tokens = torch.zeros(n_seqs, dtype=torch.int64, device=dev).index_add_(0, seq, valid.long())
        dh = torch.zeros(N, D, dtype=acc, device=dev) if need_h else None
        dw = torch.zeros(V, D, dtype=acc, device=dev) if need_w else None
        db = torch.zeros(V, dtype=acc, device=dev) if need_b else None
        for t0, t1, s0, s1 in chunks:
            if t1 == t0:
                sw, _ = weigh(seq_logp[s0:s1], n_tokens[s0:s1])
                seq_weight[s0:s1] = sw
                continue
            h = hidden[t0:t1].to(acc)
            y = safe_targets[t0:t1, None]
            ok = valid[t0:t1]
            z = torch.addmm(b, h, w.T) if b is not None else h @ w.T
            z *= inv_t
            m = z.amax(dim=1, keepdim=True)
            z -= m
            z_target = z.gather(1, y).squeeze(1)
            if mean_z is not None:
                e = flush_subnormal_(torch.exp(z))
                ez = torch.einsum("tv,tv->t", e, z)
                del z
            else:
                e = flush_subnormal_(z.exp_())
            s = e.sum(dim=1)
            log_s = torch.log(s)
            lse[t0:t1] = m.squeeze(1) + log_s
            logp = torch.where(ok, z_target - log_s, torch.zeros_like(log_s))
            token_logp[t0:t1] = logp
            if mean_z is not None:
                mean_z[t0:t1] = ez / s + m.squeeze(1)
            local = seq[t0:t1] - s0
            seq_logp[s0:s1] = torch.zeros(s1 - s0, dtype=acc, device=dev).index_add_(0, local, logp)
            sw, coef = weigh(seq_logp[s0:s1], n_tokens[s0:s1])
            seq_weight[s0:s1] = sw
            if not (need_h or need_w or need_b):
                continue
            g = torch.where(ok, coef.to(acc)[local] * inv_t, torch.zeros_like(log_s))
            # dz = g ([v = y] - e / s), written over e
            e *= (-g / s)[:, None]
            e.scatter_add_(1, y, g[:, None])
            flush_subnormal_(e)
            if dh is not None:
                torch.mm(e, w, out=dh[t0:t1])
            if dw is not None:
                dw.addmm_(e.T, h)
            if db is not None:
                db += e.sum(dim=0)
    entropy = None
    if mean_z is not None:
        entropy = torch.where(valid, lse - mean_z, torch.zeros_like(lse))
    return SinglePassResult(token_logp, entropy, seq_logp, seq_weight, lse, mean_z, dh, dw, db)
