"""The same work done by each implementation the comparison covers.

Two ops, both at temperature T on a packed batch (hidden [N, D], weight [V, D], targets [N],
seq_index [N] with S equal-length sequences):

- logprobs_fwd(inp) -> float32 log-probs [N], no grad (what a trainer needs for p_old / logging);
- rlsc_fwd_bwd(inp, hidden, weight) -> (loss, dH, dW): the RLSC loss with alpha = 0.1,
    L_s = sum_{t in s} log_softmax(h_t W^T / T)[y_t],   w_s = exp(L_s) + alpha (detached),
    loss = -sum_s w_s L_s / S,
  forward and backward to dH [N, D] and dW [V, D].

How the peers express the weighted RLSC loss (they have no sequence weights of their own):

- cce (Cut Cross-Entropy): `linear_cross_entropy(hidden / T, W, targets, reduction="none")` is
  -logp per token (CCE has no temperature; T = 0.5 is a power of two, so hidden / T is exact in
  bf16). The weights need L_s first, so a no-grad pass computes them, then
  loss = sum_t w_{s(t)} * nll_t / S is differentiated (CCE's reduction="none" takes a per-token
  grad_output). Default filtering (filter_eps="high" = bf16 eps / 32).
- liger (Liger-Kernel 0.8.x): its chunked GRPO loss `LigerFusedLinearGRPOLoss(beta=0,
  use_ref_model=False, loss_type="dapo", temperature=T)` with no old log-probs: the importance
  ratio is exp(logp - logp.detach()) = 1, so its gradient is -sum_t A_{s(t)} grad logp_t / N_tok;
  with advantages A_s = w_s * N_tok / S that is exactly the RLSC gradient. The weights come
  from a no-grad pass of Liger's own chunked selective log-prob (`LigerFusedLinearPPOBase.
  chunk_forward`, the op its GRPO loss uses), which is also its `logprobs_fwd`. Liger's loss
  *value* is the GRPO surrogate, not -sum w L / S; the loss we report for it is computed from
  the no-grad log-probs.
- torch-linear-ce: torch.nn.functional.linear_cross_entropy (torch >= 2.13) with
  reduction="none" and the chunked path (options=LinearCrossEntropyOptions()), hidden / T, same
  two-pass scheme as cce.
- torch-naive: the paper's Algorithm 1: full bf16 logits, log_softmax in fp32, gather.
- torch-chunked / torch-compile: two vocabulary sweeps by token chunks in PyTorch (a custom
  autograd.Function that saves only lse and recomputes each chunk's logits in backward), eager /
  with each chunk's forward and backward compiled by torch.compile.
- rlsc-triton / rlsc-triton-exact: ours (filter_eps="auto" / None); rlsc-torch: ours, torch backend.
- matmul-floor: one GEMM hidden @ W^T of the logits' shape (logprobs_fwd only): the floor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .inputs import ALPHA, HeadInputs

OPS = ("logprobs_fwd", "rlsc_fwd_bwd")


# ----------------------------------------------------------------------------------------------
# shared pieces


def rlsc_loss_from_token_logp(token_logp: torch.Tensor, seq_index: torch.Tensor, n_seqs: int, alpha: float = ALPHA):
    """-sum_s w_s L_s / S with w_s = exp(L_s) + alpha detached (in float64, L clamped <= 0)."""
    L = torch.zeros(n_seqs, dtype=token_logp.dtype, device=token_logp.device).index_add(0, seq_index, token_logp)
    w = (torch.exp(L.detach().double().clamp(max=0.0)) + alpha).to(L.dtype)
    return -(w * L).sum() / n_seqs


def seq_weights(token_logp: torch.Tensor, seq_index: torch.Tensor, n_seqs: int, alpha: float = ALPHA) -> torch.Tensor:
    """w_s [S] float32 from detached token log-probs."""
    L = torch.zeros(n_seqs, dtype=torch.float64, device=token_logp.device).index_add(0, seq_index, token_logp.double())
    return (torch.exp(L.clamp(max=0.0)) + alpha).float()


def _grads(loss, hidden, weight):
    dH, dW = torch.autograd.grad(loss, [hidden, weight])
    return loss.detach(), dH, dW


# ----------------------------------------------------------------------------------------------
# float64 reference


def reference_logprobs(inp: HeadInputs) -> torch.Tensor:
    z = (inp.hidden.double() @ inp.weight.double().T) / inp.temperature
    return torch.log_softmax(z, -1).gather(1, inp.targets[:, None])[:, 0]


def reference_fwd_bwd(inp: HeadInputs):
    h = inp.hidden.double().requires_grad_()
    W = inp.weight.double().requires_grad_()
    z = (h @ W.T) / inp.temperature
    logp = torch.log_softmax(z, -1).gather(1, inp.targets[:, None])[:, 0]
    return _grads(rlsc_loss_from_token_logp(logp, inp.seq_index, inp.n_seqs), h, W)


# ----------------------------------------------------------------------------------------------
# torch-naive (Algorithm 1)


def naive_logprobs(inp: HeadInputs, hidden=None, weight=None):
    hidden = inp.hidden if hidden is None else hidden
    weight = inp.weight if weight is None else weight
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float() / inp.temperature, -1).gather(1, inp.targets[:, None])[:, 0]


def naive_fwd_bwd(inp: HeadInputs, hidden, weight):
    logp = naive_logprobs(inp, hidden, weight)
    return _grads(rlsc_loss_from_token_logp(logp, inp.seq_index, inp.n_seqs), hidden, weight)


# ----------------------------------------------------------------------------------------------
# torch-chunked and torch-compile: two sweeps by token chunks


def _chunk_tokens(V: int) -> int:
    """Token chunk whose fp32 logits take about 1 GB (a power of two, 256..8192)."""
    c = max(256, min(8192, (1 << 28) // V))
    return 1 << (c.bit_length() - 1)


def _fwd_chunk(h, W, y, inv_t: float):
    z = (h @ W.T).float() * inv_t
    lse = torch.logsumexp(z, -1)
    return z.gather(1, y[:, None])[:, 0] - lse, lse


def _bwd_chunk(h, W, y, lse, g, inv_t: float):
    """dz = g_t (onehot - softmax) / T for d(sum_t g_t logp_t); returns dH chunk, dW contribution (fp32)."""
    z = (h @ W.T).float() * inv_t
    dz = torch.exp(z - lse[:, None]) * (-g[:, None])
    dz.scatter_add_(1, y[:, None], g[:, None])
    dz = (dz * inv_t).to(h.dtype)
    return dz @ W, (dz.T @ h).float()


_compiled = {}


def _chunk_fns(compiled: bool):
    if not compiled:
        return _fwd_chunk, _bwd_chunk
    if not _compiled:
        _compiled["fwd"] = torch.compile(_fwd_chunk, dynamic=False)
        _compiled["bwd"] = torch.compile(_bwd_chunk, dynamic=False)
    return _compiled["fwd"], _compiled["bwd"]


class ChunkedLogprobs(torch.autograd.Function):
    """logp [N] from hidden [N, D], weight [V, D]; saves only lse [N]; backward recomputes logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, compiled: bool):
        fwd, _ = _chunk_fns(compiled)
        C = _chunk_tokens(weight.shape[0])
        inv_t = 1.0 / temperature
        parts = [fwd(hidden[s : s + C], weight, targets[s : s + C], inv_t) for s in range(0, hidden.shape[0], C)]
        logp = torch.cat([p[0] for p in parts])
        lse = torch.cat([p[1] for p in parts])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.compiled = temperature, compiled
        return logp

    @staticmethod
    def backward(ctx, g):
        hidden, weight, targets, lse = ctx.saved_tensors
        _, bwd = _chunk_fns(ctx.compiled)
        C = _chunk_tokens(weight.shape[0])
        inv_t = 1.0 / ctx.temperature
        g = g.float().contiguous()
        dH = torch.empty_like(hidden)
        dW = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], C):
            dH[s : s + C], dW_part = bwd(hidden[s : s + C], weight, targets[s : s + C], lse[s : s + C], g[s : s + C], inv_t)
            dW += dW_part
        return dH, dW.to(weight.dtype), None, None, None


def chunked_logprobs(inp: HeadInputs, compiled=False):
    return ChunkedLogprobs.apply(inp.hidden, inp.weight, inp.targets, inp.temperature, compiled)


def chunked_fwd_bwd(inp: HeadInputs, hidden, weight, compiled=False):
    logp = ChunkedLogprobs.apply(hidden, weight, inp.targets, inp.temperature, compiled)
    return _grads(rlsc_loss_from_token_logp(logp, inp.seq_index, inp.n_seqs), hidden, weight)


# ----------------------------------------------------------------------------------------------
# Peers that give -logp per token (reduction="none"): two passes, weights from the first.


def _nll_two_pass(nll_fn, inp: HeadInputs, hidden, weight):
    with torch.no_grad():
        w = seq_weights(-nll_fn(hidden, weight).float(), inp.seq_index, inp.n_seqs)
    nll = nll_fn(hidden, weight).float()
    loss = (w[inp.seq_index] * nll).sum() / inp.n_seqs
    return _grads(loss, hidden, weight)


def _cce_nll(inp: HeadInputs):
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, W: linear_cross_entropy(h / inp.temperature, W, inp.targets, reduction="none")


def _linear_ce_nll(inp: HeadInputs):
    import torch.nn.functional as F

    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda h, W: F.linear_cross_entropy(h / inp.temperature, W, inp.targets, reduction="none", options=opts)


# ----------------------------------------------------------------------------------------------
# Liger-Kernel


def liger_logprobs(inp: HeadInputs, hidden=None, weight=None):
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    hidden = inp.hidden if hidden is None else hidden
    weight = inp.weight if weight is None else weight
    S, D = inp.n_seqs, hidden.shape[1]
    logp = LigerFusedLinearPPOBase.chunk_forward(
        hidden.reshape(S, -1, D), weight, inp.targets.reshape(S, -1), temperature=inp.temperature
    )
    return logp.reshape(-1)


_liger_losses = {}


def liger_fwd_bwd(inp: HeadInputs, hidden, weight):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    compiled = hidden.is_cuda  # Liger compiles its loss math; on CPU that only adds compile time
    key = (inp.temperature, compiled)
    if key not in _liger_losses:
        _liger_losses[key] = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, loss_type="dapo", temperature=inp.temperature, compiled=compiled
        )
    loss_fn = _liger_losses[key]
    S, N, D = inp.n_seqs, hidden.shape[0], hidden.shape[1]
    with torch.no_grad():
        logp = liger_logprobs(inp, hidden, weight)
        w = seq_weights(logp, inp.seq_index, S)
        loss_value = -(w.double() * torch.zeros(S, dtype=torch.float64, device=w.device).index_add(
            0, inp.seq_index, logp.double())).sum() / S
    advantages = w * (N / S)  # dapo divides by the token count; RLSC by the sequence count
    mask = torch.ones(S, N // S, dtype=torch.long, device=hidden.device)
    surrogate, _metrics = loss_fn(hidden.reshape(S, -1, D), weight, inp.targets.reshape(S, -1), mask, advantages)
    _, dH, dW = _grads(surrogate, hidden, weight)
    return loss_value.float(), dH, dW


# ----------------------------------------------------------------------------------------------
# ours


def _rk():
    import rlsc_kernels as rk

    return rk


def rk_logprobs(inp: HeadInputs, backend: str, filter_eps="auto"):
    return _rk().linear_logprobs(inp.hidden, inp.weight, inp.targets, temperature=inp.temperature,
                                 filter_eps=filter_eps, backend=backend)


def rk_fwd_bwd(inp: HeadInputs, hidden, weight, backend: str, filter_eps="auto"):
    out = _rk().linear_rlsc_loss(hidden, weight, inp.targets, seq_index=inp.seq_index, temperature=inp.temperature,
                                 alpha=ALPHA, reduction="mean", filter_eps=filter_eps, backend=backend)
    return _grads(out.loss, hidden, weight)


# ----------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Impl:
    """One implementation: how it runs each op, and why it cannot run here (None if it can)."""

    name: str
    logprobs: Optional[Callable] = None  # (inp) -> logp [N] float32 (or any tensor for matmul-floor)
    fwd_bwd: Optional[Callable] = None  # (inp, hidden, weight) -> (loss, dH, dW)
    needs_cuda: bool = False
    check: Optional[Callable[[], Optional[str]]] = None  # returns a reason it is unavailable, or None

    def fn(self, op: str):
        return self.logprobs if op == "logprobs_fwd" else self.fwd_bwd

    def unavailable(self, op: str, device: torch.device) -> Optional[str]:
        if self.fn(op) is None:
            return f"{self.name} does not implement {op}"
        if self.needs_cuda and device.type != "cuda":
            return f"{self.name} needs a CUDA device"
        return self.check() if self.check is not None else None


def _importable(module: str, what: str):
    def check():
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - any import failure makes the row unavailable
            return f"{what} not importable: {type(e).__name__}: {e}"[:300]
        return None

    return check


def _has_linear_ce():
    import torch.nn.functional as F

    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (needs >= 2.13)"
    return None


IMPLS = {
    i.name: i
    for i in [
        Impl("rlsc-triton", lambda inp: rk_logprobs(inp, "triton"),
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "triton"), needs_cuda=True, check=_importable("rlsc_kernels", "rlsc_kernels")),
        Impl("rlsc-triton-exact", lambda inp: rk_logprobs(inp, "triton", None),
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "triton", None), needs_cuda=True, check=_importable("rlsc_kernels", "rlsc_kernels")),
        Impl("rlsc-torch", lambda inp: rk_logprobs(inp, "torch", None),
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "torch", None), check=_importable("rlsc_kernels", "rlsc_kernels")),
        Impl("cce", lambda inp: -_cce_nll(inp)(inp.hidden, inp.weight).float(),
             lambda inp, h, W: _nll_two_pass(_cce_nll(inp), inp, h, W), needs_cuda=True,
             check=_importable("cut_cross_entropy", "cut-cross-entropy")),
        Impl("liger", liger_logprobs, liger_fwd_bwd, check=_importable("liger_kernel.chunked_loss", "liger-kernel")),
        Impl("torch-naive", naive_logprobs, naive_fwd_bwd),
        Impl("torch-chunked", chunked_logprobs, chunked_fwd_bwd),
        Impl("torch-compile", lambda inp: chunked_logprobs(inp, compiled=True),
             lambda inp, h, W: chunked_fwd_bwd(inp, h, W, compiled=True)),
        Impl("torch-linear-ce", lambda inp: -_linear_ce_nll(inp)(inp.hidden, inp.weight).float(),
             lambda inp, h, W: _nll_two_pass(_linear_ce_nll(inp), inp, h, W), check=_has_linear_ce),
        Impl("matmul-floor", lambda inp: inp.hidden @ inp.weight.T, None),
    ]
}

#: The impls whose rows matter most (they come first in the comparison's order).
CORE_IMPLS = ("rlsc-triton", "matmul-floor", "cce", "liger", "torch-naive")
EXTRA_IMPLS = ("rlsc-triton-exact", "torch-chunked", "torch-linear-ce", "rlsc-torch", "torch-compile")
#: Impls whose warm-up (compilation per shape) costs tens of seconds: they run after all the others.
LATE_IMPLS = ("torch-compile",)


def max_rel_err(x: torch.Tensor, ref: torch.Tensor, rows_per_chunk: int = 8192) -> float:
    """Normwise max relative error max|x - ref| / max|ref| (elementwise ratios blow up near zero).

    ref may live on another device (the comparison keeps its float64 references on the CPU so they
    take no GPU memory): it is moved over in row chunks.
    """
    x = x.detach().reshape(ref.shape)
    if ref.dim() == 0:
        x, ref = x.reshape(1), ref.reshape(1)
    diff = torch.zeros((), dtype=torch.float64, device=x.device)
    scale = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, ref.shape[0], rows_per_chunk):
        r = ref[s : s + rows_per_chunk].to(x.device, torch.float64)
        diff = torch.maximum(diff, (x[s : s + rows_per_chunk].double() - r).abs().max())
        scale = torch.maximum(scale, r.abs().max())
    return float(diff / scale) if float(scale) > 0 else float(diff)


__all__ = ["IMPLS", "CORE_IMPLS", "EXTRA_IMPLS", "OPS", "Impl", "max_rel_err", "reference_logprobs",
           "reference_fwd_bwd", "rlsc_loss_from_token_logp", "seq_weights", "math"]
