"""The single-pass RLSC loss: three GEMMs per chunk of whole sequences instead of five.

The RLSC weight w_s is a detached function of its own sequence's L_s alone. Once a chunk holds
whole sequences, every token's upstream gradient g_t = dLoss/dL_s(t) = -w_s (/ S for "mean") is
known as soon as the chunk's forward is done, so a backend can
    z = (h W^T + b) / T          one GEMM, held for the chunk only
    lse, logp, L_s, w_s          from z (fp32 statistics)
    dz = g_t ([v = y_t] - p) / T  in place of z
    dH = dz W,  dW += dz^T h      two GEMMs (dW accumulated in fp32 over the chunks)
and the autograd backward only scales these gradients by the scalar grad_output.

This module is the framework every backend plugs into:
- `plan_chunks` groups sequences into chunks that fit the buffer budget;
- `Weigh` turns a chunk's L_s into (w_s, dLoss/dL_s) for every weighting and reduction;
- `RLSCSinglePassFunction` is the autograd boundary;
- `rlsc_loss_single_pass` is what `linear_rlsc_loss(path=...)` calls.

Backend contract (torch: backends/torch_single_pass.py, native: backends/native.py, triton:
backends/triton_single_pass.py):

    rlsc_single_pass(hidden, weight, bias, targets, seq, chunks, weigh, opts, needs) -> SinglePassResult

hidden [N, D] (input dtype), weight [V, D], bias [V] or None, targets [N] int64 (== ignore_index:
no score, logp 0), seq [N] int64 sorted ascending, ids in [0, S). chunks: list of (t0, t1, s0, s1)
Python ints: tokens [t0, t1) are exactly those of sequences [s0, s1). weigh(seq_logp [s1-s0] fp32,
n_tokens [s1-s0] int64) -> (seq_weight [s1-s0] fp32, coef [s1-s0] fp32), called once per chunk
in chunk order (or with s0=... given). needs = (need_dhidden, need_dweight, need_dbias).

Where it does not apply (a sequence longer than the budget, a backend without a single pass,
softcap) path="auto" takes the two-sweep path and path="single-pass" raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch

from .options import FusedOptions
from .reference import output_dtype
from .weighting import rlsc_weights

PATHS = ("auto", "single-pass", "two-sweep")

#: Default budget for the logits block of one chunk (bytes), used when neither the caller
#: (buffer_bytes) nor the backend (its BUFFER_BYTES) sets one: 128 MB, the size of the torch
#: backend's two-sweep logits block.
DEFAULT_BUFFER_BYTES = 1 << 27

Chunk = Tuple[int, int, int, int]


@dataclass
class SinglePassResult:
    """What a backend's rlsc_single_pass returns; gradients are those of the loss for grad_output = 1.

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


class Weigh:
    """weigh(seq_logp [k], n_tokens [k], s0=None) -> (seq_weight [k] fp32 detached, coef [k] fp32).

    coef = dLoss/dL_s for grad_output = 1: -w_s, divided by max(S, 1) for reduction "mean", in
    seq_logp's dtype (fp32; fp64 for the fp64 oracle). Sequences
    are identified by position: a call without s0 covers the k sequences after the previous
    call's (so backends that call it once per chunk, in chunk order, need not pass s0).
    External weights (a tensor [S]) are sliced accordingly.
    """

    def __init__(self, weighting: Union[str, torch.Tensor], alpha: float, reduction: str, n_seqs: int):
        self.weighting = weighting
        self.alpha = alpha
        self.scale = 1.0 / max(n_seqs, 1) if reduction == "mean" else 1.0
        self.n_seqs = n_seqs
        self._next = 0

    def __call__(self, seq_logp: torch.Tensor, n_tokens: torch.Tensor, s0: Optional[int] = None):
        k = seq_logp.shape[0]
        s0 = self._next if s0 is None else int(s0)
        if s0 < 0 or s0 + k > self.n_seqs:
            raise RuntimeError(f"weigh called for sequences [{s0}, {s0 + k}) outside [0, {self.n_seqs})")
        self._next = s0 + k
        weighting = self.weighting
        if isinstance(weighting, torch.Tensor):
            weighting = weighting[s0:s0 + k]
        seq_weight = rlsc_weights(seq_logp, n_tokens, weighting, self.alpha)
        return seq_weight, seq_weight.to(seq_logp.dtype) * (-self.scale)

    def loss(self, seq_logp: torch.Tensor, seq_weight: torch.Tensor) -> torch.Tensor:
        return -(seq_weight.to(seq_logp.dtype) * seq_logp).sum() * self.scale


def budget_rows(V: int, dtype: torch.dtype, buffer_bytes: int) -> int:
    """Tokens whose [tokens x V] logits (fp32, fp64 for fp64 inputs) fit in buffer_bytes."""
    itemsize = torch.empty((), dtype=output_dtype(dtype)).element_size()
    return max(1, buffer_bytes // (V * itemsize))


def plan_chunks(counts: List[int], max_rows: int) -> Optional[List[Chunk]]:
    """Chunks (t0, t1, s0, s1) of whole consecutive sequences, each of at most max_rows tokens,
    for sequences of `counts` tokens laid out in order; None if one sequence alone is longer.
    Sequences of 0 tokens join whichever chunk they fall in."""
    chunks: List[Chunk] = []
    t0 = s0 = t = 0
    for s, n in enumerate(counts):
        if n > max_rows:
            return None
        if t + n - t0 > max_rows:
            chunks.append((t0, t, s0, s))
            t0, s0 = t, s
        t += n
    chunks.append((t0, t, s0, len(counts)))
    return chunks


def single_pass_backend(name: str):
    """The module serving rlsc_single_pass for a resolved backend name, or None if it has none."""
    try:
        if name == "torch":
            from .backends import torch_single_pass as module
        elif name == "native":
            from .backends import native as module
        elif name == "triton":
            from .backends import triton_single_pass as module
        else:
            return None
    except ImportError:
        return None
    return module if hasattr(module, "rlsc_single_pass") else None


class _Call:
    """Everything about one call that is not a tensor input: travels through autograd as one object."""

    def __init__(self, opts, backend, two_sweep, chunks, weigh, n_seqs, needs):
        self.opts: FusedOptions = opts
        self.backend = backend
        self.two_sweep = two_sweep
        self.chunks: List[Chunk] = chunks
        self.weigh: Weigh = weigh
        self.n_seqs: int = n_seqs
        self.needs: Tuple[bool, bool, bool] = needs


class RLSCSinglePassFunction(torch.autograd.Function):
    """(hidden, weight, bias, targets, seq, call) -> (loss, token_logp, seq_logp, seq_weight, token_entropy).

    Forward computes the loss gradients along with the loss (for grad_output = 1) and saves them;
    backward scales them by grad_output. Upstream gradients on token_logp / seq_logp /
    token_entropy (a caller differentiating those outputs too) go through the backend's
    two-sweep backward with the saved lse / mean_z. seq_weight is not differentiable;
    token_entropy is an empty non-differentiable tensor without return_entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq, call: _Call):
        ctx.set_materialize_grads(False)
        res: SinglePassResult = call.backend.rlsc_single_pass(
            hidden, weight, bias, targets, seq, call.chunks, call.weigh, call.opts, call.needs
        )
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
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        grads = [None, None, None]
        if grad_loss is not None:
            for i, (g, need) in enumerate(zip((dh, dw, db), needs)):
                if need and g is not None:
                    grads[i] = g * grad_loss.to(g.dtype)
        # Extra upstream gradients: per-token g_t = dL/dlogp_t (+ dL/dL_s(t)), e_t = dL/dentropy_t.
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
            for i, (g, need) in enumerate(zip(extra, needs)):
                if need and g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g.to(grads[i].dtype)
        for i, x in enumerate((hidden, weight, bias)):
            if grads[i] is not None:
                grads[i] = grads[i].to(x.dtype)
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
    max_rows = budget_rows(weight.shape[0], hidden.dtype, buffer_bytes)
    counts, is_sorted = _sort_and_count(seq, n_seqs)
    chunks = plan_chunks(counts, max_rows)
    if chunks is None:
        return refuse(
            f"a sequence has {max(counts)} tokens, more than the {max_rows} whose logits fit "
            f"buffer_bytes={buffer_bytes} (raise buffer_bytes)"
        )
    if not is_sorted:
        # Group each sequence's tokens together; gathering hidden is differentiable, and the
        # per-token outputs are put back in the caller's order below.
        order = torch.sort(seq, stable=True).indices
        hidden, targets, seq = hidden[order], targets[order], seq[order]
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    weigh = Weigh(weighting, alpha, reduction, n_seqs)
    call = _Call(opts, module, two_sweep, chunks, weigh, n_seqs, needs)
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
    token_entropy) where `path` and `backend` allow it, or None for the two-sweep path.
    Inputs are the packed tokens after selection and checks."""
    check_path(path)
    if path == "two-sweep":
        return None
    from . import backends

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
