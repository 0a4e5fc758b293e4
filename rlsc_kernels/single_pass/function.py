"""The single pass's autograd boundary and its dispatch from linear_rlsc_loss.

`maybe_single_pass` decides whether this call takes the single pass (path, backend, device),
plans it once (plan.py: one host sync for the tokens per sequence) and runs the driver
(driver.py) with the backend's primitives inside `RLSCSinglePassFunction`. The backends import
nothing from here: the arrows run function -> driver / plan -> backends -> kernels.

Defaults only on proven paths: path="auto" takes the single pass on the devices in
`SINGLE_PASS_DEFAULT_DEVICES` (the CPU, where it is measured: benchmarks/results/). On CUDA the
single pass has not yet run on a GPU, so "auto" takes the two sweeps there and the single pass is
opt-in (path="single-pass") until a GPU record (benchmarks/gpu_check.sh) adds "cuda".
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..options import FusedOptions
from ..weighting import rlsc_weights
from . import driver
from .plan import DEFAULT_BUFFER_BYTES, Chunk, Weigh, plan

PATHS = ("auto", "single-pass", "two-sweep")

#: Device types on which path="auto" takes the single pass (measured there, correct and faster).
SINGLE_PASS_DEFAULT_DEVICES = ("cpu",)


def auto_takes_single_pass(device: torch.device) -> bool:
    """Whether path="auto" tries the single pass on `device` (see SINGLE_PASS_DEFAULT_DEVICES)."""
    return torch.device(device).type in SINGLE_PASS_DEFAULT_DEVICES


def single_pass_backend(name: str):
    """The module serving the single pass's primitives for a resolved backend name, or None."""
    try:
        if name == "torch":
            from ..backends import torch_single_pass as module
        elif name == "native":
            from ..backends import native as module
        elif name == "triton":
            from ..backends import triton_single_pass as module
        else:
            return None
    except ImportError:
        return None
    return module if hasattr(module, "SinglePassOps") else None


def rlsc_single_pass(backend, hidden, weight, bias, targets, seq, chunks, weigh: Weigh, opts: FusedOptions, needs,
                     **ops_kwargs) -> driver.SinglePassResult:
    """The single pass without autograd (tests, benchmarks): `backend` a name or a backend
    module, chunks from plan.plan / plan_chunks. Gradients are for grad_output = 1."""
    module = single_pass_backend(backend) if isinstance(backend, str) else backend
    if module is None:
        raise ValueError(f"backend {backend!r} has no single-pass implementation")
    return driver.run(module, hidden, weight, bias, targets, seq, chunks, weigh, opts, needs, **ops_kwargs)


class _Call:
    """Everything about one call that is not a tensor input: travels through autograd as one object."""

    def __init__(self, opts, backend, two_sweep, chunks, weigh, needs):
        self.opts: FusedOptions = opts
        self.backend = backend
        self.two_sweep = two_sweep
        self.chunks: List[Chunk] = chunks
        self.weigh: Weigh = weigh
        self.needs: Tuple[bool, bool, bool] = needs


class RLSCSinglePassFunction(torch.autograd.Function):
    """(hidden, weight, bias, targets, seq, call) -> (loss, token_logp, seq_logp, seq_weight, token_entropy).

    Forward computes the loss gradients along with the loss (for grad_output = 1, float32) and
    saves them; backward multiplies them by grad_output in float32 and rounds to the input dtype
    once, at the very end (a GradScaler scale of 2^16 is inf in fp16, so nothing 16-bit is formed
    before it is applied). Upstream gradients on token_logp / seq_logp / token_entropy (a caller
    differentiating those outputs too) go through the backend's two-sweep backward with the saved
    lse / mean_z. seq_weight is not differentiable; token_entropy is an empty non-differentiable
    tensor without return_entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq, call: _Call):
        ctx.set_materialize_grads(False)
        res = driver.run(call.backend, hidden, weight, bias, targets, seq, call.chunks, call.weigh, call.opts,
                         call.needs)
        loss = call.weigh.loss(res.seq_logp, res.seq_weight)
        ctx.call = call
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, targets, seq, res.lse, res.mean_z,
                              res.dhidden, res.dweight, res.dbias)
        ctx.mark_non_differentiable(res.seq_weight)
        entropy = res.token_entropy
        if entropy is None:
            entropy = res.token_logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        return loss, res.token_logp, res.seq_logp, res.seq_weight, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_token_logp, grad_seq_logp, _grad_seq_weight, grad_entropy):
        hidden, weight, bias, targets, seq, lse, mean_z, dh, dw, db = ctx.saved_tensors
        call: _Call = ctx.call
        opts = call.opts
        inputs = (hidden, weight, bias)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        # Extra upstream gradients: per-token g_t = dL/dlogp_t (+ dL/dL_s(t)), e_t = dL/dentropy_t.
        extra = (None, None, None)
        g_tok = grad_token_logp
        if grad_seq_logp is not None:
            g_seq = grad_seq_logp[seq]
            g_tok = g_seq if g_tok is None else g_tok + g_seq
        e_tok = grad_entropy if (opts.return_entropy and grad_entropy is not None and grad_entropy.numel()) else None
        if (g_tok is not None or e_tok is not None) and any(needs):
            valid = targets != opts.ignore_index
            zero = lambda x: None if x is None else torch.where(valid, x, x.new_zeros(()))  # noqa: E731
            extra = call.two_sweep.backward(hidden, weight, bias, targets, (lse, mean_z), zero(g_tok), zero(e_tok),
                                            opts, needs)
        grads = [None, None, None]
        for i, (g, need) in enumerate(zip((dh, dw, db), needs)):
            if not need:
                continue
            x, e = inputs[i], extra[i]
            if grad_loss is not None and g is not None:
                scale = grad_loss.to(g.dtype)  # g is float32 (float64): grad_output applied in that type
                if e is None and g.dtype == x.dtype and g.device.type == "cpu" and scale.item() == 1.0:
                    # loss.backward() on CPU (no device to sync with): the saved gradient as it is,
                    # no W-sized pass; autograd takes it over (saved tensors are released first)
                    grads[i] = g
                elif e is None:
                    grads[i] = torch.mul(g, scale, out=torch.empty(g.shape, dtype=x.dtype, device=g.device))
                else:
                    grads[i] = (torch.mul(g, scale).add_(e.to(g.dtype))).to(x.dtype)
            elif e is not None:
                grads[i] = e.to(x.dtype)
        return grads[0], grads[1], grads[2], None, None, None


def _sort_and_count(seq: torch.Tensor, n_seqs: int):
    """(tokens per sequence as a list, whether seq is sorted): one host sync for both."""
    counts = torch.bincount(seq, minlength=n_seqs)
    unsorted = (seq[1:] < seq[:-1]).any().long().reshape(1) if seq.numel() > 1 else counts.new_zeros(1)
    host = torch.cat([counts, unsorted]).tolist()
    return host[:-1], not host[-1]


def rlsc_loss_single_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    seq: torch.Tensor,
    n_seqs: int,
    *,
    opts: FusedOptions,
    weighting,
    alpha: float,
    reduction: str,
    backend_name: str,
    two_sweep,
    path: str,
):
    """The RLSC loss over packed tokens (hidden [N, D], targets [N], seq [N] in [0, n_seqs)) by
    the single pass, as (loss, token_logp [N], seq_logp [S], seq_weight [S], token_entropy [N] or
    None); or None where the single pass does not apply and path == "auto" (path "single-pass"
    raises ValueError saying why). Needs one host sync (the tokens per sequence) for the plan.
    Every sequence length is served: sequences longer than the chunk budget are split (plan.py).
    """

    def refuse(reason: str):
        if path == "single-pass":
            raise ValueError(f"path='single-pass' cannot serve this call: {reason}; use path='auto' or 'two-sweep'")
        return None

    module = single_pass_backend(backend_name)
    if module is None:
        return refuse(f"backend {backend_name!r} has no single-pass implementation")
    if getattr(opts, "softcap", None) is not None:
        return refuse("softcap is not supported by the single pass yet")
    buffer_bytes = getattr(opts, "buffer_bytes", None)
    if buffer_bytes is None:
        buffer_bytes = getattr(module, "BUFFER_BYTES", DEFAULT_BUFFER_BYTES)
    counts, is_sorted = _sort_and_count(seq, n_seqs)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    the_plan = plan(counts, weight.shape[0], weight.shape[1], hidden.dtype, buffer_bytes, needs[1] or needs[2])
    if not is_sorted:
        # Group each sequence's tokens together; gathering hidden is differentiable, and the
        # per-token outputs are put back in the caller's order below.
        order = torch.sort(seq, stable=True).indices
        hidden, targets, seq = hidden[order], targets[order], seq[order]
    weigh = Weigh(weighting, alpha, reduction, n_seqs)
    call = _Call(opts, module, two_sweep, the_plan.chunks, weigh, needs)
    loss, token_logp, seq_logp, seq_weight, entropy = RLSCSinglePassFunction.apply(
        hidden, weight, bias, targets, seq, call
    )
    if not opts.return_entropy:
        entropy = None
    if not is_sorted:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        token_logp = token_logp[inverse]
        entropy = entropy[inverse] if entropy is not None else None
    return loss, token_logp, seq_logp, seq_weight, entropy


def check_path(path) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


def maybe_single_pass(hidden, weight, bias, targets, seq, n_seqs, *, opts, weighting, alpha, reduction, backend, path):
    """linear_rlsc_loss's dispatch: the single pass's (loss, token_logp, seq_logp, seq_weight,
    token_entropy) where `path`, `backend` and the device allow it, or None for the two-sweep path.
    Inputs are the packed tokens after selection and checks."""
    check_path(path)
    if path == "two-sweep" or (path == "auto" and not auto_takes_single_pass(hidden.device)):
        return None
    from .. import backends

    name = backends.resolve(backend, hidden)
    if name == "reference":
        if path == "single-pass":
            raise ValueError("path='single-pass' cannot serve backend='reference' (the naive full-logits oracle)")
        return None
    if isinstance(weighting, torch.Tensor):
        rlsc_weights(torch.zeros(n_seqs, device=hidden.device), None, weighting)  # shape/dtype/device errors now
    return rlsc_loss_single_pass(
        hidden, weight, bias, targets, seq, n_seqs, opts=opts, weighting=weighting, alpha=alpha,
        reduction=reduction, backend_name=name, two_sweep=backends.get(name), path=path,
    )
