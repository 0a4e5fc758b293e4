"""The single-pass RLSC loss in plain PyTorch: the readable reference of the algorithm's
primitives, and the torch backend's implementation (any device). The chunk loop is the driver's
(rlsc_kernels/single_pass/driver.py); this module supplies its two steps per chunk.

Per chunk of tokens [t0, t1), with T the temperature:
    stats:  z = (h W^T + b) / T                     one GEMM, [n, V] in fp32 (fp64 for fp64 inputs)
            m = max_v z,  e = exp(z - m),  s = sum_v e,  lse = m + log s
            logp_t = z_t,y_t - lse_t,  mean_z_t = sum_v e z / s   (e stays in the buffer)
    grads:  dz = g ([v = y_t] - e / s)               written over e, in place; the target entry
                                                     is g (-expm1(logp_t)), not g (1 - p), so
                                                     it does not cancel when p_y is close to 1
            dH = dz W,  dW += dz^T h,  db += sum_t dz   the two gradient GEMMs
The chunk's logits buffer (and, with entropy, one more of its size) is all the extra memory
beyond the driver's outputs. 16-bit weights are upcast to fp32 once per call (one W-sized fp32
temporary next to dW).
"""
from __future__ import annotations

import torch

from ..dtypes import output_dtype
from ..options import FusedOptions
from .torch_chunked import flush_subnormal_


class SinglePassOps:
    """The driver's primitives on torch tensors (contract: single_pass/driver.py)."""

    def __init__(self, hidden, weight, bias, targets, opts: FusedOptions, max_rows: int):
        self.acc = output_dtype(hidden.dtype)
        self.hidden = hidden
        self.w = weight.to(self.acc)
        self.b = bias.to(self.acc) if bias is not None else None
        self.inv_t = 1.0 / opts.temperature
        self.entropy = opts.return_entropy
        valid = targets != opts.ignore_index
        self.targets = torch.where(valid, targets, torch.zeros_like(targets))
        self._chunk = None

    def stats(self, t0, t1):
        h = self.hidden[t0:t1].to(self.acc)
        y = self.targets[t0:t1, None]
        z = torch.addmm(self.b, h, self.w.T) if self.b is not None else h @ self.w.T
        z *= self.inv_t
        m = z.amax(dim=1, keepdim=True)
        z -= m
        z_target = z.gather(1, y).squeeze(1)
        mean_z = None
        if self.entropy:
            e = flush_subnormal_(torch.exp(z))
            ez = torch.einsum("tv,tv->t", e, z)
            del z
        else:
            e = flush_subnormal_(z.exp_())
        s = e.sum(dim=1)
        log_s = torch.log(s)
        logp = z_target - log_s
        if self.entropy:
            mean_z = ez / s + m.squeeze(1)
        self._chunk = (h, y, e, s, logp)
        return m.squeeze(1) + log_s, logp, mean_z

    def grads(self, t0, t1, g, dh, parts):
        h, y, e, s, logp = self._chunk
        self._chunk = None
        # dz = g ([v = y] - e / s), written over e; the target entry from the log-prob (expm1)
        e *= (-g / s)[:, None]
        e.scatter_(1, y, (g * -torch.expm1(logp))[:, None])
        flush_subnormal_(e)
        if dh is not None:
            torch.mm(e, self.w, out=dh)
        for r0, r1, dw, db in parts:
            if dw is not None:
                dw.addmm_(e[r0:r1].T, h[r0:r1])
            if db is not None:
                db += e[r0:r1].sum(dim=0)

    def grad_scale(self, bound):
        return 1.0  # dz is fp32 (fp64) here: no range to fit

    def finish(self):
        self._chunk = None
