"""Public ops: fused linear log-probs and the RLSC loss, and the nn.Module wrapper.

Each public op plans the call once (plan.py: validation, autocast, options, path) and runs the
plan: eagerly through the autograd.Function of the per-token op (or the single pass), or, while
Dynamo traces it, through the registered custom ops (custom_ops.py). Nothing below this module
imports it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch

from . import backends
from .autograd import LinearLogprobsFunction, scored
from .options import BlockConfigs
from .plan import (
    MASK_DTYPES,
    REDUCTIONS,  # noqa: F401 (re-exported)
    LogprobsPlan,
    LossPlan,
    RLSCLossOutput,
    cast_for_autocast,
    check_alpha,
    check_reduction,
    check_temperature,
    check_weighting,
    plan_logprobs,
    plan_loss,
)
from .dtypes import output_dtype
from .reference import reference_logprobs
from .single_pass import maybe_single_pass
from .temperature import BAD_TEMPERATURE, PerTokenTemperature, bad_temperature, is_per_token
from .validation import check_backend, check_tensor
from .validation import check_values as _check_values
from .vocab_parallel import VocabParallel, vocab_parallel_logprobs
from .vocab_parallel import check_values as _check_values_vocab_parallel
from .weighting import check_external_weights, rlsc_weights

_AUTOCAST_DOC = """
    Under torch.autocast (active for hidden's device type) the op behaves like F.linear: hidden,
    weight and bias (fp32/fp16/bf16) run in the autocast dtype, gradients flow back through the
    casts to the original dtypes, and the outputs stay float32.
"""


def _logprobs_flat(hidden2d, weight, bias, targets1d, plan: LogprobsPlan, masters=None):
    """Per-token (logp, entropy|None) for flat inputs hidden [N, D], targets [N]; inputs already
    checked. masters: under autocast, the same (hidden2d, weight, bias) before the autocast cast:
    the fused Function casts them itself and returns their gradients unrounded (autograd.py).
    A per-token temperature (plan.token_temperature) wraps the backend (temperature.py)."""
    opts = plan.opts
    token_t = plan.token_temperature
    name = backends.resolve(plan.backend, hidden2d)
    if plan.vocab_parallel is not None:
        use_masters = name != "reference" and plan.compute_dtype is not None and masters
        inputs = masters[:3] if use_masters else (hidden2d, weight, bias)
        return vocab_parallel_logprobs(*inputs, targets1d, opts, name, plan.vocab_parallel,
                                       plan.compute_dtype if use_masters else None, token_temperature=token_t)
    if name == "reference":
        t = None if token_t is None else token_t.to(output_dtype(hidden2d.dtype))[:, None]
        return reference_logprobs(hidden2d, weight, bias, targets1d, opts, temperature=t)
    backend = backends.get(name) if token_t is None else PerTokenTemperature(backends.get(name), token_t)
    if plan.compute_dtype is not None and masters is not None:
        logp, entropy = LinearLogprobsFunction.apply(*masters[:3], targets1d, opts, backend, plan.compute_dtype)
    else:
        logp, entropy = LinearLogprobsFunction.apply(hidden2d, weight, bias, targets1d, opts, backend)
    return logp, (entropy if opts.return_entropy else None)


def _value_checks(hidden, weight, bias, targets, plan: LogprobsPlan, extra=None) -> None:
    """The data-dependent checks (one host sync) unless the plan turned them off."""
    if not plan.check_values:
        return
    if plan.token_temperature is not None:
        extra = dict(extra or {}, **{BAD_TEMPERATURE: bad_temperature(plan.token_temperature)})
    if plan.vocab_parallel is not None:
        _check_values_vocab_parallel(hidden, weight, bias, targets, plan.opts.ignore_index, plan.vocab_parallel, extra)
    else:
        _check_values(hidden, weight, bias, targets, plan.opts.ignore_index, extra)


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
      False skips them for a trusted hot loop: no sync and no extra pass, and never memory
      corruption: no kernel reads or writes out of bounds for any target id. On every path (two
      sweeps and single pass) an id outside [0, V) that is not ignore_index counts as ignored
      (log-prob 0, entropy 0, no gradient, not in n_tokens); NaN / inf inputs give NaN outputs.
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
    temperature: Union[float, torch.Tensor] = 1.0,
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
    temperature: a float > 0, or a 0-d float tensor (a schedule's value; a CUDA tensor costs one
    host read in an eager call), or a per-sample temperature: a float tensor shaped like targets
    (per token) or [B] for targets [B, T] (per row; for sequences of a packed batch pass
    temperature[seq_index]), on targets' device. Its values must be finite and > 0 (checked with
    the value checks; with check_values=False a bad value gives NaN, never a crash). No gradient
    flows to a temperature tensor. Without bias and softcap the op runs once on hidden / T_t
    (one extra rounding of that quotient to the input dtype); with either, once per distinct
    temperature value, exact, reading the weight once per value and the distinct values on the
    host (rlsc_kernels/temperature.py).
    Under torch.compile (also fullgraph=True) the op runs as registered custom ops
    (rlsc_kernels/custom_ops.py): same results and gradients, a new token count is not a new
    compilation, nor is a new temperature (a Python float Dynamo makes dynamic, a 0-d tensor,
    or new values of a per-token tensor, whose grouping runs inside the op), and the value
    checks run inside the op.
    Precision: logits, their gradient and the gradient accumulations are fp32; the upstream
    gradient meets them in fp32 (a GradScaler's 2^16 cannot overflow a 16-bit intermediate) and
    the gradients are rounded once, to the dtypes of the tensors passed (under autocast, the fp32
    masters: not rounded to 16 bits at all).
    """
    masters = (hidden, weight, bias)
    hidden, weight, bias, autocast_off, plan = plan_logprobs(
        hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, filter_eps=filter_eps, backend=backend, softcap=softcap, backward=backward,
        grad_matmul=grad_matmul, buffer_bytes=buffer_bytes, check_values=check_values, block_configs=block_configs,
        vocab_parallel=vocab_parallel)
    if plan.tracing:  # traced by Dynamo: the registered custom ops (custom_ops.py)
        from .custom_ops import traced_logprobs

        return traced_logprobs(hidden, weight, bias, targets, plan, autocast_off, masters)
    _value_checks(hidden, weight, bias, targets, plan)
    lead_shape = targets.shape
    with autocast_off:
        logp, entropy = _logprobs_flat(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), plan,
                                       (masters[0].reshape(-1, masters[0].shape[-1]), masters[1], masters[2]))
    logp = logp.reshape(lead_shape)
    if return_entropy:
        return logp, entropy.reshape(lead_shape)
    return logp


linear_logprobs.__doc__ += _AUTOCAST_DOC + _OPTION_DOCS


def _select_tokens(hidden, targets, completion_mask, seq_index, num_sequences, ignore_index, token_temperature=None):
    """Brings both input forms to packed tokens: (hidden [n, D], targets [n], seq [n] int64, S,
    checks, temperature [n] | None) where checks maps an error message to a bool tensor that
    must be all False (checked with the value checks' single sync); token_temperature: one per
    position of targets (flattened), gathered like the tokens. Syncs: the padded form's gather of the scored tokens
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
        check_tensor("completion_mask", completion_mask, dtypes=MASK_DTYPES)
        if tuple(completion_mask.shape) != (B, T):
            raise ValueError(f"completion_mask must have shape [{B}, {T}] like targets, got {list(completion_mask.shape)}")
        if completion_mask.device != hidden.device:
            raise ValueError(f"completion_mask is on {completion_mask.device} but hidden is on {hidden.device}")
        scored = (completion_mask != 0) & (targets != ignore_index)
        # Prompt and padding tokens never reach the head: gather the scored ones only.
        seq = torch.arange(B, device=hidden.device)[:, None].expand(B, T)[scored]
        picked_t = None if token_temperature is None else token_temperature.reshape(B, T)[scored]
        return hidden[scored], targets[scored], seq, B, {}, picked_t
    if hidden.dim() == 2:
        if completion_mask is not None:
            raise ValueError("completion_mask is for the padded form hidden [B, T, D]; the packed form [N, D] takes seq_index")
        N = hidden.shape[0]
        if seq_index is None:
            if num_sequences not in (None, 1) and N > 0:
                raise ValueError(f"num_sequences={num_sequences} needs seq_index (without it all tokens are one sequence)")
            S = (1 if N > 0 else 0) if num_sequences is None else num_sequences
            return hidden, targets, torch.zeros(N, dtype=torch.int64, device=hidden.device), S, {}, token_temperature
        check_tensor("seq_index", seq_index, dtypes=(torch.int64, torch.int32), dim=1)
        if seq_index.shape[0] != N:
            raise ValueError(f"seq_index must have shape [{N}] like targets, got {list(seq_index.shape)}")
        if seq_index.device != hidden.device:
            raise ValueError(f"seq_index is on {seq_index.device} but hidden is on {hidden.device}")
        seq = seq_index.long()
        if num_sequences is not None:
            bad = (seq < 0) | (seq >= num_sequences)
            return hidden, targets, seq, num_sequences, {
                f"seq_index holds ids outside [0, num_sequences={num_sequences})": bad}, token_temperature
        if N == 0:
            return hidden, targets, seq, 0, {}, token_temperature
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(seq)).tolist())  # one sync
        if lo < 0:
            raise ValueError(f"seq_index holds negative sequence ids (got {lo}; expected 0..S-1)")
        return hidden, targets, seq, hi + 1, {}, token_temperature
    raise ValueError(f"hidden must be [B, T, D] (padded form) or [N, D] (packed form), got shape {list(hidden.shape)}")


def linear_rlsc_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    completion_mask: Optional[torch.Tensor] = None,
    seq_index: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 0.5,
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
    native_matmul: str = "auto",
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
    temperature, alpha: floats, or 0-d float tensors (a schedule's values); under torch.compile
      new values do not recompile. temperature may also be per sample, a float tensor of values
      > 0 on targets' device: shaped like targets (per token), [B] in the padded form (per row),
      or [S] with seq_index in the packed form (per sequence); as in linear_logprobs (no gradient
      to it, values checked with the value checks). It takes the two sweeps: path="auto" then
      skips the single pass and path="single-pass" raises.
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
    native_matmul: the native CPU backend's single pass on bf16 inputs: "auto" (default) runs its
      three GEMMs on bf16 operands with fp32 accumulation and fp32 outputs where the CPU has
      AMX-BF16 or AVX512-BF16 and the loaded torch exports MKL's cblas_gemm_bf16bf16f32
      (rlsc_kernels.backends.native.bf16_gemm_status()), else upcasts to fp32; "bf16" requires
      the bf16 GEMMs (raises where unavailable); "fp32" always upcasts.
    Under torch.compile (also fullgraph=True) the loss is built from the registered custom ops
    (rlsc_kernels/custom_ops.py) on the two-sweep path: same loss and gradients, but token_logp /
    token_entropy hold every position of the input (0 where unscored) rather than the scored
    tokens only, and the packed form needs num_sequences=.
    """
    masters = (hidden, weight, bias)
    hidden, weight, bias, autocast_off, plan = plan_loss(
        hidden, weight, bias, targets, temperature=temperature, alpha=alpha, weighting=weighting, reduction=reduction,
        ignore_index=ignore_index, filter_eps=filter_eps, backend=backend, return_entropy=return_entropy,
        softcap=softcap, num_sequences=num_sequences, backward=backward, grad_matmul=grad_matmul,
        buffer_bytes=buffer_bytes, check_values=check_values, block_configs=block_configs, path=path,
        vocab_parallel=vocab_parallel, native_matmul=native_matmul, seq_index=seq_index)
    if plan.op.tracing:  # traced by Dynamo: the registered custom ops (custom_ops.py)
        from .custom_ops import traced_rlsc_loss

        return traced_rlsc_loss(hidden, weight, bias, targets, completion_mask, seq_index, plan, autocast_off, masters)
    return _run_loss(hidden, weight, bias, targets, completion_mask, seq_index, plan, autocast_off, masters)


def _run_loss(hidden, weight, bias, targets, completion_mask, seq_index, plan: LossPlan, autocast_off, masters):
    """The eager loss: select the scored tokens, check values (one sync), then the single pass
    where the plan allows it, else the per-token op and the weights on top. masters: the
    (hidden, weight, bias) before an autocast cast (see _logprobs_flat)."""
    op = plan.op
    ignore_index = op.opts.ignore_index
    selected_from = masters[0] if op.compute_dtype is not None else hidden
    h_master, y, seq, S, seq_checks, token_t = _select_tokens(selected_from, targets, completion_mask, seq_index,
                                                              plan.num_sequences, ignore_index, op.token_temperature)
    if token_t is not None:  # the scored tokens' temperatures
        op = replace(op, token_temperature=token_t)
    h = cast_for_autocast(h_master, op.compute_dtype) if op.compute_dtype is not None else h_master
    y = y.long()  # int32 targets are legal; every path below sees int64
    weighting = plan.weighting
    if isinstance(weighting, torch.Tensor):
        check_external_weights(weighting, S, hidden.device)
        seq_checks["weighting tensor contains NaN or inf"] = ~torch.isfinite(weighting)
    _value_checks(h, weight, bias, y, op, seq_checks)
    valid = scored(y, ignore_index, weight.shape[0])  # out-of-range ids (check_values=False) count as ignored
    n_tokens = torch.zeros(S, dtype=torch.int64, device=hidden.device).index_add_(0, seq, valid.long())

    with autocast_off:
        # under autocast the single pass takes the masters and casts them itself (as the per-token
        # Function does): gradients come back in the masters' dtypes, never rounded to 16 bits
        sp_inputs = (h_master, masters[1], masters[2]) if op.compute_dtype is not None else (h, weight, bias)
        one_temperature = op.vocab_parallel is None and op.token_temperature is None
        single = None if not one_temperature else maybe_single_pass(
            *sp_inputs, y, seq, S, opts=op.opts, weighting=weighting, alpha=plan.alpha,
            reduction=plan.reduction, backend=op.backend, path=plan.path, compute_dtype=op.compute_dtype)
        if single is not None:
            loss, token_logp, seq_logp, seq_weight, token_entropy = single
            # detached on every path (a custom Function's non-differentiable output keeps a grad_fn)
            return RLSCLossOutput(loss, seq_logp, seq_weight.detach(), token_logp, n_tokens, token_entropy)
        token_logp, token_entropy = _logprobs_flat(h, weight, bias, y, op, (h_master, masters[1], masters[2]))
        seq_logp = torch.zeros(S, dtype=token_logp.dtype, device=h.device).index_add(0, seq, token_logp)
        seq_weight = rlsc_weights(seq_logp, n_tokens, weighting, plan.alpha)
        loss = -(seq_weight.to(seq_logp.dtype) * seq_logp).sum()
        if plan.reduction == "mean":
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
        check_values, block_configs, softcap, vocab_parallel, path, native_matmul)."""
        super().__init__()
        allowed = ("backward", "grad_matmul", "buffer_bytes", "check_values", "block_configs", "softcap",
                   "vocab_parallel", "path", "native_matmul")
        unknown = sorted(set(execution) - set(allowed))
        if unknown:
            raise TypeError(f"LinearRLSCLoss got unexpected keyword arguments {unknown}; execution options are {allowed}")
        tracing = torch.compiler.is_compiling()  # built inside a compiled step: floats stay symbolic
        if not is_per_token(temperature):  # a per-sample tensor is checked against each call's targets
            check_temperature(temperature, tracing=tracing)
        check_backend(backend)
        check_weighting(weighting)
        check_reduction(reduction)
        self.options = dict(
            temperature=temperature, alpha=check_alpha(alpha, tracing=tracing), weighting=weighting, reduction=reduction,
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
