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

from dataclasses import replace

import torch
from torch._C import _functions as _autograd_functions

from .dtypes import output_dtype
from .options import FusedOptions


_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


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


def scored(targets: torch.Tensor, ignore_index: int, vocab_size: int) -> torch.Tensor:
    """Tokens that are scored: target in [0, V). ignore_index, and with check_values=False any
    id outside the vocabulary, count as ignored (an elementwise mask: no sync, no extra pass)."""
    return (targets != ignore_index) & (targets >= 0) & (targets < vocab_size)


class LinearLogprobsFunction(torch.autograd.Function):
    """Ignored tokens (targets == ignore_index, and ids outside [0, V) that check_values=False
    let through) are handled here, once for every backend: their outputs are 0 and their
    upstream gradients are zeroed before the backend's backward, so they contribute nothing to
    any gradient. The backends' kernels never read or write out of bounds for any id. Zero
    tokens (an empty batch) never reach a backend: the outputs are empty and every gradient is
    zero.

    compute_dtype (autocast): hidden, weight and bias arrive in their own (master) dtypes and are
    cast to compute_dtype here, inside the Function, so the backend's fp32 gradients are
    returned in the master dtypes directly: an fp32 master weight under fp16 autocast gets a
    dweight that was never rounded to fp16 (a GradScaler-scaled gradient neither overflows nor
    flushes on the way)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: FusedOptions, backend, compute_dtype=None):
        ctx.set_materialize_grads(False)
        ctx.grad_dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        if compute_dtype is not None:
            wide = weight.dtype == torch.float32 and compute_dtype != torch.float32
            hidden, weight, bias = (t.to(compute_dtype) if t is not None and t.dtype in _CASTABLE else t
                                    for t in (hidden, weight, bias))
            if wide:
                opts = replace(opts, dweight_fp32=True)
        if hidden.shape[0] == 0:
            logp = hidden.new_zeros(0, dtype=output_dtype(hidden.dtype))
            entropy, saved = (logp.clone() if opts.return_entropy else None), ()
        else:
            logp, entropy, saved = backend.forward(hidden, weight, bias, targets, opts)
            valid = scored(targets, opts.ignore_index, weight.shape[0])
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
            zeros = [z.to(d) if z is not None else None for z, d in zip(zeros, ctx.grad_dtypes)]
            return (*zeros, None, None, None, None)
        valid = scored(targets, opts.ignore_index, weight.shape[0])
        grad_logp, grad_entropy = _zero_ignored(grad_logp, valid), _zero_ignored(grad_entropy, valid)
        dh, dw, db = ctx.backend.backward(hidden, weight, bias, targets, tuple(saved), grad_logp, grad_entropy, opts, needs)
        # the one rounding: to the dtypes the caller's tensors have (masters under autocast)
        h_dtype, w_dtype, b_dtype = ctx.grad_dtypes
        dh = dh.to(h_dtype) if dh is not None else None
        dw = dw.to(w_dtype) if dw is not None else None
        db = db.to(b_dtype) if db is not None else None
        return dh, dw, db, None, None, None, None
