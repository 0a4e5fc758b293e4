"""The autograd boundary: one Function for every backend that has a forward and a backward sweep.

Forward returns per-token log-probs (and entropies); backward receives their upstream gradients
g_t = dL/dlogp_t and e_t = dL/dentropy_t and asks the backend for dhidden, dweight, dbias. Any
loss built from per-token log-probs (RLSC's weighted sequence sum, GRPO, PPO) composes on top
with plain autograd, so the kernels never need to know which loss they serve.
"""
from __future__ import annotations

import torch

from .options import FusedOptions


def _zero_ignored(x, valid):
    """x with the entries of ignored tokens set to 0 (None stays None)."""
    return None if x is None else torch.where(valid, x, x.new_zeros(()))


class LinearLogprobsFunction(torch.autograd.Function):
    """Ignored tokens (targets == ignore_index) are handled here, once for every backend: their
    outputs are 0 and their upstream gradients are zeroed before the backend's backward, so
    they contribute nothing to any gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: FusedOptions, backend):
        logp, entropy, saved = backend.forward(hidden, weight, bias, targets, opts)
        valid = targets != opts.ignore_index
        logp, entropy = _zero_ignored(logp, valid), _zero_ignored(entropy, valid)
        ctx.backend = backend
        ctx.opts = opts
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, targets, *saved)
        if entropy is None:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, *saved = ctx.saved_tensors
        opts: FusedOptions = ctx.opts
        if not opts.return_entropy:
            grad_entropy = None
        valid = targets != opts.ignore_index
        grad_logp, grad_entropy = _zero_ignored(grad_logp, valid), _zero_ignored(grad_entropy, valid)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        dh, dw, db = ctx.backend.backward(hidden, weight, bias, targets, tuple(saved), grad_logp, grad_entropy, opts, needs)
        dh = dh.to(hidden.dtype) if dh is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None
