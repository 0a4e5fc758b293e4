"""Input checks for the public ops: every error names the argument and what was expected.

Shape, dtype and device checks are free. Value checks (target ids in range, no NaN/inf in the
inputs) need one device-to-host sync; they are batched into a single sync per call and can be
turned off with the ops' check_values=False keyword for the hot loop of a trusted training job.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch", "native", "reference")


def check_tensor(name: str, x, *, dtypes=None, dim=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {list(x.shape)}")


def check_same_device(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float > 0, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0.0) or math.isinf(t):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    return t


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_head(hidden, weight, bias, targets, ignore_index) -> None:
    """Checks the arguments shared by every op: hidden [..., D], weight [V, D], bias [V], targets [...]."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., D], got a scalar")
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of them")
    check_same_device("weight", weight, hidden, "hidden")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, got {list(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V > 0 and D > 0, got shape {list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, dim=1)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}; cast one of them")
        check_same_device("bias", bias, hidden, "hidden")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {list(bias.shape)}")
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32))
    check_same_device("targets", targets, hidden, "hidden")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {list(hidden.shape[:-1])} (hidden.shape[:-1]), got {list(targets.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _maybe_not_finite(x: torch.Tensor) -> torch.Tensor:
    """A 0-d bool that is True if x may hold NaN/inf, without an x-sized temporary: NaN and inf
    propagate through an fp32-accumulated sum (a `torch.isfinite(W)` of a 7B head's weight
    would allocate 0.5-2.6 GB). A sum that overflows on finite data is a false alarm that
    `_confirm_not_finite` rules out before any error is raised."""
    return ~torch.isfinite(torch.sum(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))


def _confirm_not_finite(x: torch.Tensor) -> bool:
    """Exact check, chunk by chunk (only run when the cheap one raised the alarm)."""
    flat = x.reshape(-1)
    step = 1 << 24
    return any(not bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def check_values(hidden, weight, bias, targets, ignore_index, extra: Optional[dict] = None) -> None:
    """Data-dependent checks with a single host sync: target range, finite inputs, and `extra`
    (name -> bool tensor that must be all False, with the message to raise)."""
    V = weight.shape[0]
    bad_target = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    flags = [bad_target.any(), _maybe_not_finite(hidden), _maybe_not_finite(weight)]
    names = [
        f"targets holds ids outside [0, {V}) that are not ignore_index={ignore_index}",
        "hidden contains NaN or inf",
        "weight contains NaN or inf",
    ]
    tensors = {"hidden contains NaN or inf": hidden, "weight contains NaN or inf": weight}
    if bias is not None:
        flags.append(_maybe_not_finite(bias))
        names.append("bias contains NaN or inf")
        tensors["bias contains NaN or inf"] = bias
    for message, flag in (extra or {}).items():
        flags.append(flag.any())
        names.append(message)
    bad = torch.stack(flags).cpu()
    for message, is_bad in zip(names, bad.tolist()):
        if not is_bad:
            continue
        if message.startswith("targets"):
            bad_ids = targets[bad_target]
            raise ValueError(f"{message} (e.g. {bad_ids[:5].tolist()})")
        if message in tensors and not _confirm_not_finite(tensors[message]):
            continue  # the sum overflowed on finite values
        raise ValueError(message)
