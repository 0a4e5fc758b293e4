"""The same work done by each implementation the comparison covers.

Two ops, both at temperature T on a packed batch (hidden [N, D], weight [V, D], targets [N],
seq_index [N] with S equal-length sequences):

- logprobs_fwd(inp) -> float32 log-probs [N], no grad (what a trainer needs for p_old / logging);
- rlsc_fwd_bwd(inp, hidden, weight) -> (loss, dH, dW): the RLSC loss with alpha = 0.1,
    L_s = sum_{t in s} log_softmax(h_t W^T / T)[y_t],   w_s = exp(L_s) + alpha (detached),
    loss = -sum_s w_s L_s / S,
  forward and backward to dH [N, D] and dW [V, D].

How the peers express the weighted RLSC loss (they have no sequence weights of their own), each
in its best form. A peer whose per-token output (-logp, reduction="none") is differentiable needs
no extra pass: w_s = weight(L_s) are the *detached* values of the same forward, and
loss = sum_t w_{s(t)} * nll_t / S is differentiated once (one forward, one backward):

- cce (Cut Cross-Entropy): `linear_cross_entropy(hidden / T, W, targets, reduction="none")`
  (CCE has no temperature; T = 0.5 is a power of two, so hidden / T is exact in bf16). Default
  filtering (filter_eps="high" = bf16 eps / 32).
- torch-linear-ce: torch.nn.functional.linear_cross_entropy (torch >= 2.13), reduction="none",
  chunked path (options=LinearCrossEntropyOptions()), hidden / T.
- trl: TRL 1.16's fused LM head, `trl.kernels.ChunkedLogProbFunction.apply(hidden, W, None,
  targets, T, 32768, None, 1.0, ())` exactly as `add_fused_lm_head` calls it (vocab chunks of
  32768, log-probs only): cuBLAS tiles folded by a Triton kernel on CUDA, torch ops elsewhere;
  dW accumulated in fp32. What every TRL (GRPOTrainer) user gets by default.
- liger-scaled-ce: Liger 0.8.5 `LigerFusedLinearScaledCrossEntropyFunction.apply(hidden, W,
  targets, temperature=T)`: per-token NLL with temperature. On sm_90 it dispatches to a CuTe
  DSL kernel that needs nvidia-cutlass-dsl; where that does not import, its own 512-token
  PyTorch path runs (the row's code_path says which).
- liger (Liger's GRPO loss): `LigerFusedLinearGRPOLoss(beta=0, use_ref_model=False,
  loss_type="dapo", temperature=T)` with no old log-probs: the importance ratio
  exp(logp - logp.detach()) = 1, so its gradient is -sum_t A_{s(t)} grad logp_t / N_tok; with
  advantages A_s = w_s * N_tok / S that is exactly the RLSC gradient. Its surrogate output does
  not give L_s, so the weights need a no-grad pass of Liger's own chunked selective log-prob
  (`LigerFusedLinearPPOBase.chunk_forward`, the op its GRPO loss uses, also its `logprobs_fwd`)
  before the weighted pass: two passes is its best form. Liger's loss *value* is the GRPO
  surrogate, so the loss we report for it is computed from the no-grad log-probs. Liger
  compiles its loss math with torch.compile on CUDA; each new shape is compiled statically
  (Dynamo's automatic dynamic shapes failed at the headline shape with "sources must not be
  empty for symbol s10" after the reference slice's shape, see run_liger_grpo).
- torch-naive: the paper's Algorithm 1: full bf16 logits, log_softmax in fp32, gather.
- torch-chunked / torch-compile: two vocabulary sweeps by token chunks in PyTorch (a custom
  autograd.Function that saves only lse and recomputes each chunk's logits in backward), eager /
  with each chunk's forward and backward compiled by torch.compile.
- ours: rlsc-triton (filter_eps="auto", path="auto"), rlsc-triton-exact (filter_eps=None),
  rlsc-triton-single-pass / rlsc-triton-two-sweep (path forced), rlsc-triton-filtered (two-sweep,
  block-sparse Triton matmuls, filter_eps = 2^-12: the filter where it skips work), rlsc-torch
  (torch backend).
- matmul-floor: one GEMM hidden @ W^T of the logits' shape (logprobs_fwd only): the floor.
- CPU rows of ours: rlsc-native (backend="native": the C++ single pass), rlsc-single-pass (torch
  backend, path="single-pass"), rlsc-torch-two-sweep (torch backend, path="two-sweep", the CPU
  default before the single pass); matmul-floor-3 (rlsc_fwd_bwd only): the single pass's three
  GEMMs alone, the floor of an exact fp32 single pass.

Every row records `code_path`: which implementation path the peer (or ours) actually took.
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
# Peers that give a differentiable -logp per token (reduction="none"): one forward, one backward.


def _nll_one_pass(nll_fn, inp: HeadInputs, hidden, weight):
    """loss = sum_t w_{s(t)} nll_t / S with w_s from the detached nll of the same forward."""
    nll = nll_fn(hidden, weight).float()
    w = seq_weights(-nll.detach(), inp.seq_index, inp.n_seqs)
    loss = (w[inp.seq_index] * nll).sum() / inp.n_seqs
    return _grads(loss, hidden, weight)


def _trl_nll(inp: HeadInputs):
    from trl.kernels import ChunkedLogProbFunction

    # as trl.trainer.utils.add_fused_lm_head calls it: vocab chunks of 32768, log-probs only
    return lambda h, W: -ChunkedLogProbFunction.apply(h, W, None, inp.targets, inp.temperature, 32768, None, 1.0, ())[0]


def _trl_path(inp: HeadInputs) -> str:
    from trl.kernels import chunked_logprob

    tiles = "Triton fold kernels" if chunked_logprob._use_triton(inp.hidden.device) else "torch ops"
    return f"trl.kernels.ChunkedLogProbFunction: cuBLAS [4096 x 32768] tiles + {tiles}, fp32 dW accumulation"


def _liger_scaled_ce_function(device):
    """(the autograd Function Liger dispatches to on this device, why it is not the dispatcher's choice or None).

    On sm_90 Liger picks a CuTe DSL kernel that needs nvidia-cutlass-dsl; where that does not
    import, its own PyTorch path (the one every other device gets) is the best that runs."""
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as m

    try:
        return m._resolve_implementation(device), None
    except ImportError as e:
        return m._FusedLinearPPOFallbackFunction, f"CuTe DSL kernel unavailable ({type(e).__name__}: {e})"[:200]


def _liger_scaled_ce_nll(inp: HeadInputs):
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as m

    fn, _ = _liger_scaled_ce_function(inp.hidden.device)
    if fn is m._FusedLinearPPOFallbackFunction:
        # the fallback's apply: (input, weight, target, temperature, ignore_index, return_entropy)
        return lambda h, W: fn.apply(h, W, inp.targets, inp.temperature, -100, False)
    return lambda h, W: m.LigerFusedLinearScaledCrossEntropyFunction.apply(h, W, inp.targets, temperature=inp.temperature)


def _liger_scaled_ce_path(inp: HeadInputs) -> str:
    fn, why = _liger_scaled_ce_function(inp.hidden.device)
    return f"liger {fn.__module__.split('.')[-1]}.{fn.__name__}" + (f" ({why})" if why else "")


def _cce_nll(inp: HeadInputs):
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, W: linear_cross_entropy(h / inp.temperature, W, inp.targets, reduction="none")


def _linear_ce_nll(inp: HeadInputs):
    import torch.nn.functional as F

    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda h, W: F.linear_cross_entropy(h / inp.temperature, W, inp.targets, reduction="none", options=opts)


def _single_nll(nll_fn):
    """logprobs_fwd of a -logp peer."""
    return lambda inp: -nll_fn(inp)(inp.hidden, inp.weight).float()


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
#: why Liger's compiled GRPO loss could not run here (then it runs uncompiled), per device type
_liger_compile_failed = {}


def _liger_grpo_loss(temperature: float, compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    key = (temperature, compiled)
    if key not in _liger_losses:
        _liger_losses[key] = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, loss_type="dapo", temperature=temperature, compiled=compiled
        )
    return _liger_losses[key]


def run_liger_grpo(inp: HeadInputs, hidden, weight, advantages, compiled: bool):
    """Liger's GRPO surrogate for advantages [S]. Compiled (Liger's default on CUDA), every shape
    is compiled statically: with automatic dynamic shapes, the second shape Dynamo saw (the
    headline batch after the 256-token reference slice) failed in Liger 0.8.5 / torch 2.11 with
    "AssertionError: sources must not be empty for symbol s10". If compilation still fails, the
    loss runs uncompiled and the row's code_path says so."""
    S, N, D = inp.n_seqs, hidden.shape[0], hidden.shape[1]
    mask = torch.ones(S, N // S, dtype=torch.long, device=hidden.device)
    args = (hidden.reshape(S, -1, D), weight, inp.targets.reshape(S, -1), mask, advantages)
    dev = hidden.device.type
    if compiled and dev not in _liger_compile_failed:
        try:
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=64):
                return _liger_grpo_loss(inp.temperature, True)(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: run the eager path instead
            _liger_compile_failed[dev] = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
    return _liger_grpo_loss(inp.temperature, False)(*args)


def liger_fwd_bwd(inp: HeadInputs, hidden, weight):
    compiled = hidden.is_cuda  # Liger compiles its loss math; on CPU that only adds compile time
    S, N = inp.n_seqs, hidden.shape[0]
    with torch.no_grad():
        logp = liger_logprobs(inp, hidden, weight)
        w = seq_weights(logp, inp.seq_index, S)
        loss_value = -(w.double() * torch.zeros(S, dtype=torch.float64, device=w.device).index_add(
            0, inp.seq_index, logp.double())).sum() / S
    advantages = w * (N / S)  # dapo divides by the token count; RLSC by the sequence count
    surrogate, _metrics = run_liger_grpo(inp, hidden, weight, advantages, compiled)
    _, dH, dW = _grads(surrogate, hidden, weight)
    return loss_value.float(), dH, dW


def _liger_path(inp: HeadInputs) -> str:
    base = "liger chunked_loss.LigerFusedLinearGRPOLoss (no-grad chunk_forward pass for the weights, then the loss)"
    if not inp.hidden.is_cuda:
        return base + ", eager"
    why = _liger_compile_failed.get(inp.hidden.device.type)
    return base + (f", eager: torch.compile failed ({why})" if why else ", torch.compile (static shapes)")


# ----------------------------------------------------------------------------------------------
# ours


def _rk():
    import rlsc_kernels as rk

    return rk


def rk_logprobs(inp: HeadInputs, backend: str, filter_eps="auto"):
    return _rk().linear_logprobs(inp.hidden, inp.weight, inp.targets, temperature=inp.temperature,
                                 filter_eps=filter_eps, backend=backend)


_rk_paths = {}  # (backend, path) -> the path the last call reported taking


def rk_fwd_bwd(inp: HeadInputs, hidden, weight, backend: str, filter_eps="auto", path: str = "auto", **options):
    extra = {} if path == "auto" else {"path": path}  # versions without the keyword serve "auto" only
    extra.update(options)
    out = _rk().linear_rlsc_loss(hidden, weight, inp.targets, seq_index=inp.seq_index, temperature=inp.temperature,
                                 alpha=ALPHA, reduction="mean", filter_eps=filter_eps, backend=backend, **extra)
    _rk_paths[(backend, path)] = getattr(out, "path", None)
    return _grads(out.loss, hidden, weight)


def three_gemms_fwd_bwd(inp: HeadInputs, hidden, weight):
    """The floor of an exact single pass: its three GEMMs alone (logits z = h W^T, dH = z W,
    dW += z^T h) over the chunks the native backend plans at its default budget, into reused
    buffers. Returns (0, dH, dW): the timing floor, not a loss."""
    from rlsc_kernels.backends import native
    from rlsc_kernels.single_pass import plan

    V, D = weight.shape
    counts = torch.bincount(inp.seq_index, minlength=inp.n_seqs).tolist()
    chunks = plan(counts, V, D, hidden.dtype, native.BUFFER_BYTES, True).chunks  # any length: whole or split
    with torch.no_grad():
        dH = torch.empty_like(hidden)
        dW = torch.zeros_like(weight)
        buf = torch.empty(max(c.t1 - c.t0 for c in chunks), V, dtype=hidden.dtype, device=hidden.device)
        for t0, t1, *_ in chunks:
            h, z = hidden[t0:t1], buf[: t1 - t0]
            torch.mm(h, weight.T, out=z)
            torch.mm(z, weight, out=dH[t0:t1])
            dW.addmm_(z.T, h)
    return torch.zeros((), device=hidden.device), dH, dW


def _native_check():
    why = _RK()
    if why is None:
        from rlsc_kernels.backends import native

        if not native.available():
            why = f"native extension not built: {native.unavailable_reason()}"
    return why


def _single_pass_gemms(inp: HeadInputs) -> str:
    from rlsc_kernels.backends.triton_single_pass import gemm_path

    return gemm_path(inp.hidden.device, inp.hidden.dtype)


def single_pass_buffer_bytes(inp: HeadInputs) -> int:
    """The Triton single pass's default budget (640 MiB: one 1024-token sequence at the 7B head),
    raised where one sequence's fp32 logits need more (16 x 3072 at the 7B head: 1.87 GB), so
    that the row measures the single pass rather than refusing; path "auto" keeps the default
    and takes the two-sweep path there."""
    seq_len = inp.N // inp.n_seqs
    return max(640 << 20, seq_len * inp.weight.shape[0] * 4)


def _rk_path(backend: str, filter_eps, path: str = "auto"):
    def describe(inp: HeadInputs) -> str:
        taken = _rk_paths.get((backend, path))
        text = f"rlsc_kernels backend={backend!r} path={path!r} filter_eps={filter_eps!r}"
        if taken:
            return text + f" -> took {taken!r}"
        if backend == "triton" and path == "auto":
            # the op does not report its path: apply the dispatch rule (defaults only on proven
            # paths: "auto" takes the single pass only on rlsc_kernels.single_pass.SINGLE_PASS_DEFAULT_DEVICES)
            from rlsc_kernels.single_pass import auto_takes_single_pass

            taken = "single-pass" if auto_takes_single_pass(inp.hidden.device) else "two-sweep"
            return text + f" -> {taken} (by the dispatch rule)"
        return text

    return describe


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
    code_path: Optional[Callable] = None  # (inp) -> which implementation path ran, after a run

    def fn(self, op: str):
        return self.logprobs if op == "logprobs_fwd" else self.fwd_bwd

    def unavailable(self, op: str, device: torch.device) -> Optional[str]:
        if self.fn(op) is None:
            return f"{self.name} does not implement {op}"
        if self.needs_cuda and device.type != "cuda":
            return f"{self.name} needs a CUDA device"
        return self.check() if self.check is not None else None

    def describe_path(self, inp) -> Optional[str]:
        if self.code_path is None:
            return None
        try:
            return self.code_path(inp)
        except Exception as e:  # noqa: BLE001 - the description must never fail a row
            return f"unknown ({type(e).__name__}: {e})"[:200]


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


def _fixed(text: str):
    return lambda inp: text


_RK = _importable("rlsc_kernels", "rlsc_kernels")
#: the filter threshold of filter_eps="auto" where it filters (bf16 eps / 32)
FILTER_EPS = 2.0**-7 / 32

IMPLS = {
    i.name: i
    for i in [
        Impl("rlsc-triton", lambda inp: rk_logprobs(inp, "triton"),
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "triton"), needs_cuda=True, check=_RK,
             code_path=_rk_path("triton", "auto")),
        Impl("rlsc-triton-exact", lambda inp: rk_logprobs(inp, "triton", None),
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "triton", None), needs_cuda=True, check=_RK,
             code_path=_rk_path("triton", None)),
        Impl("rlsc-triton-single-pass", None,
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "triton", "auto", "single-pass",
                                          buffer_bytes=single_pass_buffer_bytes(inp)), needs_cuda=True, check=_RK,
             code_path=lambda inp: _rk_path("triton", "auto", "single-pass")(inp)
             + f", buffer_bytes={single_pass_buffer_bytes(inp)}, {_single_pass_gemms(inp)}"),
        # two sequences per chunk: K = 2 x 1024 for the dW GEMM, half the passes over the fp32 dW
        # accumulator (each pass reads and writes 4 V D bytes), for one more logits block of memory
        Impl("rlsc-triton-single-pass-2seq", None,
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "triton", "auto", "single-pass",
                                          buffer_bytes=2 * single_pass_buffer_bytes(inp)), needs_cuda=True, check=_RK,
             code_path=lambda inp: _rk_path("triton", "auto", "single-pass")(inp)
             + f", buffer_bytes={2 * single_pass_buffer_bytes(inp)}, {_single_pass_gemms(inp)}"),
        Impl("rlsc-triton-two-sweep", None,
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "triton", "auto", "two-sweep"), needs_cuda=True, check=_RK,
             code_path=_rk_path("triton", "auto", "two-sweep")),
        # the gradient filter where it skips work (two-sweep backward, block-sparse Triton matmuls);
        # rlsc-triton-exact is the same without it
        Impl("rlsc-triton-filtered", None,
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "triton", FILTER_EPS, "two-sweep", grad_matmul="triton"),
             needs_cuda=True, check=_RK, code_path=_rk_path("triton", FILTER_EPS, "two-sweep")),
        Impl("rlsc-torch", lambda inp: rk_logprobs(inp, "torch", None),
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "torch", None), check=_RK, code_path=_rk_path("torch", None)),
        Impl("cce", _single_nll(_cce_nll), lambda inp, h, W: _nll_one_pass(_cce_nll(inp), inp, h, W), needs_cuda=True,
             check=_importable("cut_cross_entropy", "cut-cross-entropy"),
             code_path=_fixed("cut_cross_entropy.linear_cross_entropy(reduction='none'), one pass, default filter")),
        Impl("trl", _single_nll(_trl_nll), lambda inp, h, W: _nll_one_pass(_trl_nll(inp), inp, h, W),
             check=_importable("trl.kernels", "trl (>= 1.16, trl.kernels)"), code_path=_trl_path),
        Impl("liger-scaled-ce", _single_nll(_liger_scaled_ce_nll),
             lambda inp, h, W: _nll_one_pass(_liger_scaled_ce_nll(inp), inp, h, W),
             check=_importable("liger_kernel.ops.fused_linear_scaled_cross_entropy", "liger-kernel >= 0.8.5"),
             code_path=_liger_scaled_ce_path),
        Impl("liger", liger_logprobs, liger_fwd_bwd, check=_importable("liger_kernel.chunked_loss", "liger-kernel"),
             code_path=_liger_path),
        Impl("torch-naive", naive_logprobs, naive_fwd_bwd, code_path=_fixed("full logits, fp32 log_softmax, autograd")),
        Impl("torch-chunked", chunked_logprobs, chunked_fwd_bwd, code_path=_fixed("two sweeps by token chunks, eager")),
        Impl("torch-compile", lambda inp: chunked_logprobs(inp, compiled=True),
             lambda inp, h, W: chunked_fwd_bwd(inp, h, W, compiled=True),
             code_path=_fixed("two sweeps by token chunks, torch.compile per chunk")),
        Impl("torch-linear-ce", _single_nll(_linear_ce_nll), lambda inp, h, W: _nll_one_pass(_linear_ce_nll(inp), inp, h, W),
             check=_has_linear_ce, code_path=_fixed("F.linear_cross_entropy(reduction='none', chunked options), one pass")),
        Impl("matmul-floor", lambda inp: inp.hidden @ inp.weight.T, None, code_path=_fixed("one GEMM hidden @ W.T")),
        Impl("rlsc-native", lambda inp: rk_logprobs(inp, "native", None),
             lambda inp, h, W: rk_fwd_bwd(inp, h, W, "native", None), check=_native_check,
             code_path=_rk_path("native", None)),
        Impl("rlsc-single-pass", None, lambda inp, h, W: rk_fwd_bwd(inp, h, W, "torch", None, "single-pass"),
             check=_RK, code_path=_rk_path("torch", None, "single-pass")),
        Impl("rlsc-torch-two-sweep", None, lambda inp, h, W: rk_fwd_bwd(inp, h, W, "torch", None, "two-sweep"),
             check=_RK, code_path=_rk_path("torch", None, "two-sweep")),
        Impl("matmul-floor-3", None, three_gemms_fwd_bwd, check=_RK,
             code_path=_fixed("the single pass's three GEMMs alone, native's default chunks")),
    ]
}

#: The impls whose rows matter most (they come first in the comparison's order).
CORE_IMPLS = ("rlsc-triton", "matmul-floor", "cce", "trl", "liger-scaled-ce", "liger", "torch-naive")
EXTRA_IMPLS = ("rlsc-triton-single-pass", "rlsc-triton-single-pass-2seq", "rlsc-triton-two-sweep", "rlsc-triton-exact", "rlsc-triton-filtered",
               "torch-chunked",
               "torch-linear-ce", "rlsc-torch", "torch-compile", "rlsc-native", "rlsc-single-pass",
               "rlsc-torch-two-sweep", "matmul-floor-3")
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
