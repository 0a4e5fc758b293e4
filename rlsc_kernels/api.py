"""Public ops: fused linear log-probs and the RLSC loss, and the nn.Module wrapper."""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import backends
from .autograd import LinearLogprobsFunction
from .options import (
    BlockConfigs,
    FusedOptions,
    check_backward,
    check_softcap,
    check_block_configs,
    check_buffer_bytes,
    check_grad_matmul,
    resolve_filter_eps,
)
from .reference import reference_logprobs
from .validation import check_backend, check_head, check_tensor, check_temperature
from .validation import check_values as _check_values
from .single_pass import check_path, maybe_single_pass
from .vocab_parallel import VocabParallel, check_vocab_parallel, vocab_parallel_logprobs
from .vocab_parallel import check_values as _check_values_vocab_parallel
from .weighting import WEIGHTINGS, check_external_weights, rlsc_weights

REDUCTIONS = ("mean", "sum")
_AUTOCAST_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(hidden) -> Optional[torch.dtype]:
    """The autocast dtype of hidden's device type if an autocast region is active there, else None."""
    if not isinstance(hidden, torch.Tensor):
        return None
    device_type = hidden.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return None


def _autocast_inputs(hidden, weight, bias):
    """Like F.linear under torch.autocast: hidden, weight and bias in the region's dtype (the
    casts are differentiable, so an fp32 master weight gets its gradient in fp32). The op then
    runs with autocast off, so no backend matmul is recast behind its back."""
    dtype = _autocast_dtype(hidden)
    if dtype is None:
        return hidden, weight, bias, contextlib.nullcontext()

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTABLE else t

    return cast(hidden), cast(weight), cast(bias), torch.autocast(hidden.device.type, enabled=False)

_AUTOCAST_DOC = """
    Under torch.autocast (active for hidden's device type) the op behaves like F.linear: hidden,
    weight and bias (fp32/fp16/bf16) run in the autocast dtype, gradients flow back through the
    casts to the original dtypes, and the outputs stay float32.
"""


def _logprobs_flat(hidden2d, weight, bias, targets1d, opts: FusedOptions, backend: str, vocab_parallel=None):
    """Per-token (logp, entropy|None) for flat inputs hidden [N, D], targets [N]; inputs already checked."""
    name = backends.resolve(backend, hidden2d)
    if vocab_parallel is not None:
        return vocab_parallel_logprobs(hidden2d, weight, bias, targets1d, opts, name, vocab_parallel)
    if name == "reference":
        return reference_logprobs(hidden2d, weight, bias, targets1d, opts)
    logp, entropy = LinearLogprobsFunction.apply(hidden2d, weight, bias, targets1d, opts, backends.get(name))
    return logp, (entropy if opts.return_entropy else None)


def _options(hidden, temperature, ignore_index, return_entropy, filter_eps, backward, grad_matmul, buffer_bytes,
             block_configs, check_values, softcap=None) -> FusedOptions:
    backward = check_backward(backward)
    grad_matmul = check_grad_matmul(grad_matmul)
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values must be a bool, got {type(check_values).__name__}")
    return FusedOptions(
        temperature=check_temperature(temperature),
        ignore_index=int(ignore_index),
        return_entropy=bool(return_entropy),
        filter_eps=resolve_filter_eps(filter_eps, hidden.dtype, backward, grad_matmul),
        backward=backward,
        grad_matmul=grad_matmul,
        buffer_bytes=check_buffer_bytes(buffer_bytes),
        block_configs=check_block_configs(block_configs),
        softcap=check_softcap(softcap),
    )


_OPTION_DOCS = """
    Execution options (keywords; each call sees exactly what it passes, nothing is read from the
    environment):
    backward: Triton backward strategy, "sliced" (default: logit-gradient slices + two matmuls)
      or "fused" (one kernel, fp32 atomics, non-deterministic sums).
    grad_matmul: the sliced backward's matmuls, "library" (torch.mm / cuBLAS, default) or
      "triton" (block-sparse, skips the tiles the gradient filter dropped).
    buffer_bytes: budget for the largest temporary block a backend holds (torch: a logits
      block; Triton: the logit-gradient slice, or the fused backward's fp32 dweight slice);
      None = the backend's default.
    check_values: True (default) checks target ids and finiteness with one device-to-host sync;
      False skips them (garbage in, garbage out) for a trusted hot loop.
    block_configs: rlsc_kernels.BlockConfigs of Triton block sizes for this call (tests and
      tuning); None = the shipped ones.
    vocab_parallel: rlsc_kernels.VocabParallel(start, stop, group) when weight (and bias) hold
      only rows [start, stop) of a head split over a torch.distributed group; targets stay
      global ids and every rank passes the same hidden and targets (rlsc_kernels/vocab_parallel.py:
      collectives, bytes per token). None (default) = weight is the whole head.
"""


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    filter_eps: Union[None, str, float] = "auto",
    backend: str = "auto",
    softcap: Optional[float] = None,
    backward: str = "sliced",
    grad_matmul: str = "library",
    buffer_bytes: Optional[int] = None,
    check_values: bool = True,
    block_configs: Optional[BlockConfigs] = None,
    vocab_parallel: Optional[VocabParallel] = None,
):
    """Log-probs of `targets` under softmax((hidden @ weight.T + bias) / temperature), never
    materialising the [tokens x vocab] logits (except backend="reference").

    hidden [..., D] bf16/fp16/fp32 (fp64 on the torch and reference backends), weight [V, D]
    (same dtype), bias [V] or None, targets [...] int64/int32 in [0, V) or ignore_index.
    Returns float32 log-probs [...] (float64 for float64 inputs), 0 where targets == ignore_index;
    with return_entropy=True the pair (logp, entropy), entropy [...] of the same distribution.
    Differentiable w.r.t. hidden, weight and bias through both outputs.

    filter_eps: None = exact backward; "auto" = skip backward tiles whose gradient mass is below
    2^-12 of the token's upstream gradient, only where skipping saves work (16-bit inputs on the
    Triton backend with backward="fused" or grad_matmul="triton"); exact everywhere else,
    including the default sliced backward with library matmuls; a float = that threshold on
    every Triton path. The torch and reference backends are always exact.
    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton", "torch", "reference".
    softcap: None, or c > 0 for soft-capped logits: softmax(c * tanh((hidden @ weight.T + bias) / c)
    / temperature), the cap before the temperature as in the models that cap (Gemma 2) and
    their sampling; every backend, with its gradient.
    Any layout of any tensor argument (sliced, transposed, expanded, offset) gives the result of
    its contiguous copy. Zero tokens are legal: the outputs are empty and still differentiable
    (zero gradients). With check_values=False the call makes no device-to-host sync.
    Under torch.compile (also fullgraph=True) the op runs as registered custom ops
    (rlsc_kernels/custom_ops.py): same results and gradients, a new token count is not a new
    compilation, and the value checks run inside the op.
    """
    if torch.compiler.is_compiling():  # traced by Dynamo: the registered custom ops (custom_ops.py)
        from .custom_ops import traced_linear_logprobs

        return traced_linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, filter_eps=filter_eps, backend=backend, softcap=softcap,
            backward=backward, grad_matmul=grad_matmul, buffer_bytes=buffer_bytes, check_values=check_values,
            block_configs=block_configs, vocab_parallel=vocab_parallel,
        )
    hidden, weight, bias, autocast_off = _autocast_inputs(hidden, weight, bias)
    check_head(hidden, weight, bias, targets, ignore_index)
    check_backend(backend)
    opts = _options(hidden, temperature, ignore_index, return_entropy, filter_eps, backward, grad_matmul,
                    buffer_bytes, block_configs, check_values, softcap)
    if vocab_parallel is not None:
        check_vocab_parallel(vocab_parallel, weight, bias)
    if check_values and vocab_parallel is not None:
        _check_values_vocab_parallel(hidden, weight, bias, targets, ignore_index, vocab_parallel)
    elif check_values:
        _check_values(hidden, weight, bias, targets, ignore_index)
    lead_shape = targets.shape
    with autocast_off:
        logp, entropy = _logprobs_flat(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), opts, backend, vocab_parallel
        )
    logp = logp.reshape(lead_shape)
    if return_entropy:
        return logp, entropy.reshape(lead_shape)
    return logp


linear_logprobs.__doc__ += _AUTOCAST_DOC + _OPTION_DOCS


@dataclass
class RLSCLossOutput:
    """Result of linear_rlsc_loss.

    loss: scalar, -sum_s w_s L_s (reduction "sum") or that divided by max(S, 1) ("mean").
    seq_logp: [S] float32 sequence log-probs L_s (differentiable; 0 for a sequence with no
      scored token).
    seq_weight: [S] float32 detached weights w_s.
    token_logp: float32 log-probs in input order: padded form [n_scored], the masked-in tokens
      only; packed form [N], 0 where targets == ignore_index.
    n_tokens: [S] int64 scored tokens per sequence.
    token_entropy: entropies of the same tokens (with return_entropy=True), else None.
    """

    loss: torch.Tensor
    seq_logp: torch.Tensor
    seq_weight: torch.Tensor
    token_logp: torch.Tensor
    n_tokens: torch.Tensor
    token_entropy: Optional[torch.Tensor] = None


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    return float(alpha)


def _check_weighting(weighting):
    if isinstance(weighting, torch.Tensor):
        return
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a float tensor [S], got {weighting!r}")


_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_num_sequences(num_sequences) -> Optional[int]:
    if num_sequences is None:
        return None
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, numbers.Integral) or num_sequences < 0:
        raise ValueError(f"num_sequences must be None or an int >= 0, got {num_sequences!r}")
    return int(num_sequences)


def _select_tokens(hidden, targets, completion_mask, seq_index, num_sequences, ignore_index):
    """Brings both input forms to packed tokens: (hidden [n, D], targets [n], seq [n] int64, S,
    checks) where checks maps an error message to a bool tensor that must be all False (checked
    with the value checks' single sync). Syncs: the padded form's gather of the scored tokens
    (its count is data-dependent); the packed form only without num_sequences (S = max id + 1)."""
    if completion_mask is not None and seq_index is not None:
        raise ValueError("pass either completion_mask (padded form) or seq_index (packed form), not both")
    if hidden.dim() == 3:
        if seq_index is not None:
            raise ValueError("seq_index is for the packed form hidden [N, D]; the padded form [B, T, D] takes completion_mask")
        if num_sequences is not None:
            raise ValueError("num_sequences is for the packed form hidden [N, D]; the padded form has one sequence per row")
        B, T = targets.shape
        if completion_mask is None:
            completion_mask = torch.ones(B, T, dtype=torch.bool, device=targets.device)
        # bool, or 0/1 integers as TRL and Hugging Face collators produce them (nonzero = scored)
        check_tensor("completion_mask", completion_mask, dtypes=_MASK_DTYPES)
        if tuple(completion_mask.shape) != (B, T):
            raise ValueError(f"completion_mask must have shape [{B}, {T}] like targets, got {list(completion_mask.shape)}")
        if completion_mask.device != hidden.device:
            raise ValueError(f"completion_mask is on {completion_mask.device} but hidden is on {hidden.device}")
        scored = (completion_mask != 0) & (targets != ignore_index)
        # Prompt and padding tokens never reach the head: gather the scored ones only.
        seq = torch.arange(B, device=hidden.device)[:, None].expand(B, T)[scored]
        return hidden[scored], targets[scored], seq, B, {}
    if hidden.dim() == 2:
        if completion_mask is not None:
            raise ValueError("completion_mask is for the padded form hidden [B, T, D]; the packed form [N, D] takes seq_index")
        N = hidden.shape[0]
        if seq_index is None:
            if num_sequences not in (None, 1) and N > 0:
                raise ValueError(f"num_sequences={num_sequences} needs seq_index (without it all tokens are one sequence)")
            S = (1 if N > 0 else 0) if num_sequences is None else num_sequences
            return hidden, targets, torch.zeros(N, dtype=torch.int64, device=hidden.device), S, {}
        check_tensor("seq_index", seq_index, dtypes=(torch.int64, torch.int32), dim=1)
        if seq_index.shape[0] != N:
            raise ValueError(f"seq_index must have shape [{N}] like targets, got {list(seq_index.shape)}")
        if seq_index.device != hidden.device:
            raise ValueError(f"seq_index is on {seq_index.device} but hidden is on {hidden.device}")
        seq = seq_index.long()
        if num_sequences is not None:
            bad = (seq < 0) | (seq >= num_sequences)
            return hidden, targets, seq, num_sequences, {
                f"seq_index holds ids outside [0, num_sequences={num_sequences})": bad}
        if N == 0:
            return hidden, targets, seq, 0, {}
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(seq)).tolist())  # one sync
        if lo < 0:
            raise ValueError(f"seq_index holds negative sequence ids (got {lo}; expected 0..S-1)")
        return hidden, targets, seq, hi + 1, {}
    raise ValueError(f"hidden must be [B, T, D] (padded form) or [N, D] (packed form), got shape {list(hidden.shape)}")


def linear_rlsc_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    completion_mask: Optional[torch.Tensor] = None,
    seq_index: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 0.5,
    alpha: float = 0.1,
    weighting: Union[str, torch.Tensor] = "rlsc",
    reduction: str = "mean",
    ignore_index: int = -100,
    filter_eps: Union[None, str, float] = "auto",
    backend: str = "auto",
    return_entropy: bool = False,
    softcap: Optional[float] = None,
    num_sequences: Optional[int] = None,
    backward: str = "sliced",
    grad_matmul: str = "library",
    buffer_bytes: Optional[int] = None,
    check_values: bool = True,
    block_configs: Optional[BlockConfigs] = None,
    path: str = "auto",
    vocab_parallel: Optional[VocabParallel] = None,
) -> RLSCLossOutput:
    """The RLSC loss -sum_s w_s L_s from hidden states and the lm_head weight, without logits.

    hidden[..., t, :] is the state that predicts targets[..., t] (the caller shifts).
    Padded form: hidden [B, T, D], targets [B, T], completion_mask [B, T] bool; one sequence per
      row (S = B); only masked-in tokens (whose target is not ignore_index) are scored.
    Packed form: hidden [N, D], targets [N], seq_index [N] int64/int32 in 0..S-1 (None: all
      tokens are one sequence); tokens whose target is ignore_index are skipped. S is
      num_sequences if given (ids must lie in [0, num_sequences)), else max(seq_index) + 1.
    L_s = sum of the scored tokens' log_softmax(logits / temperature) at the target.
    A sequence with no scored token (a fully masked completion, an id no token carries) is legal:
      L_s = 0, n_tokens = 0, and it contributes nothing to the loss or the gradients. An empty
      batch (no token, or every token masked) gives a zero loss that is still connected to
      hidden and weight: backward runs and gives zero gradients (a data-parallel rank with an
      empty micro-batch must take part in the backward).
    weighting: "rlsc" (w = exp(L) + alpha), "rlsc-l1" (exp(L)), "entropy" (1 + L), "length"
      (exp(L / n_tokens) + alpha), or a float tensor [S] of external weights; always detached.
    reduction: "sum", or "mean" = the sum divided by S, the number of sequences, counting those
      with no scored token (so micro-batches compose), and by 1 when S = 0. For micro-batches of
      one batch use "sum" and scale by 1 / S_total: each weight depends on its own sequence
      only, so that is exact.
    return_entropy: also return each scored token's entropy (for monitoring; it is not in the
      loss, and costs nothing in the backward unless the caller backpropagates through it).
    filter_eps, backend, softcap: as in linear_logprobs.
    path: "auto" computes the loss and its gradients in one pass (three GEMMs at every sequence
      length: sequences longer than buffer_bytes allows are split across chunks; the backward
      only scales the gradients) wherever that applies and is proven: backends torch and native
      on CPU. On CUDA "auto" takes the two sweeps until a GPU run has measured the single pass;
      "single-pass" opts in there (backend triton). Elsewhere, and with "two-sweep", the
      per-token op's two sweeps. "single-pass" raises where it does not apply. The single
      pass makes one more device-to-host sync (tokens per sequence, for the chunk plan). With
      vocab_parallel the loss always takes the two sweeps (the single pass does not split the
      vocabulary), and "single-pass" raises.
    Device-to-host syncs: the value checks (one, check_values=True), the padded form's gather
      of the scored tokens (one), and the packed form's S = max(seq_index) + 1 without
      num_sequences (one). The packed form with num_sequences, check_values=False and
      path="two-sweep" makes none (the single pass reads the tokens per sequence for its plan).
    Under torch.compile (also fullgraph=True) the loss is built from the registered custom ops
    (rlsc_kernels/custom_ops.py) on the two-sweep path: same loss and gradients, but token_logp /
    token_entropy hold every position of the input (0 where unscored) rather than the scored
    tokens only, and the packed form needs num_sequences=.
    """
    if torch.compiler.is_compiling():  # traced by Dynamo: the registered custom ops (custom_ops.py)
        from .custom_ops import traced_linear_rlsc_loss

        return traced_linear_rlsc_loss(
            hidden, weight, targets, completion_mask=completion_mask, seq_index=seq_index, bias=bias,
            temperature=temperature, alpha=alpha, weighting=weighting, reduction=reduction,
            ignore_index=ignore_index, filter_eps=filter_eps, backend=backend, return_entropy=return_entropy,
            softcap=softcap, num_sequences=num_sequences, backward=backward, grad_matmul=grad_matmul,
            buffer_bytes=buffer_bytes, check_values=check_values, block_configs=block_configs,
            vocab_parallel=vocab_parallel,
        )
    hidden, weight, bias, autocast_off = _autocast_inputs(hidden, weight, bias)
    check_head(hidden, weight, bias, targets, ignore_index)
    check_backend(backend)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_weighting(weighting)
    alpha = _check_alpha(alpha)
    opts = _options(hidden, temperature, ignore_index, return_entropy, filter_eps, backward, grad_matmul,
                    buffer_bytes, block_configs, check_values, softcap)
    num_sequences = _check_num_sequences(num_sequences)
    if vocab_parallel is not None:
        check_vocab_parallel(vocab_parallel, weight, bias)
        if check_path(path) == "single-pass":
            raise ValueError("path='single-pass' does not split the vocabulary; with vocab_parallel use path='auto' "
                             "or 'two-sweep'")
    h, y, seq, S, seq_checks = _select_tokens(hidden, targets, completion_mask, seq_index, num_sequences, ignore_index)
    y = y.long()  # int32 targets are legal; every path below sees int64
    if isinstance(weighting, torch.Tensor):
        check_external_weights(weighting, S, hidden.device)
        seq_checks["weighting tensor contains NaN or inf"] = ~torch.isfinite(weighting)
    if check_values and vocab_parallel is not None:
        _check_values_vocab_parallel(h, weight, bias, y, ignore_index, vocab_parallel, seq_checks)
    elif check_values:
        _check_values(h, weight, bias, y, ignore_index, seq_checks)
    valid = y != ignore_index
    n_tokens = torch.zeros(S, dtype=torch.int64, device=hidden.device).index_add_(0, seq, valid.long())

    with autocast_off:
        single = None if vocab_parallel is not None else maybe_single_pass(
            h, weight, bias, y, seq, S, opts=opts, weighting=weighting, alpha=alpha, reduction=reduction,
            backend=backend, path=path)
        if single is not None:
            loss, token_logp, seq_logp, seq_weight, token_entropy = single
            return RLSCLossOutput(loss, seq_logp, seq_weight, token_logp, n_tokens, token_entropy)
        token_logp, token_entropy = _logprobs_flat(h, weight, bias, y, opts, backend, vocab_parallel)
        seq_logp = torch.zeros(S, dtype=token_logp.dtype, device=h.device).index_add(0, seq, token_logp)
        seq_weight = rlsc_weights(seq_logp, n_tokens, weighting, alpha)
        loss = -(seq_weight.to(seq_logp.dtype) * seq_logp).sum()
        if reduction == "mean":
            loss = loss / max(S, 1)
    return RLSCLossOutput(loss, seq_logp, seq_weight, token_logp, n_tokens, token_entropy)


linear_rlsc_loss.__doc__ += _AUTOCAST_DOC + _OPTION_DOCS


class LinearRLSCLoss(torch.nn.Module):
    """nn.Module holding linear_rlsc_loss's options; forward(hidden, weight, targets, completion_mask=None,
    seq_index=None, bias=None, weighting=None, num_sequences=None) returns an RLSCLossOutput."""

    def __init__(
        self,
        *,
        temperature: float = 0.5,
        alpha: float = 0.1,
        weighting: Union[str, torch.Tensor] = "rlsc",
        reduction: str = "mean",
        ignore_index: int = -100,
        filter_eps: Union[None, str, float] = "auto",
        backend: str = "auto",
        return_entropy: bool = False,
        **execution,
    ):
        """execution: linear_rlsc_loss's other keyword options (backward, grad_matmul, buffer_bytes,
        check_values, block_configs, softcap, vocab_parallel, path)."""
        super().__init__()
        allowed = ("backward", "grad_matmul", "buffer_bytes", "check_values", "block_configs", "softcap",
                   "vocab_parallel", "path")
        unknown = sorted(set(execution) - set(allowed))
        if unknown:
            raise TypeError(f"LinearRLSCLoss got unexpected keyword arguments {unknown}; execution options are {allowed}")
        check_temperature(temperature)
        check_backend(backend)
        _check_weighting(weighting)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.options = dict(
            temperature=temperature, alpha=_check_alpha(alpha), weighting=weighting, reduction=reduction,
            ignore_index=ignore_index, filter_eps=filter_eps, backend=backend, return_entropy=return_entropy,
            **execution,
        )

    def forward(self, hidden, weight, targets, completion_mask=None, seq_index=None, bias=None, weighting=None,
                num_sequences=None):
        options = dict(self.options)
        if weighting is not None:
            options["weighting"] = weighting
        return linear_rlsc_loss(
            hidden, weight, targets, completion_mask=completion_mask, seq_index=seq_index, bias=bias,
            num_sequences=num_sequences, **options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))
