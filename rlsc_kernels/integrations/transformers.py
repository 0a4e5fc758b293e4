"""A fused LM head for any Hugging Face causal LM.

    from rlsc_kernels.integrations.transformers import add_fused_lm_head
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.log_probs   # [B, T-1] float32: position t scores labels[:, t+1]; 0 where that label is -100
    out.entropy     # [B, T-1] float32 (only when asked for in `outputs`)
    out.loss        # mean NLL over the scored tokens (or their sum / num_items_in_batch)

The call convention and output shapes are those of TRL's ``add_fused_lm_head`` (TRL >= 1.16), so
code written for one runs on the other. Without ``fused_lm_head=True`` the model's own forward
runs untouched, so generation is unchanged.

What the head is made of is looked up on every call, never cached at patch time: FSDP and PEFT
replace modules after the patch, and a config may be edited. Per call:
  - backbone: ``model.base_model``; head: ``model.get_output_embeddings()`` (tied embeddings are
    the same Parameter, so they just work);
  - logit scaling from the text config: ``logit_scale`` / ``output_multiplier`` /
    ``lm_head_multiplier`` multiply the logits, ``logits_scaling`` divides them (multiplies on
    HyperCLOVA X), as each model's own forward does; ``final_logit_softcapping`` goes to the op's
    ``softcap=``. Order, as in the models and their sampling: z = cap * tanh(scale * (W h + b) / cap) / T,
    computed by the op as (cap/scale) * tanh((W h + b) / (cap/scale)) / (T/scale): the scale is
    folded into the op's temperature and cap (in fp32), never into 16-bit hidden states.
    FusedHead is the one adapter from a model to the op's inputs (also used by the RLSC trainer);
  - PEFT LoRA on the head is scored through the adapter: logits = W h + s B A dropout(h) =
    [W, B] . [h, s A dropout(h)], so the op sees hidden' = cat(h, s * dropout(h) A^T) and
    weight' = cat(W, B) (one [V, D + r] copy of the head per call);
  - FSDP2: when the head's weight is a sharded DTensor at call time, the op runs inside the
    forward of the FSDP module that owns it (run_in_owner_forward, through
    ``register_fsdp_forward_method``): FSDP gathers the weight in its ``param_dtype``, casts the
    inputs, re-gathers it for the backward and reduce-scatters its gradient, exactly as for
    ``lm_head(hidden)``. No DTensor meets a Tensor;
  - the head may sit on another device than the body (``device_map``): hidden states and labels
    are moved to the head's device.
Only the scored positions (label != -100) are sent to the head. A micro-batch with no scored
position returns zeros that are connected to the graph (backward works, gradients are zero).
"""
from __future__ import annotations

import contextlib
import functools
import math
import types
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..api import linear_logprobs
from ..backends.native import bf16_linear as native_bf16_linear

#: Per-token outputs this head computes (TRL's extra statistics are not offered).
OUTPUTS = ("log_probs", "entropy")
#: Name of the method added to an FSDP2 module that owns the head's parameters.
_FSDP_METHOD = "_rlsc_fused_head"

try:
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover - transformers is a dependency of the package
    ModelOutput = object


@dataclass
class FusedLMHeadOutput(ModelOutput):
    """What ``model(..., fused_lm_head=True)`` returns (field names as in TRL's FusedCausalLMOutput).

    loss: scalar, -sum(log_probs) / num_items_in_batch (default: the number of scored tokens,
        at least 1), in the log-probs' dtype.
    log_probs: [B, T-1] (or [B, T] with shift_labels) float32 log-prob of each next-token label
        under softmax(logits / temperature); 0 where the label is -100.
    entropy: same shape, entropy of that distribution (None unless "entropy" is in `outputs`).
    label_mask: same shape, bool: which positions were scored.
    aux_loss: MoE load-balancing loss when router logits are requested (output_router_logits, or
        the config's), already added to loss with the config's router_aux_loss_coef; else None.
    """

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _HeadSettings:
    temperature: float
    outputs: Tuple[str, ...]
    cast_lm_head_to_fp32: bool
    op_kwargs: tuple  # (name, value) pairs forwarded to linear_logprobs


def logit_transform(config) -> Tuple[float, Optional[float]]:
    """(scale, softcap) of a model's logits, read from its (text) config: the model computes
    logits = softcap * tanh(scale * lm_head(h) / softcap) (softcap None: scale * lm_head(h))."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            scale = float(value)
            break
    else:
        divisor = getattr(text_config, "logits_scaling", None)
        if divisor is not None:
            model_type = str(getattr(text_config, "model_type", ""))
            scale = float(divisor) if model_type.startswith("hyperclovax") else 1.0 / float(divisor)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap is not None else None)


def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(x, DTensor)


def _lora_parts(head) -> list:
    """Active LoRA adapters of a PEFT-wrapped head as (A [r, D], B [V, r], B's bias, scaling,
    dropout); [] for a plain head or a head whose adapters are merged or disabled."""
    if not (hasattr(head, "base_layer") and hasattr(head, "lora_A")):
        return []
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return []
    parts = []
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if getattr(head, "use_dora", {}).get(name, False):
            raise NotImplementedError(
                f"the fused LM head does not support DoRA (adapter {name!r} on the LM head); "
                "use plain LoRA on lm_head, or merge the adapter first"
            )
        lora_b = head.lora_B[name]
        parts.append((head.lora_A[name].weight, lora_b.weight, lora_b.bias, head.scaling[name], head.lora_dropout[name]))
    return parts


def _is_lora_layer(head) -> bool:
    return hasattr(head, "base_layer") and hasattr(head, "lora_A")


def _head_weight(head) -> torch.Tensor:
    """The [V, D] weight of a head (of its base layer under PEFT LoRA)."""
    return (head.base_layer if _is_lora_layer(head) else head).weight


class _SharedWeight(torch.autograd.Function):
    """Hands the op a weight prepared once (cast to the compute dtype and/or LoRA's B appended
    along D) and routes its gradient back to the source parameters on every use. A plain
    `weight.to(bf16)` per call would make a new [V, D] copy every time."""

    @staticmethod
    def forward(ctx, prepared, *sources):
        ctx.widths = [src.shape[1] for src in sources]
        ctx.dtypes = [src.dtype for src in sources]
        return prepared.view_as(prepared)

    @staticmethod
    def backward(ctx, grad):
        parts = grad.split(ctx.widths, dim=1)
        return (None, *(g.to(dt) if need else None
                        for g, dt, need in zip(parts, ctx.dtypes, ctx.needs_input_grad[1:])))


class FusedHead:
    """The LM head of a transformers causal LM (or a PEFT model around one) as the fused op sees
    it: the one adapter from a model to the op's inputs, used by add_fused_lm_head, by the RLSC
    trainer's two engines for scoring, and by its samplers for the logits they draw from.

    The model's logits are  z = softcap * tanh(scale * (W h + b) / softcap)  (no softcap: scale *
    (W h + b)), scale and softcap read from the config by logit_transform. The op gets
        inputs(h)          -> hidden' [n, D'], weight' [V, D'], bias' [V] | None in one compute dtype
                              (LoRA on the head: hidden' = [h, s * dropout(h) A^T], weight' = [W, B])
        op_options(T)      -> {"temperature": T / scale, "softcap": softcap / scale | None}
    so that softmax(op logits) = softmax(z / T) exactly in real arithmetic (the scale is applied
    in fp32 through the temperature, never by rounding scale * h to 16 bits).
    logits(h, T) materialises what the op computes, in float32: [n, V] = transform(hidden'
    @ weight'^T + bias') / T from the same 16-bit inputs, products exact and sums in fp32. A
    sampler that draws from softmax(logits(h, T)) draws from the distribution the loss scores.

    dtype: the compute dtype (default: the autocast dtype of the weight's device where autocast
    is on at construction, else the weight's dtype). reuse_weight=True prepares weight' once
    (for all micro-batches of one optimizer step; its gradient reaches the parameters on every
    use); the default prepares it per call, as needed under FSDP2, where the parameters are
    plain tensors only inside the owning module's forward (see run_in_owner_forward).
    Raises NotImplementedError for a head that is not a plain Linear ([V, D] weight), a
    non-positive or non-finite scale or softcap, or DoRA on the head.
    """

    def __init__(self, model, *, dtype: Optional[torch.dtype] = None, head=None, reuse_weight: bool = False):
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = head if head is not None else base_model.get_output_embeddings()
        if head is None:
            raise NotImplementedError(f"{type(base_model).__name__} has no output embeddings (get_output_embeddings() is None)")
        base = head.base_layer if _is_lora_layer(head) else head
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise NotImplementedError(
                f"the model's lm_head ({type(head).__name__}) is not a plain Linear layer with a floating [V, D] weight; "
                "the fused op cannot score through it (quantised or wrapped heads are not supported)")
        scale, softcap = logit_transform(base_model.config)
        if not (math.isfinite(scale) and scale > 0):
            raise NotImplementedError(f"the model scales its logits by {scale}; only a positive finite scale can be "
                                      "folded into the temperature")
        if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
            raise NotImplementedError(f"the model soft-caps its logits at {softcap}; only a positive finite cap is supported")
        self.head, self.scale, self.softcap = head, scale, softcap
        if dtype is None:
            device_type = weight.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        self.dtype = dtype
        bias = getattr(base, "bias", None)
        self.lora, sources = [], [weight]
        for lora_a, lora_b, lora_b_bias, scaling, dropout in _lora_parts(head):
            self.lora.append((lora_a, scaling, dropout))
            sources.append(lora_b)
            if lora_b_bias is not None:
                extra = lora_b_bias * scaling
                bias = extra if bias is None else bias + extra
        self.bias, self._sources = bias, sources
        self.weight_copies = 0
        self._prepared = self._prepared_fp32 = None
        self._reuse = reuse_weight
        if reuse_weight and (len(sources) > 1 or dtype != weight.dtype):
            with torch.no_grad():
                self._prepared = torch.cat([src.detach().to(dtype) for src in sources], dim=1)
            self.weight_copies = 1

    def inputs(self, hidden: torch.Tensor):
        """(hidden' [n, D'], weight' [V, D'], bias' [V] or None) in the compute dtype, connected to the
        model's parameters, for hidden [n, D] (the body's final states)."""
        if self.lora:   # outside autocast, so samplers and the loss (inside or outside it) agree
            with torch.autocast(hidden.device.type, enabled=False):
                extra = [(dropout(hidden).to(a.dtype) @ a.T) * scaling for a, scaling, dropout in self.lora]
            hidden = torch.cat([hidden, *(e.to(hidden.dtype) for e in extra)], dim=-1)
        if self._prepared is not None:
            weight = _SharedWeight.apply(self._prepared, *self._sources)
        elif len(self._sources) == 1:
            weight = self._sources[0].to(self.dtype)
        else:
            weight = torch.cat([src.to(self.dtype) for src in self._sources], dim=1)
        bias = self.bias.to(self.dtype) if self.bias is not None else None
        return hidden.to(self.dtype), weight, bias

    def op_options(self, temperature: float) -> dict:
        """The op's temperature= and softcap= keywords for sampling temperature T: the logit scale
        folded into both (c tanh(s x / c) / T = (c/s) tanh(x / (c/s)) / (T/s))."""
        return {"temperature": temperature / self.scale,
                "softcap": None if self.softcap is None else self.softcap / self.scale}

    def linear(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [..., V]: hidden' @ weight'^T + bias' from the compute-dtype inputs (16-bit
        products are exact in fp32, sums in fp32), before the logit scale and soft-cap: what the
        lm_head module would return if it computed as the op does."""
        lead = hidden.shape[:-1]
        h, w, b = self.inputs(hidden.reshape(-1, hidden.shape[-1]))
        with torch.autocast(h.device.type, enabled=False):   # autocast would round the logits to 16 bits
            z = None
            if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
                try:   # fp32 output of a 16-bit GEMM: no fp32 copy of the [V, D] weight
                    z = torch.mm(h, w.T, out_dtype=torch.float32)
                except (RuntimeError, TypeError, NotImplementedError):
                    z = None
            if z is None and not (torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)):
                z = native_bf16_linear(h, w)   # bf16 on the CPU's bf16 units: fp32 output, no fp32 weight copy
            if z is None:
                z = h.float() @ self._fp32_weight(w).T
            if b is not None:
                z = z + b.float()
        return z.reshape(*lead, z.shape[-1])

    def _fp32_weight(self, w: torch.Tensor) -> torch.Tensor:
        """w [V, D'] in float32 (exact: every 16-bit value is an fp32 value). With reuse_weight and
        no gradient wanted, made once and kept: a decode loop's every step reuses it (on CPU the
        per-step copy of a 16-bit [V, D] weight cost more than the body's bf16 saving)."""
        if w.dtype == torch.float32:
            return w
        if not self._reuse or (torch.is_grad_enabled() and w.requires_grad):
            return w.float()
        if self._prepared_fp32 is None:
            self._prepared_fp32 = w.detach().float()
        return self._prepared_fp32

    def logits(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """float32 [n, V]: the logits / T the op scores, from hidden [n, D] (what a sampler draws from)."""
        opts = self.op_options(temperature)
        z = self.linear(hidden)
        with torch.autocast(z.device.type, enabled=False):
            if opts["softcap"] is not None:
                z = opts["softcap"] * torch.tanh(z / opts["softcap"])
            return z / opts["temperature"]


@dataclass
class HeadInputs:
    """What the op needs to score a model's head (see FusedHead): hidden [n, D'] and weight [V, D']
    in one dtype, bias [V] or None, and the op's keywords for a sampling temperature from
    op_options(T) (temperature and softcap with the model's logit scale folded in). Every tensor
    stays connected to the model's parameters (gradients reach W, LoRA A and B, the bias)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float
    softcap: Optional[float]

    def op_options(self, temperature: float) -> dict:
        return {"temperature": temperature / self.scale,
                "softcap": None if self.softcap is None else self.softcap / self.scale}


def head_inputs(model, hidden: torch.Tensor, *, dtype: Optional[torch.dtype] = None, head=None) -> HeadInputs:
    """The op's inputs for a causal LM's head and its final hidden states hidden [n, D]: FusedHead
    (model, dtype=dtype, head=head) applied once. Call
        rk.linear_logprobs(i.hidden, i.weight, targets, bias=i.bias, **i.op_options(T))
    The head's parameters must be plain tensors here (under FSDP2: inside its forward, see
    run_in_owner_forward)."""
    fused = FusedHead(model, dtype=dtype, head=head)
    h, w, b = fused.inputs(hidden)
    return HeadInputs(h, w, b, fused.scale, fused.softcap)


def scaled_op_inputs(hidden, weight, bias, scale: float, dtype: Optional[torch.dtype], *, default_dtype: torch.dtype):
    """(hidden, weight, bias) in one compute dtype with a logit scale folded in: `dtype`, else
    the autocast dtype of the weight's device where autocast is on, else `default_dtype`.
    scale * (W h + b) = W (scale * h) + scale * b, so the op sees already-scaled logits (TRL's
    head convention, used by integrations.trl)."""
    device_type = weight.device.type
    if dtype is None:
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default_dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if scale != 1.0:
        hidden = hidden * scale
        bias = bias * scale if bias is not None else None
    return hidden, weight, bias


@torch.no_grad()
def check_head_matches_forward(model, input_ids: torch.Tensor, *, dtype: Optional[torch.dtype] = None) -> float:
    """Raises NotImplementedError if FusedHead's logits differ from the model's own forward logits
    for input_ids [1, L] (run under the caller's autocast, if any); returns the max difference.

    FusedHead knows the head transforms of the transformers models it was written against; a model
    that does something else to its logits (a hidden-state multiplier, an unknown attribute) would
    otherwise be trained on a distribution it does not sample from. The tolerance is 8 eps of the
    coarser of the compute and logits dtypes times the largest logit."""
    fused = FusedHead(model, dtype=dtype)
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    logits = model(input_ids=input_ids).logits[0].float()
    out = base_model.base_model(input_ids=input_ids)
    hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]
    z = fused.logits(hidden.to(fused._sources[0].device))
    eps = max(torch.finfo(fused.dtype).eps, torch.finfo(logits.dtype).eps)
    tol = 8 * eps * float(logits.abs().max()) + 1e-5
    err = float((z - logits.to(z.device)).abs().max())
    if not err <= tol:
        raise NotImplementedError(
            f"the model's logits are not softcap(scale * (W h + b)) of its lm_head (max difference {err:.3g} > "
            f"{tol:.3g}): it transforms its logits in a way the fused head does not know, so the op would score a "
            f"different distribution than the one the model samples from")
    return err


def run_in_owner_forward(model, module, fn, *args):
    """fn(*args), run inside the forward of the FSDP2 module that owns `module` when `module`'s
    weight is a sharded DTensor (register_fsdp_forward_method: FSDP gathers the parameters in its
    param_dtype, casts the inputs, re-gathers them for the backward and reduce-scatters their
    gradients, exactly as for module(x)); a plain call otherwise. No DTensor meets a Tensor."""
    weight = getattr(module.base_layer if _is_lora_layer(module) else module, "weight", None)
    if not _is_dtensor(weight):
        return fn(*args)
    owner = _fsdp_owner(model, module)
    if owner is None:
        raise RuntimeError(
            f"the weight of {type(module).__name__} is a DTensor but no FSDP2 module (fully_shard) owns it; "
            "the fused head needs the weight gathered by FSDP's forward")
    if _FSDP_METHOD not in owner.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        def run(self, fn, *args):
            return fn(*args)

        setattr(owner, _FSDP_METHOD, types.MethodType(run, owner))
        register_fsdp_forward_method(owner, _FSDP_METHOD)
    return getattr(owner, _FSDP_METHOD)(fn, *args)


def _score_tokens(model, head, hidden: torch.Tensor, targets: torch.Tensor, settings: _HeadSettings):
    """Per-token (log_probs, entropy|None) of the scored tokens: hidden [n, D], targets [n] (all
    scored, n >= 1). Runs where the head's parameters are plain tensors."""
    # Under autocast the op itself casts (so the head's fp32 master gradient is never rounded to
    # 16 bits: a GradScaler-scaled gradient neither overflows nor flushes); without autocast, or
    # with cast_lm_head_to_fp32, the inputs are cast here and the op runs with autocast off.
    keep_autocast = torch.is_autocast_enabled(hidden.device.type) and not settings.cast_lm_head_to_fp32
    if keep_autocast:
        dtype = _head_weight(head if head is not None else model.get_output_embeddings()).dtype
    else:
        dtype = torch.float32 if settings.cast_lm_head_to_fp32 else None
    fused = FusedHead(model, head=head, dtype=dtype)
    h, w, b = fused.inputs(hidden)
    kwargs = dict(settings.op_kwargs, **fused.op_options(settings.temperature))
    want_entropy = "entropy" in settings.outputs
    region = contextlib.nullcontext() if keep_autocast else torch.autocast(w.device.type, enabled=False)
    with region:
        result = linear_logprobs(h, w, targets, bias=b, return_entropy=want_entropy, **kwargs)
    return result if want_entropy else (result, None)


def _fsdp_owner(model, head):
    """The innermost FSDP2 module whose forward gathers the head's parameters (head or ancestor)."""
    from torch.distributed.fsdp import FSDPModule

    owner = None
    for _, module in model.named_modules():
        if isinstance(module, FSDPModule) and any(m is head for m in module.modules()):
            owner = module  # named_modules is pre-order: later matches are deeper
    return owner


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _fused_head_forward(model, settings: _HeadSettings, args, kwargs, labels, shift_labels, num_items_in_batch):
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs labels (or pre-shifted shift_labels) to score")
    kwargs["use_cache"] = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # MoE models: router logits when asked for or when the config asks, as the model's own forward.
    want_router = bool(kwargs.get("output_router_logits", getattr(text_config, "output_router_logits", False)))
    if want_router:
        kwargs["output_router_logits"] = True
    body = model.base_model
    if body is model:
        raise TypeError(f"{type(model).__name__}.base_model is the model itself: no backbone to take hidden states from")
    body_out = body(*args, **kwargs)
    hidden = body_out.last_hidden_state if hasattr(body_out, "last_hidden_state") else body_out[0]
    body_hidden = hidden
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape {list(hidden.shape[:-1])} (batch, positions), got {list(targets.shape)}"
        )
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    head_device = head.weight.device
    hidden, targets = hidden.to(head_device), targets.to(head_device)
    mask = targets != -100
    n_scored = int(mask.sum())  # the one host sync; boolean indexing below needs it anyway
    if n_scored > 0:
        h, y = hidden[mask], targets[mask]
    else:
        # No scored position (every label -100, or none left after the label shift: one-token
        # inputs), as TRL: a zero loss. Score one dummy token that masked_scatter then drops, so
        # the zeros stay connected to the body and the head (backward works, every gradient is 0,
        # and under FSDP every rank reduces the head's gradient as usual; a raising rank would
        # kill a DDP job).
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] == 0:
            rows = body_hidden.to(head_device).reshape(-1, body_hidden.shape[-1])
        if rows.shape[0] == 0:  # no position at all (an empty batch): zeros tied to the head
            zero = head.weight.sum() * 0.0 + body_hidden.sum().to(head_device) * 0.0
            log_probs = zero.expand(mask.shape).to(torch.float32)
            entropy = log_probs if "entropy" in settings.outputs else None
            return FusedLMHeadOutput(loss=zero.float(), log_probs=log_probs, entropy=entropy, label_mask=mask,
                                     aux_loss=None)
        h, y = rows[:1], torch.zeros(1, dtype=targets.dtype, device=head_device)
    score = functools.partial(_score_tokens, model, head, settings=settings)
    token_logp, token_entropy = run_in_owner_forward(model, head, score, h, y)
    log_probs = _scatter(token_logp, mask)
    entropy = _scatter(token_entropy, mask) if token_entropy is not None else None
    denominator = num_items_in_batch if num_items_in_batch is not None else max(n_scored, 1)
    loss = -log_probs.sum() / denominator
    aux_loss = None
    if want_router and getattr(body_out, "router_logits", None) is not None:
        aux_loss, coef = _router_aux_loss(model, text_config, body_out.router_logits, kwargs.get("attention_mask"))
        loss = loss + coef * aux_loss.to(loss.device)
    return FusedLMHeadOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask, aux_loss=aux_loss)


def _router_aux_loss(model, text_config, router_logits, attention_mask):
    """(load-balancing loss, its coefficient) computed as the model's own forward does, with the
    load_balancing_loss_func of the model's modeling module (Mixtral's where it has none)."""
    import sys

    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "load_balancing_loss_func", None)
    if fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as fn
    num_experts = getattr(model, "num_experts", None) or getattr(text_config, "num_local_experts", None) \
        or getattr(text_config, "num_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None) or getattr(text_config, "num_experts_per_tok", None)
    coef = getattr(model, "router_aux_loss_coef", None)
    coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return fn(router_logits, num_experts, top_k, attention_mask), coef


def add_fused_lm_head(
    model,
    *,
    temperature: float = 1.0,
    outputs: Tuple[str, ...] = ("log_probs",),
    backend: str = "auto",
    filter_eps=None,
    cast_lm_head_to_fp32: bool = False,
    **op_options,
):
    """Patch `model` (a transformers causal LM, or a PEFT model around one) so that
    ``model(..., labels=labels, fused_lm_head=True)`` returns a FusedLMHeadOutput instead of logits.

    temperature: the logits are divided by it (the sampling temperature, > 0).
    outputs: per-token fields to compute, from ("log_probs", "entropy"); log_probs always.
    backend: the op's backend ("auto": Triton on CUDA, PyTorch elsewhere; "torch", "triton").
    filter_eps: the op's backward gradient filter; None (default) = exact gradients.
    cast_lm_head_to_fp32: run the head in float32, outside autocast (as TRL's option).
    op_options: further keywords of rlsc_kernels.linear_logprobs (e.g. buffer_bytes,
        check_values=False to skip the one value-check sync per call).
    Forward keywords (as TRL's): labels [B, T] (shifted here), or shift_labels [B, T] already
    shifted; num_items_in_batch divides the loss instead of the scored-token count. The patch can be
    applied again (settings replaced) and undone with remove_fused_lm_head(model).
    Returns the patched model (the inner transformers model for a PEFT model).
    """
    from ..validation import check_backend, check_temperature

    if hasattr(model, "get_base_model"):  # PEFT: patch the transformers model inside
        model = model.get_base_model()
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "base_model"):
        raise TypeError(f"model must be a transformers PreTrainedModel (causal LM), got {type(model).__name__}")
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or "log_probs" not in outputs:
        raise ValueError(f"outputs must include 'log_probs' and be drawn from {OUTPUTS}, got {outputs!r}")
    check_backend(backend)
    import inspect

    allowed = set(inspect.signature(linear_logprobs).parameters) - {
        "hidden", "weight", "targets", "bias", "temperature", "return_entropy", "softcap", "backend", "filter_eps"}
    unknown = sorted(set(op_options) - allowed)
    if unknown:
        raise TypeError(f"add_fused_lm_head got unexpected keyword arguments {unknown}; "
                        f"the op's options it forwards are {sorted(allowed)}")
    settings = _HeadSettings(
        temperature=check_temperature(temperature),
        outputs=outputs,
        cast_lm_head_to_fp32=bool(cast_lm_head_to_fp32),
        op_kwargs=tuple(sorted(dict(op_options, backend=backend, filter_eps=filter_eps).items())),
    )
    # An earlier patch's saved forward, else an instance-level forward someone else set, else
    # None: the class's own forward.
    if "_rlsc_original_forward" in model.__dict__:
        saved_forward = model.__dict__["_rlsc_original_forward"]
    else:
        saved_forward = model.__dict__.get("forward")
    original_forward = saved_forward if saved_forward is not None else types.MethodType(type(model).forward, model)

    # The class's signature is kept: generate() checks its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        return _fused_head_forward(self, settings, args, kwargs, labels, shift_labels, num_items_in_batch)

    model.__dict__["_rlsc_original_forward"] = saved_forward
    model.forward = types.MethodType(forward, model)
    return model


def remove_fused_lm_head(model):
    """Undo add_fused_lm_head: the model's forward is the one it had before."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if "_rlsc_original_forward" not in model.__dict__:
        return model
    original = model.__dict__.pop("_rlsc_original_forward")
    del model.__dict__["forward"]
    if original is not None:
        model.forward = original
    return model
