"""The fused op as registered PyTorch custom ops, so torch.compile can capture code that calls it.

    @torch.compile(fullgraph=True)
    def step(hidden, weight, targets):
        return rk.linear_logprobs(hidden, weight, targets, temperature=0.7).sum()

``linear_logprobs`` and ``linear_rlsc_loss`` take this route by themselves while Dynamo traces
them (``torch.compiler.is_compiling()``); eager calls keep the autograd.Function route. Two ops:
    rlsc_kernels::logprobs_forward(hidden [N, D], weight [V, D], bias [V]?, targets [N], options, backend)
        -> (logp [N], entropy [N] or [0], lse [N], mean_z [N] or [0])
    rlsc_kernels::logprobs_backward(hidden, weight, bias, targets, lse, mean_z, grad_logp?, grad_entropy?,
        options, backend, need_hidden, need_weight, need_bias) -> (dhidden, dweight, dbias; [0] when not needed)
tied together with torch.library.register_autograd. Their fake (meta) versions give output shapes
in terms of N, so a new token count is a new symbolic size, not a recompilation (after Dynamo's
usual one recompilation that marks the size dynamic).

Inside the ops the code is eager and opaque to the compiler: the backend is resolved there
("auto" -> Triton on CUDA, native / PyTorch on CPU), and the value checks (target ids, NaN/inf)
run there with their one host sync unless check_values=False. The options travel as a JSON string
(custom-op schemas take only primitive types; this keeps the schema fixed as FusedOptions grows).

The module is imported by the first traced call (it imports torch._dynamo, which a plain
``import rlsc_kernels`` should not pay for); import it yourself to have the ops registered up front.

Differences from the eager route, all documented in the public docstrings:
  - linear_rlsc_loss scores every position of the padded form (unscored ones have the ignore
    target and cost a little compute) instead of gathering the scored ones first, and returns
    token_logp / token_entropy for every position (0 where unscored): a gather would give the
    graph a data-dependent shape;
  - the packed form needs num_sequences= (S = max(seq_index) + 1 would need a host sync);
  - the single-pass path (path="auto") is not used: the loss is built from the two-sweep op.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .dtypes import output_dtype
from .options import BlockConfigs, FusedOptions, KernelConfig

_LIB = "rlsc_kernels"


#: FusedOptions' field names, in order: the options are encoded field by field.
_FIELDS = tuple(f.name for f in dataclasses.fields(FusedOptions))


def encode_options(opts: FusedOptions, check_values: bool) -> str:
    """The options as the JSON string the ops take (traceable: see _encode)."""
    return _encode(bool(check_values), *(getattr(opts, name) for name in _FIELDS))


# Dynamo cannot trace json; the string depends on constants only, so it is computed at trace time
# and baked into the graph. Fields go one by one: Dynamo passes a dataclass built inside the
# traced frame to such a function with its default field values.
@torch._dynamo.assume_constant_result
def _encode(check_values, *values) -> str:
    fields = {name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for name, v in zip(_FIELDS, values)}
    return json.dumps({"opts": fields, "check_values": check_values}, sort_keys=True)


def decode_options(text: str) -> Tuple[FusedOptions, bool]:
    data = json.loads(text)
    fields = dict(data["opts"])
    blocks = fields.get("block_configs")
    if blocks is not None:
        fields["block_configs"] = BlockConfigs(**{
            k: KernelConfig(**v) if isinstance(v, dict) else v for k, v in blocks.items()
        })
    return FusedOptions(**fields), data["check_values"]


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


@torch.library.custom_op(f"{_LIB}::logprobs_forward", mutates_args=())
def logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, options: str, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    opts, check_values = decode_options(options)
    N = hidden.shape[0]
    out = output_dtype(hidden.dtype)
    if N == 0:
        return _empty(hidden, out), _empty(hidden, out), _empty(hidden, out), _empty(hidden, out)
    if check_values:
        from .validation import check_values as run_value_checks

        run_value_checks(hidden, weight, bias, targets, opts.ignore_index)
    module = backends.get(backends.resolve(backend, hidden))
    logp, entropy, (lse, mean_z) = module.forward(hidden, weight, bias, targets, opts)
    valid = targets != opts.ignore_index
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero) if entropy is not None else _empty(hidden, out)
    return logp, entropy, lse.clone(), (mean_z.clone() if mean_z is not None else _empty(hidden, out))


@logprobs_forward.register_fake
def _(hidden, weight, bias, targets, options, backend):
    opts, _ = decode_options(options)
    N = hidden.shape[0]
    out = output_dtype(hidden.dtype)
    per_token = hidden.new_empty(N, dtype=out)
    maybe = hidden.new_empty(N if opts.return_entropy else 0, dtype=out)
    return per_token, maybe, hidden.new_empty(N, dtype=out), hidden.new_empty(N if opts.return_entropy else 0, dtype=out)


@torch.library.custom_op(f"{_LIB}::logprobs_backward", mutates_args=())
def logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, mean_z: Tensor,
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], options: str, backend: str,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    opts, _ = decode_options(options)
    need_bias = need_bias and bias is not None
    if hidden.shape[0] == 0 or (grad_logp is None and grad_entropy is None):
        dh = torch.zeros_like(hidden) if need_hidden else _empty(hidden)
        dw = torch.zeros_like(weight) if need_weight else _empty(weight)
        db = torch.zeros_like(bias) if need_bias else _empty(weight)
        return dh, dw, db
    valid = targets != opts.ignore_index
    g = torch.where(valid, grad_logp, 0.0) if grad_logp is not None else None
    e = torch.where(valid, grad_entropy, 0.0) if grad_entropy is not None else None
    module = backends.get(backends.resolve(backend, hidden))
    saved = (lse, mean_z if opts.return_entropy else None)
    dh, dw, db = module.backward(hidden, weight, bias, targets, saved, g, e, opts, (need_hidden, need_weight, need_bias))
    return (dh.to(hidden.dtype) if dh is not None else _empty(hidden),
            dw.to(weight.dtype) if dw is not None else _empty(weight),
            db.to(bias.dtype) if db is not None else _empty(weight))


@logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, mean_z, grad_logp, grad_entropy, options, backend,
      need_hidden, need_weight, need_bias):
    need_bias = need_bias and bias is not None
    return (torch.empty_like(hidden) if need_hidden else _empty(hidden),
            torch.empty_like(weight) if need_weight else _empty(weight),
            torch.empty_like(bias) if need_bias else _empty(weight))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, options, backend = inputs
    _, _, lse, mean_z = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, mean_z)
    ctx.options, ctx.backend = options, backend
    ctx.return_entropy = decode_options(options)[0].return_entropy


def _backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_mean_z):
    hidden, weight, bias, targets, lse, mean_z = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dh, dw, db = logprobs_backward(
        hidden, weight, bias, targets, lse, mean_z, grad_logp, grad_entropy if ctx.return_entropy else None,
        ctx.options, ctx.backend, need_h, need_w, need_b and bias is not None,
    )
    return (dh if need_h else None, dw if need_w else None, db if (need_b and bias is not None) else None,
            None, None, None)


torch.library.register_autograd(f"{_LIB}::logprobs_forward", _backward, setup_context=_setup_context)


def fused_logprobs(hidden2d, weight, bias, targets1d, opts: FusedOptions, backend: str, check_values: bool):
    """(logp [N], entropy [N] | None) through the custom ops; inputs already checked for shape/dtype."""
    logp, entropy, _, _ = logprobs_forward(hidden2d, weight, bias, targets1d, encode_options(opts, check_values), backend)
    return logp, (entropy if opts.return_entropy else None)


# ---- the public ops while Dynamo traces them (called from api.py) --------------------------------


def _refuse_vocab_parallel(vocab_parallel):
    if vocab_parallel is not None:
        raise NotImplementedError("vocab_parallel is not supported under torch.compile (its collectives are not "
                                  "custom ops); call the op outside the compiled region")


def traced_linear_logprobs(hidden, weight, targets, *, bias, temperature, ignore_index, return_entropy, filter_eps,
                           backend, softcap, backward, grad_matmul, buffer_bytes, check_values, block_configs,
                           vocab_parallel=None):
    from . import api
    from .reference import reference_logprobs
    from .validation import check_backend, check_head

    _refuse_vocab_parallel(vocab_parallel)
    hidden, weight, bias, autocast_off = api._autocast_inputs(hidden, weight, bias)
    check_head(hidden, weight, bias, targets, ignore_index)
    check_backend(backend)
    opts = api._options(hidden, temperature, ignore_index, return_entropy, filter_eps, backward, grad_matmul,
                        buffer_bytes, block_configs, check_values, softcap)
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    with autocast_off:
        if backend == "reference":
            logp, entropy = reference_logprobs(h, weight, bias, y, opts)
        else:
            logp, entropy = fused_logprobs(h, weight, bias, y, opts, backend, check_values)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp


def traced_linear_rlsc_loss(hidden, weight, targets, *, completion_mask, seq_index, bias, temperature, alpha,
                            weighting, reduction, ignore_index, filter_eps, backend, return_entropy, softcap,
                            num_sequences, backward, grad_matmul, buffer_bytes, check_values, block_configs,
                            vocab_parallel=None):
    from . import api
    from .weighting import rlsc_weights

    _refuse_vocab_parallel(vocab_parallel)

    if reduction not in api.REDUCTIONS:
        raise ValueError(f"reduction must be one of {api.REDUCTIONS}, got {reduction!r}")
    api._check_weighting(weighting)
    alpha = api._check_alpha(alpha)
    if hidden.dim() == 3:
        if seq_index is not None:
            raise ValueError("seq_index is for the packed form hidden [N, D]; the padded form [B, T, D] takes completion_mask")
        B, T = targets.shape[:2]
        if completion_mask is not None:
            from .validation import check_tensor

            check_tensor("completion_mask", completion_mask, dtypes=api._MASK_DTYPES)
            if tuple(completion_mask.shape) != (B, T):
                raise ValueError(f"completion_mask must have shape [{B}, {T}] like targets, got {list(completion_mask.shape)}")
            targets = torch.where(completion_mask != 0, targets, torch.full_like(targets, ignore_index))
        seq = torch.arange(B, device=hidden.device).repeat_interleave(T)
        S = B
    elif hidden.dim() == 2:
        if completion_mask is not None:
            raise ValueError("completion_mask is for the padded form hidden [B, T, D]; the packed form [N, D] takes seq_index")
        if seq_index is None:
            seq, S = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device), 1
        else:
            if num_sequences is None:
                raise ValueError("under torch.compile the packed form needs num_sequences= (the number of sequences "
                                 "S would otherwise need a device-to-host sync)")
            seq, S = seq_index.long(), api._check_num_sequences(num_sequences)
    else:
        raise ValueError(f"hidden must be [B, T, D] (padded form) or [N, D] (packed form), got shape {list(hidden.shape)}")
    token_out = traced_linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, filter_eps=filter_eps, backend=backend, softcap=softcap, backward=backward,
        grad_matmul=grad_matmul, buffer_bytes=buffer_bytes, check_values=check_values, block_configs=block_configs,
    )
    token_logp, token_entropy = token_out if return_entropy else (token_out, None)
    flat_logp = token_logp.reshape(-1)
    valid = targets.reshape(-1) != ignore_index
    n_tokens = torch.zeros(S, dtype=torch.int64, device=hidden.device).index_add(0, seq, valid.long())
    seq_logp = torch.zeros(S, dtype=flat_logp.dtype, device=hidden.device).index_add(0, seq, flat_logp)
    seq_weight = rlsc_weights(seq_logp, n_tokens, weighting, alpha)
    loss = -(seq_weight.to(seq_logp.dtype) * seq_logp).sum()
    if reduction == "mean":
        loss = loss / max(S, 1)
    return api.RLSCLossOutput(loss, seq_logp, seq_weight, token_logp, n_tokens, token_entropy)
