"""The op planned once: arguments validated, autocast applied, options built, path decided.

api.py (the public ops) and custom_ops.py (the same ops as registered custom ops, the route
torch.compile traces) both call ``plan_logprobs`` / ``plan_loss`` and then run the plan they get;
nothing below them asks the user's arguments again. This module imports only the layers below
it (options, validation, weighting), never api.py or custom_ops.py.

Hyperparameters that a schedule changes every step (temperature, alpha) may be Python floats or
0-d tensors. In an eager call they are read and checked here (a CUDA 0-d tensor costs one
device-to-host read: pass a Python float or a CPU tensor in a sync-free loop). While Dynamo
traces the op they stay symbolic: the plan keeps them as they came, checks only their type
(``math.isfinite`` of a dynamic float is not traceable, and a comparison would be a graph break or
a guard per value), and the custom op checks the temperature's value when it runs.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import torch

from .options import (
    FusedOptions,
    check_backward,
    check_block_configs,
    check_buffer_bytes,
    check_grad_matmul,
    check_native_matmul,
    check_softcap,
    resolve_filter_eps,
)
from .temperature import is_per_token, per_token_temperature
from .validation import check_backend, check_head
from .weighting import WEIGHTINGS

REDUCTIONS = ("mean", "sum")
PATHS = ("auto", "single-pass", "two-sweep")
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_AUTOCAST_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class RLSCLossOutput:
    """Result of linear_rlsc_loss.

    loss: scalar, -sum_s w_s L_s (reduction "sum") or that divided by max(S, 1) ("mean").
    seq_logp: [S] float32 sequence log-probs L_s (differentiable; 0 for a sequence with no
      scored token).
    seq_weight: [S] float32 detached weights w_s (no grad_fn on any path).
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


# ---- autocast ------------------------------------------------------------------------------


def autocast_dtype(hidden) -> Optional[torch.dtype]:
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


def cast_for_autocast(t, dtype):
    """t in the autocast dtype if it is a castable float tensor (differentiable), else t."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTABLE else t


def autocast_inputs(hidden, weight, bias):
    """Like F.linear under torch.autocast: hidden, weight and bias in the region's dtype (the
    casts are differentiable, so an fp32 master weight gets its gradient in fp32). The op then
    runs with autocast off, so no backend matmul is recast behind its back."""
    dtype = autocast_dtype(hidden)
    if dtype is None:
        return hidden, weight, bias, contextlib.nullcontext()

    cast = lambda t: cast_for_autocast(t, dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), torch.autocast(hidden.device.type, enabled=False)


# ---- scalar hyperparameters -------------------------------------------------------------------


def _is_scalar_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 0 and x.is_floating_point()


def check_temperature(temperature, *, tracing: bool = False):
    """A float (or int) > 0 and finite, or a 0-d floating tensor holding one (a tensor with
    dimensions is a per-token temperature: temperature.py). Eager: returns the float. Tracing: returns the argument unchanged after a type check (its value is checked by
    the custom op when it runs)."""
    if _is_scalar_tensor(temperature):
        if tracing:
            return temperature
        value = float(temperature)
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float > 0 or a float tensor, got {type(temperature).__name__}")
    elif tracing:
        return temperature
    else:
        value = float(temperature)
    if not (0.0 < value < math.inf):
        raise ValueError(f"temperature must be a finite float > 0, got {value!r}")
    return value


def check_alpha(alpha, *, tracing: bool = False):
    """A finite float, or a 0-d floating tensor holding one. Eager: returns the float; tracing:
    the argument unchanged after a type check."""
    if _is_scalar_tensor(alpha):
        if tracing:
            return alpha
        alpha = float(alpha)
    elif isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a finite float (or a 0-d float tensor), got {alpha!r}")
    elif tracing:
        return alpha
    if not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    return float(alpha)


def check_weighting(weighting) -> None:
    if isinstance(weighting, torch.Tensor):
        return
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a float tensor [S], got {weighting!r}")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_path(path) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


def check_num_sequences(num_sequences) -> Optional[int]:
    if num_sequences is None:
        return None
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, numbers.Integral) or num_sequences < 0:
        raise ValueError(f"num_sequences must be None or an int >= 0, got {num_sequences!r}")
    return int(num_sequences)


# ---- the plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogprobsPlan:
    """What a per-token call runs: opts (temperature=1.0 while tracing: the real one travels in
    ``temperature``), the requested backend name (resolved against the device where it runs),
    whether the value checks run, the vocab split, and whether Dynamo is tracing the call."""

    opts: FusedOptions
    backend: str
    check_values: bool
    vocab_parallel: Any
    tracing: bool
    temperature: Any  # float (eager); float, SymFloat or 0-d tensor (tracing); 1.0 with token_temperature
    compute_dtype: Optional[torch.dtype] = None  # the autocast dtype, where autocast is on
    token_temperature: Optional[torch.Tensor] = None  # [N] per token (temperature.py), flattened like targets


@dataclass(frozen=True)
class LossPlan:
    """What a loss call runs: the per-token plan plus the loss's own choices."""

    op: LogprobsPlan
    alpha: Any
    weighting: Union[str, torch.Tensor]
    reduction: str
    num_sequences: Optional[int]
    path: str


def _check_vocab_parallel(vocab_parallel, weight, bias, tracing: bool) -> None:
    if vocab_parallel is None:
        return
    if tracing:
        raise NotImplementedError("vocab_parallel is not supported under torch.compile (its collectives are not "
                                  "custom ops); call the op outside the compiled region")
    from .vocab_parallel import check_vocab_parallel

    check_vocab_parallel(vocab_parallel, weight, bias)


def plan_logprobs(hidden, weight, bias, targets, *, temperature, ignore_index, return_entropy, filter_eps, backend,
                  softcap, backward, grad_matmul, buffer_bytes, check_values, block_configs, vocab_parallel,
                  native_matmul="auto", seq_index=None):
    """Validates a per-token call and plans it. Returns (hidden, weight, bias, autocast_off,
    plan): the tensors cast as autocast would (differentiably), the context the run goes in.
    A temperature tensor with dimensions becomes plan.token_temperature (temperature.py: its
    shape rules, seq_index for the [S] form); its values are checked with the value checks."""
    tracing = torch.compiler.is_compiling()
    compute_dtype = autocast_dtype(hidden)
    hidden, weight, bias, autocast_off = autocast_inputs(hidden, weight, bias)
    check_head(hidden, weight, bias, targets, ignore_index)
    check_backend(backend)
    backward = check_backward(backward)
    grad_matmul = check_grad_matmul(grad_matmul)
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values must be a bool, got {type(check_values).__name__}")
    token_temperature = None
    if is_per_token(temperature):
        token_temperature = per_token_temperature(temperature, targets, seq_index)
        temperature = 1.0
    else:
        temperature = check_temperature(temperature, tracing=tracing)
    opts = FusedOptions(
        temperature=1.0 if tracing else temperature,
        ignore_index=int(ignore_index),
        return_entropy=bool(return_entropy),
        filter_eps=resolve_filter_eps(filter_eps, hidden.dtype, backward, grad_matmul),
        backward=backward,
        grad_matmul=grad_matmul,
        buffer_bytes=check_buffer_bytes(buffer_bytes),
        block_configs=check_block_configs(block_configs),
        softcap=check_softcap(softcap),
        native_matmul=check_native_matmul(native_matmul),
    )
    _check_vocab_parallel(vocab_parallel, weight, bias, tracing)
    plan = LogprobsPlan(opts, backend, check_values, vocab_parallel, tracing, temperature, compute_dtype,
                        token_temperature)
    return hidden, weight, bias, autocast_off, plan


def plan_loss(hidden, weight, bias, targets, *, temperature, alpha, weighting, reduction, ignore_index, filter_eps,
              backend, return_entropy, softcap, num_sequences, backward, grad_matmul, buffer_bytes, check_values,
              block_configs, path, vocab_parallel, native_matmul="auto", seq_index=None):
    """Validates a loss call and plans it: (hidden, weight, bias, autocast_off, LossPlan). A
    per-token temperature (op.token_temperature, every position of targets) takes the two sweeps."""
    hidden, weight, bias, autocast_off, op = plan_logprobs(
        hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, filter_eps=filter_eps, backend=backend, softcap=softcap, backward=backward,
        grad_matmul=grad_matmul, buffer_bytes=buffer_bytes, check_values=check_values, block_configs=block_configs,
        vocab_parallel=vocab_parallel, native_matmul=native_matmul, seq_index=seq_index)
    check_reduction(reduction)
    check_weighting(weighting)
    alpha = check_alpha(alpha, tracing=op.tracing)
    num_sequences = check_num_sequences(num_sequences)
    path = check_path(path)
    if vocab_parallel is not None and path == "single-pass":
        raise ValueError("path='single-pass' does not split the vocabulary; with vocab_parallel use path='auto' "
                         "or 'two-sweep'")
    if op.token_temperature is not None and path == "single-pass":
        raise ValueError("path='single-pass' takes one temperature (a float or a 0-d tensor); a per-sample "
                         "temperature tensor takes path='auto' or 'two-sweep'")
    plan = LossPlan(op, alpha, weighting, reduction, num_sequences, path)
    return hidden, weight, bias, autocast_off, plan


def with_temperature(opts: FusedOptions, temperature: float) -> FusedOptions:
    """opts for one run of a traced plan, the temperature read where the op runs."""
    return replace(opts, temperature=temperature)
