"""The autograd boundary: one Function for every backend that has a forward and a backward sweep.

Forward returns per-token log-probs (and entropies); backward receives their upstream gradients
g_t = dL/dlogp_t and e_t = dL/dentropy_t and asks the backend for dhidden, dweight, dbias. Any
loss built from per-token log-probs (RLSC's weighted sequence sum, GRPO, PPO) composes on top
with plain autograd, so the kernels never need to know which loss they serve.

An output nobody backpropagates through costs nothing: gradients are not materialised, so an
entropy computed for logging only reaches the backend as grad_entropy=None and the backward runs
without its entropy path. The backward is not itself differentiable: differentiating its
gradients (double backward) raises a clear error instead of silently missing terms.
"""
from __future__ import annotations

import torch
from torch._C import _functions as _autograd_functions


from .dtypes import output_dtype
from .options import FusedOptions


def _zero_ignored(x, valid):
    """x with the entries of ignored tokens set to 0 (None stays None)."""
    return None if x is None else torch.where(valid, x, x.new_zeros(()))


def not_differentiable(grads, what: str):
    """The gradients a backward returns, behind a node that raises a clear error if anything
    differentiates them (double backward, create_graph=True). Like torch's once_differentiable,
    but also when only the saved inputs (not the upstream gradients) require grad, which
    once_differentiable misses. `what` names the backward in the message."""
    present = [i for i, g in enumerate(grads) if g is not None]
    if not torch.is_grad_enabled() or not present:
        return grads
    message = (f"rlsc_kernels: {what} is not differentiable (double backward, create_graph=True "
               "through it); use backend='reference' for higher-order gradients").encode()
    raise_later = _autograd_functions.DelayedError(message, len(present))
    wrapped = raise_later(*[grads[i].detach().requires_grad_() for i in present])
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return tuple(out)


class LinearLogprobsFunction(torch.autograd.Function):
    """Ignored tokens (targets == ignore_index) are handled here, once for every backend: their
    outputs are 0 and their upstream gradients are zeroed before the backend's backward, so
    they contribute nothing to any gradient. Zero tokens (an empty batch) never reach a
    backend: the outputs are empty and every gradient is zero."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: FusedOptions, backend):
        ctx.set_materialize_grads(False)
        if hidden.shape[0] == 0:
            logp = hidden.new_zeros(0, dtype=output_dtype(hidden.dtype))
            entropy, saved = (logp.clone() if opts.return_entropy else None), ()
        else:
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
        with torch.no_grad():
            grads = LinearLogprobsFunction._gradients(ctx, grad_logp, grad_entropy)
        return not_differentiable(grads, "the fused op's backward")

    @staticmethod
    def _gradients(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, *saved = ctx.saved_tensors
        opts: FusedOptions = ctx.opts
        if not opts.return_entropy:
            grad_entropy = None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        if hidden.shape[0] == 0 or (grad_logp is None and grad_entropy is None):
            # Nothing flows back (no token, or neither output was used): zero gradients where
            # asked, so a rank with an empty micro-batch still takes part in the backward.
            zeros = [torch.zeros_like(t) if (need and t is not None) else None
                     for t, need in zip((hidden, weight, bias), needs)]
            return (*zeros, None, None, None)
        valid = targets != opts.ignore_index
        grad_logp, grad_entropy = _zero_ignored(grad_logp, valid), _zero_ignored(grad_entropy, valid)
        dh, dw, db = ctx.backend.backward(hidden, weight, bias, targets, tuple(saved), grad_logp, grad_entropy, opts, needs)
        dh = dh.to(hidden.dtype) if dh is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None
