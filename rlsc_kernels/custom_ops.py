"""The fused op as registered PyTorch custom ops, so torch.compile can capture code that calls it.

    @torch.compile(fullgraph=True)
    def step(hidden, weight, targets):
        return rk.linear_logprobs(hidden, weight, targets, temperature=0.7).sum()

``linear_logprobs`` and ``linear_rlsc_loss`` take this route by themselves while Dynamo traces
them (``torch.compiler.is_compiling()``); eager calls keep the autograd.Function route. Two ops:
    rlsc_kernels::logprobs_forward(hidden [N, D], weight [V, D], bias [V]?, targets [N], temperature [] or [N],
        options, backend)
        -> (logp [N], entropy [N] or [0], lse [N], mean_z [N] or [0])
    rlsc_kernels::logprobs_backward(hidden, weight, bias, targets, lse, logp, mean_z, grad_logp?, grad_entropy?,
        temperature, options, backend, need_hidden, need_weight, need_bias) -> (dhidden, dweight, dbias; [0] when not needed)
tied together with torch.library.register_autograd. Their fake (meta) versions give output shapes
in terms of N, so a new token count is a new symbolic size, not a recompilation (after Dynamo's
usual one recompilation that marks the size dynamic).

Inside the ops the code is eager and opaque to the compiler: the backend is resolved there
("auto" -> Triton on CUDA, native / PyTorch on CPU), and the value checks (target ids, NaN/inf)
run there with their one host sync unless check_values=False. The options travel as a JSON string
(custom-op schemas take only primitive types; this keeps the schema fixed as FusedOptions grows).

The temperature is a 0-d float64 tensor argument, not part of the options string: a schedule
that changes it every step (a Python float Dynamo makes dynamic, or a 0-d tensor) is a new value
of a graph input, not a new graph. Alpha only enters the weights, plain tensor arithmetic. A
per-token temperature is the same argument shaped [N]: the ops run the backend through
temperature.PerTokenTemperature, so its grouping by distinct value (data-dependent: one host
read of the values) happens inside the op, where the compiler does not look, and the whole call
still captures with fullgraph=True.

Autocast: the public ops pass the fp32 master tensors and name the autocast dtype in the options
string; the ops cast inside and return the masters' gradients unrounded. The ops' bodies run with
autocast off, so a direct call of torch.ops.rlsc_kernels.logprobs_forward inside an autocast
region computes in its inputs' dtypes unless the options name a compute dtype.

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
from .autograd import scored
from .dtypes import output_dtype
from .options import BlockConfigs, FusedOptions, KernelConfig
from .temperature import BAD_TEMPERATURE, PerTokenTemperature, bad_temperature

_LIB = "rlsc_kernels"


#: FusedOptions' field names, in order: the options are encoded field by field.
_FIELDS = tuple(f.name for f in dataclasses.fields(FusedOptions))


def encode_options(opts: FusedOptions, check_values: bool, compute_dtype: Optional[torch.dtype] = None) -> str:
    """The options as the JSON string the ops take (traceable: see _encode). compute_dtype: the
    autocast dtype the ops cast hidden, weight and bias to (they take the master tensors)."""
    dtype_name = None if compute_dtype is None else str(compute_dtype).replace("torch.", "")
    return _encode(bool(check_values), dtype_name, *(getattr(opts, name) for name in _FIELDS))


# Dynamo cannot trace json; the string depends on constants only, so it is computed at trace time
# and baked into the graph. Fields go one by one: Dynamo passes a dataclass built inside the
# traced frame to such a function with its default field values.
@torch._dynamo.assume_constant_result
def _encode(check_values, compute_dtype, *values) -> str:
    fields = {name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for name, v in zip(_FIELDS, values)}
    return json.dumps({"opts": fields, "check_values": check_values, "compute_dtype": compute_dtype}, sort_keys=True)


def decode_options(text: str, temperature: Optional[Tensor] = None) -> Tuple[FusedOptions, bool]:
    """(FusedOptions, check_values) from the ops' string; with `temperature` (the 0-d tensor the
    ops take) its value, checked here where the op runs (a host read: free for the CPU tensor
    a Python float becomes, one sync for a CUDA tensor)."""
    data = json.loads(text)
    fields = dict(data["opts"])
    blocks = fields.get("block_configs")
    if blocks is not None:
        fields["block_configs"] = BlockConfigs(**{
            k: KernelConfig(**v) if isinstance(v, dict) else v for k, v in blocks.items()
        })
    if temperature is not None and temperature.dim() == 0:  # [N]: per token (PerTokenTemperature)
        t = float(temperature)
        if not (0.0 < t < float("inf")):
            raise ValueError(f"temperature must be a finite float > 0, got {t!r}")
        fields["temperature"] = t
    return FusedOptions(**fields), data["check_values"]


def _compute_inputs(hidden, weight, bias, options: str):
    """(hidden, weight, bias, opts) as the backend sees them: cast to the autocast dtype the
    options name (masters in, so the gradients go back unrounded: autograd.py), with
    dweight_fp32 for an fp32 master weight."""
    dtype_name = json.loads(options).get("compute_dtype")
    if dtype_name is None:
        return hidden, weight, bias, False
    dtype = getattr(torch, dtype_name)
    wide = weight.dtype == torch.float32 and dtype != torch.float32
    cast = lambda t: t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), wide


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


@torch.library.custom_op(f"{_LIB}::logprobs_forward", mutates_args=())
def logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: Tensor, options: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # the backends pick their own precisions: an autocast region around a direct call of the op
    # must not recast their fp32 matmuls (the autocast dtype comes in the options)
    with torch.autocast(hidden.device.type, enabled=False):
        return _logprobs_forward(hidden, weight, bias, targets, temperature, options, backend)


def _logprobs_forward(hidden, weight, bias, targets, temperature, options, backend):
    opts, check_values = decode_options(options, temperature)
    hidden, weight, bias, _ = _compute_inputs(hidden, weight, bias, options)
    N = hidden.shape[0]
    out = output_dtype(hidden.dtype)
    if N == 0:
        return _empty(hidden, out), _empty(hidden, out), _empty(hidden, out), _empty(hidden, out)
    if check_values:
        from .validation import check_values as run_value_checks

        extra = {BAD_TEMPERATURE: bad_temperature(temperature)} if temperature.dim() else None
        run_value_checks(hidden, weight, bias, targets, opts.ignore_index, extra)
    module = _backend(backend, hidden, temperature)
    logp, entropy, (lse, mean_z, *_) = module.forward(hidden, weight, bias, targets, opts)
    valid = scored(targets, opts.ignore_index, weight.shape[0])
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero) if entropy is not None else _empty(hidden, out)
    return logp, entropy, lse.clone(), (mean_z.clone() if mean_z is not None else _empty(hidden, out))


def _backend(backend: str, hidden: Tensor, temperature: Tensor):
    """The backend module the op runs, wrapped for a per-token temperature [N]."""
    module = backends.get(backends.resolve(backend, hidden))
    return PerTokenTemperature(module, temperature) if temperature.dim() else module


@logprobs_forward.register_fake
def _(hidden, weight, bias, targets, temperature, options, backend):
    opts, _ = decode_options(options)
    N = hidden.shape[0]
    out = output_dtype(hidden.dtype)
    per_token = hidden.new_empty(N, dtype=out)
    maybe = hidden.new_empty(N if opts.return_entropy else 0, dtype=out)
    return per_token, maybe, hidden.new_empty(N, dtype=out), hidden.new_empty(N if opts.return_entropy else 0, dtype=out)


@torch.library.custom_op(f"{_LIB}::logprobs_backward", mutates_args=())
def logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, logp: Tensor,
    mean_z: Tensor, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], temperature: Tensor, options: str,
    backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):  # as in logprobs_forward
        return _logprobs_backward(hidden, weight, bias, targets, lse, logp, mean_z, grad_logp, grad_entropy,
                                  temperature, options, backend, need_hidden, need_weight, need_bias)


def _logprobs_backward(hidden, weight, bias, targets, lse, logp, mean_z, grad_logp, grad_entropy, temperature,
                       options, backend, need_hidden, need_weight, need_bias):
    opts, _ = decode_options(options, temperature)
    need_bias = need_bias and bias is not None
    if hidden.shape[0] == 0 or (grad_logp is None and grad_entropy is None):
        dh = torch.zeros_like(hidden) if need_hidden else _empty(hidden)
        dw = torch.zeros_like(weight) if need_weight else _empty(weight)
        db = torch.zeros_like(bias) if need_bias else _empty(weight)
        return dh, dw, db
    masters = (hidden, weight, bias)
    hidden, weight, bias, wide = _compute_inputs(hidden, weight, bias, options)
    if wide:
        opts = dataclasses.replace(opts, dweight_fp32=True)
    valid = scored(targets, opts.ignore_index, weight.shape[0])
    g = torch.where(valid, grad_logp, 0.0) if grad_logp is not None else None
    e = torch.where(valid, grad_entropy, 0.0) if grad_entropy is not None else None
    module = _backend(backend, hidden, temperature)
    saved = (lse, mean_z if opts.return_entropy else None, logp)
    dh, dw, db = module.backward(hidden, weight, bias, targets, saved, g, e, opts, (need_hidden, need_weight, need_bias))
    hidden, weight, bias = masters  # the one rounding: to the masters' dtypes
    return (dh.to(hidden.dtype) if dh is not None else _empty(hidden),
            dw.to(weight.dtype) if dw is not None else _empty(weight),
            db.to(bias.dtype) if db is not None else _empty(weight))


@logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, logp, mean_z, grad_logp, grad_entropy, temperature, options, backend,
      need_hidden, need_weight, need_bias):
    need_bias = need_bias and bias is not None
    return (torch.empty_like(hidden) if need_hidden else _empty(hidden),
            torch.empty_like(weight) if need_weight else _empty(weight),
            torch.empty_like(bias) if need_bias else _empty(weight))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, options, backend = inputs
    logp, _, lse, mean_z = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, logp, mean_z, temperature)
    ctx.options, ctx.backend = options, backend
    ctx.return_entropy = decode_options(options)[0].return_entropy


def _backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_mean_z):
    hidden, weight, bias, targets, lse, logp, mean_z, temperature = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dh, dw, db = logprobs_backward(
        hidden, weight, bias, targets, lse, logp, mean_z, grad_logp, grad_entropy if ctx.return_entropy else None,
        temperature, ctx.options, ctx.backend, need_h, need_w, need_b and bias is not None,
    )
    return (dh if need_h else None, dw if need_w else None, db if (need_b and bias is not None) else None,
            None, None, None, None)


torch.library.register_autograd(f"{_LIB}::logprobs_forward", _backward, setup_context=_setup_context)


def fused_logprobs(hidden2d, weight, bias, targets1d, opts: FusedOptions, backend: str, check_values: bool,
                   temperature: Tensor, compute_dtype: Optional[torch.dtype] = None):
    """(logp [N], entropy [N] | None) through the custom ops; inputs already checked for shape/dtype.
    temperature: 0-d tensor, or [N] per token (opts.temperature is ignored: the options string stays one constant
    while a schedule changes the temperature). compute_dtype: under autocast, hidden2d, weight
    and bias are the masters and the ops cast them."""
    logp, entropy, _, _ = logprobs_forward(hidden2d, weight, bias, targets1d, temperature,
                                           encode_options(opts, check_values, compute_dtype), backend)
    return logp, (entropy if opts.return_entropy else None)


# ---- the public ops while Dynamo traces them (called from api.py with the plan) -------------


def _temperature_tensor(temperature) -> Tensor:
    """The plan's temperature as the 0-d float64 tensor the ops take. A Python float that Dynamo
    made dynamic stays symbolic through `ones * t` (torch.as_tensor(t) would guard on its value
    and recompile for every new one); a 0-d tensor is passed as it is."""
    if isinstance(temperature, Tensor):
        return temperature.detach().to(torch.float64)
    return torch.ones((), dtype=torch.float64) * temperature


def traced_logprobs(hidden, weight, bias, targets, plan, autocast_off, masters=None):
    """linear_logprobs under Dynamo: hidden, weight, bias already cast and checked by the plan;
    masters: the same before an autocast cast (the ops then cast, and return unrounded grads)."""
    opts = plan.opts
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    token_t = plan.token_temperature
    temperature = _temperature_tensor(plan.temperature) if token_t is None else token_t.to(torch.float64)
    with autocast_off:
        if plan.backend == "reference":
            t = temperature if token_t is None else token_t.to(output_dtype(h.dtype))[:, None]
            logp, entropy = reference_logprobs_scaled(h, weight, bias, y, opts, t)
        elif plan.compute_dtype is not None and masters is not None:
            mh = masters[0].reshape(-1, masters[0].shape[-1])
            logp, entropy = fused_logprobs(mh, masters[1], masters[2], y, opts, plan.backend, plan.check_values,
                                           temperature, plan.compute_dtype)
        else:
            logp, entropy = fused_logprobs(h, weight, bias, y, opts, plan.backend, plan.check_values, temperature)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if opts.return_entropy else logp


def reference_logprobs_scaled(hidden, weight, bias, targets, opts, temperature: Tensor):
    """reference.reference_logprobs with a tensor temperature (traceable; opts.temperature is 1)."""
    from .reference import reference_logprobs

    return reference_logprobs(hidden, weight, bias, targets, opts, temperature=temperature)


def traced_rlsc_loss(hidden, weight, bias, targets, completion_mask, seq_index, plan, autocast_off, masters=None):
    """linear_rlsc_loss under Dynamo, from the per-token custom op (module docstring)."""
    from .plan import MASK_DTYPES, RLSCLossOutput
    from .validation import check_tensor
    from .weighting import rlsc_weights

    op = plan.op
    ignore_index = op.opts.ignore_index
    if completion_mask is not None and seq_index is not None:
        raise ValueError("pass either completion_mask (padded form) or seq_index (packed form), not both")
    if hidden.dim() == 3:
        if seq_index is not None:
            raise ValueError("seq_index is for the packed form hidden [N, D]; the padded form [B, T, D] takes completion_mask")
        if plan.num_sequences is not None:
            raise ValueError("num_sequences is for the packed form hidden [N, D]; the padded form has one sequence per row")
        B, T = targets.shape[:2]
        if completion_mask is not None:
            check_tensor("completion_mask", completion_mask, dtypes=MASK_DTYPES)
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
            if plan.num_sequences is None:
                raise ValueError("under torch.compile the packed form needs num_sequences= (the number of sequences "
                                 "S would otherwise need a device-to-host sync)")
            seq, S = seq_index.long(), plan.num_sequences
    else:
        raise ValueError(f"hidden must be [B, T, D] (padded form) or [N, D] (packed form), got shape {list(hidden.shape)}")
    token_out = traced_logprobs(hidden, weight, bias, targets, op, autocast_off, masters)
    token_logp, token_entropy = token_out if op.opts.return_entropy else (token_out, None)
    flat_logp = token_logp.reshape(-1)
    valid = scored(targets.reshape(-1), ignore_index, weight.shape[0])  # as the eager loss's n_tokens
    n_tokens = torch.zeros(S, dtype=torch.int64, device=hidden.device).index_add(0, seq, valid.long())
    seq_logp = torch.zeros(S, dtype=flat_logp.dtype, device=hidden.device).index_add(0, seq, flat_logp)
    seq_weight = rlsc_weights(seq_logp, n_tokens, plan.weighting, plan.alpha)
    loss = -(seq_weight.to(seq_logp.dtype) * seq_logp).sum()
    if plan.reduction == "mean":
        loss = loss / max(S, 1)
    return RLSCLossOutput(loss, seq_logp, seq_weight, token_logp, n_tokens, token_entropy)
