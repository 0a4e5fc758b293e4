"""Vocab-parallel log-probs: each rank of a process group holds a contiguous slice of the head.

Rank r holds weight rows [start_r, stop_r) (and the matching bias entries); the slices of the
group tile [0, V) without gaps or overlaps (V = the sum of the slice sizes). Every rank holds the
same hidden states and the same targets, given as global vocabulary ids. Each rank runs its
backend's ordinary forward sweep on its slice and the per-token statistics are merged:

    local:   l_r = logsumexp_{v in r} z_v,  a_r = sum_{v in r} p_r,v z_v (softmax within r),
             t_r = z_y if y in r else 0
    MAX:     m = max_r l_r
    SUM:     (s, a, t) = sum_r (exp(l_r - m), exp(l_r - m) a_r, t_r)       (one packed tensor)
    global:  lse = m + log s,  mean_z = a / s,  logp = t - lse,  entropy = lse - mean_z

The backward runs the backend's backward sweep on the slice with the GLOBAL lse and mean_z and
the targets remapped to local ids (a target outside the slice matches no local column but its
token still gets the softmax part of the gradient). dweight and dbias of the slice stay local;
each rank's partial dhidden (fp32) is summed with one all-reduce, so every rank gets the whole
dhidden (the gradient of the one loss every rank computed, not a sum over ranks).

Any backend with the two-sweep interface serves (torch, native, Triton); "reference" materialises
the slice's [N, stop - start] logits. The RLSC loss's single pass does not split the vocabulary:
with vocab_parallel, linear_rlsc_loss takes the two sweeps. An empty batch makes no collective.
With check_values=False the op makes no device-to-host sync (the collectives are stream-ordered
on NCCL); tested on gloo (CPU) only.

Bytes all-reduced per token, with statistics in float32 (float64 for float64 inputs, twice these):
    forward:  4 (MAX of lse) + 8 (SUM of sum-exp and target logit) = 12 bytes,
              + 4 in the SUM with return_entropy=True               = 16 bytes
    backward: 4 * D bytes (fp32 dhidden), only when hidden requires grad
With value checks on, one more SUM all-reduce per call carries each rank's slice bounds and
value flags (8 * world_size * (9 + extra checks) bytes, independent of the number of tokens), so
that every rank raises the same error instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from .autograd import _zero_ignored, not_differentiable
from .dtypes import output_dtype
from .options import FusedOptions
from .temperature import PerTokenTemperature
from .validation import _confirm_not_finite, _maybe_not_finite


@dataclass(frozen=True)
class VocabParallel:
    """This rank's slice of a vocabulary split across the ranks of a process group.

    start, stop: the rank holds weight rows (and bias entries) [start, stop) of the full head;
        0 <= start < stop. The slices of all ranks must tile [0, V) with V = their total size
        (in any rank order); the value checks verify that.
    group: the torch.distributed process group the vocabulary is split over (None = the
        default group). Every rank of it must call the op with the same hidden states, targets
        (global ids) and options.
    """

    start: int
    stop: int
    group: Any = None

    def __post_init__(self):
        for name in ("start", "stop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"VocabParallel.{name} must be an int, got {type(value).__name__}")
        if not 0 <= self.start < self.stop:
            raise ValueError(f"VocabParallel needs 0 <= start < stop, got start={self.start}, stop={self.stop}")

    @property
    def size(self) -> int:
        """Rows of the head this rank holds."""
        return self.stop - self.start


def check_vocab_parallel(vocab_parallel, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Shape checks (no communication): the local weight holds exactly the rank's slice."""
    if not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"vocab_parallel must be None or an rlsc_kernels.VocabParallel, got {type(vocab_parallel).__name__}")
    if weight.shape[0] != vocab_parallel.size:
        raise ValueError(
            f"weight must hold this rank's slice [{vocab_parallel.start}, {vocab_parallel.stop}) of the head, "
            f"i.e. {vocab_parallel.size} rows, got {weight.shape[0]}"
        )
    if bias is not None and bias.shape[0] != vocab_parallel.size:
        raise ValueError(f"bias must hold this rank's {vocab_parallel.size} entries [start, stop), got {bias.shape[0]}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel needs torch.distributed initialised (torch.distributed.init_process_group)")
    if dist.get_rank(vocab_parallel.group) < 0:
        raise ValueError("this process is not a member of vocab_parallel.group")


def check_values(hidden, weight, bias, targets, ignore_index: int, vocab_parallel: VocabParallel, extra=None) -> None:
    """The value checks of the public ops for a vocab-parallel call, with one all-reduce and one
    host sync. Every rank contributes its slice bounds and its flags, so all ranks see the same
    table and raise the same error (or none).

    Checked: the slices tile [0, V); targets are in [0, V) or ignore_index; every rank holds the
    same number of tokens and the same targets (a checksum); hidden, weight and bias are finite;
    `extra` (message -> bool tensor that must be all False) on every rank.
    """
    group = vocab_parallel.group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dev = targets.device
    valid = targets != ignore_index
    t = targets.long().reshape(-1)
    valid = valid.reshape(-1)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias}
    no = torch.zeros((), dtype=torch.bool, device=dev)
    flags = [
        torch.tensor(vocab_parallel.start, device=dev),
        torch.tensor(vocab_parallel.stop, device=dev),
        torch.tensor(t.numel(), device=dev),
        torch.where(valid, t, 0).sum(),  # a checksum of the targets
        torch.where(valid, t, -1).max() if t.numel() else torch.tensor(-1, device=dev),
        (valid & (t < 0)).sum(),
    ] + [_maybe_not_finite(x) if x is not None else no for x in tensors.values()]
    flags += [flag.any() for flag in (extra or {}).values()]
    rows = _gather_rows(flags, world, rank, group)  # the one collective and host sync
    starts, stops, counts, checksums, max_ids, n_negative = (list(c) for c in zip(*[r[:6] for r in rows]))
    layout = sorted(zip(starts, stops))
    V = sum(stop - start for start, stop in layout)
    if layout[0][0] != 0 or any(a[1] != b[0] for a, b in zip(layout, layout[1:])):
        raise ValueError(
            "the VocabParallel slices of the group must tile [0, V) without gaps or overlaps; "
            f"got [start, stop) per rank: {list(zip(starts, stops))}"
        )
    if len(set(counts)) > 1 or len(set(checksums)) > 1:
        raise ValueError(
            "every rank of a vocab-parallel call must hold the same tokens and targets; "
            f"got {counts} tokens and target checksums {checksums} per rank"
        )
    if max(max_ids) >= V or max(n_negative) > 0:
        bad = t[valid & ((t < 0) | (t >= V))]
        raise ValueError(
            f"targets holds ids outside [0, {V}) (V = the sum of the ranks' slices) that are not "
            f"ignore_index={ignore_index} (e.g. {bad[:5].tolist()})"
        )
    alarms = [[bool(r[6 + j]) for r in rows] for j in range(len(tensors))]
    if any(any(a) for a in alarms):
        # A float32 sum overflowing on finite values raises a false alarm: the alarmed ranks
        # look again, exactly, and everyone learns the verdict (a second collective, only here).
        confirmed = [alarm[rank] and _confirm_not_finite(x) for alarm, x in zip(alarms, tensors.values())]
        verdict = _gather_rows([torch.tensor(c, device=dev) for c in confirmed], world, rank, group)
        for j, name in enumerate(tensors):
            bad_ranks = [r for r, row in enumerate(verdict) if row[j]]
            if bad_ranks:
                raise ValueError(f"{name} contains NaN or inf (on ranks {bad_ranks})")
    for j, message in enumerate((extra or {}).keys()):
        if any(r[6 + len(tensors) + j] for r in rows):
            raise ValueError(message)


def _gather_rows(values, world: int, rank: int, group):
    """Every rank's list of 0-d integer / bool tensors, as a [world][len(values)] list of ints
    (one SUM all-reduce of an int64 table in which each rank fills its own row)."""
    table = torch.zeros(world, len(values), dtype=torch.int64, device=values[0].device)
    table[rank] = torch.stack([v.to(torch.int64) for v in values])
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    return table.cpu().tolist()


#: Local target ids handed to the backends: the slice's own ids are 0..size-1; every other
#: token (target in another slice, or ignored) gets OUTSIDE, which matches no column, and the
#: backends run with ignore_index=LOCAL_IGNORE, which no local id equals. So a user's
#: ignore_index that happens to be a vocabulary id cannot collide with a local id.
OUTSIDE = -2
LOCAL_IGNORE = -1


def _local_targets(targets: torch.Tensor, vocab_parallel: VocabParallel, ignore_index: int):
    """(local ids, in_slice) for global targets. Ignored tokens also get OUTSIDE: their upstream
    gradients and outputs are zeroed here, so the backends need not know them."""
    in_slice = (targets != ignore_index) & (targets >= vocab_parallel.start) & (targets < vocab_parallel.stop)
    local = torch.where(in_slice, targets - vocab_parallel.start, torch.full_like(targets, OUTSIDE))
    return local, in_slice


_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


class _ReferenceSlice:
    """The naive full-logits sweeps on one slice (backend="reference" under vocab_parallel):
    the slice's [N, stop - start] logits are materialised; GEMM in the input dtype and softmax
    in float32 (float64 for float64 inputs), as in reference.py."""

    @staticmethod
    def _logits(hidden, weight, bias, opts):
        """z = (h W^T + b) / T, or c tanh((h W^T + b) / c) / T with opts.softcap = c."""
        z = torch.nn.functional.linear(hidden, weight, bias).to(output_dtype(hidden.dtype))
        if getattr(opts, "softcap", None) is not None:
            z = opts.softcap * torch.tanh(z / opts.softcap)
        return z / opts.temperature

    @staticmethod
    def forward(hidden, weight, bias, targets, opts: FusedOptions):
        z = _ReferenceSlice._logits(hidden, weight, bias, opts)
        lse = torch.logsumexp(z, dim=1)
        in_slice = (targets >= 0) & (targets < weight.shape[0])
        target_z = z.gather(1, torch.where(in_slice, targets, 0)[:, None]).squeeze(1)
        target_z = torch.where(in_slice, target_z, torch.zeros_like(target_z))
        mean_z = entropy = None
        if opts.return_entropy:
            mean_z = (torch.softmax(z, dim=1) * z).sum(1)
            entropy = lse - mean_z
        return target_z - lse, entropy, (lse, mean_z, target_z - lse)

    @staticmethod
    def backward(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, opts, needs):
        lse, mean_z, logp = saved
        acc = output_dtype(hidden.dtype)
        z = _ReferenceSlice._logits(hidden, weight, bias, opts)
        p = torch.exp(z - lse[:, None])
        dz = torch.zeros_like(z)
        if grad_logp is not None:
            g = grad_logp.to(acc)
            in_slice = (targets >= 0) & (targets < weight.shape[0])
            dz -= g[:, None] * p
            idx = torch.where(in_slice, targets, 0)[:, None]
            at_target = torch.where(in_slice, -g * torch.expm1(logp.to(acc)), dz.gather(1, idx).squeeze(1))
            dz.scatter_(1, idx, at_target[:, None])  # 1 - p as -expm1(logp): no cancellation
        if grad_entropy is not None and mean_z is not None:
            dz -= grad_entropy.to(acc)[:, None] * p * (z - mean_z[:, None])
        dz /= opts.temperature
        if getattr(opts, "softcap", None) is not None:
            dz *= 1.0 - (z * (opts.temperature / opts.softcap)).square()  # tanh' with tanh = z T / c
        need_h, need_w, need_b = needs
        dh = dz @ weight.to(acc) if need_h else None
        dw = dz.T @ hidden.to(acc) if need_w else None
        db = dz.sum(0) if (need_b and bias is not None) else None
        return dh, dw, db


class VocabParallelLogprobsFunction(torch.autograd.Function):
    """Per-token log-probs (and entropies) over a vocabulary split across ranks (module docstring).
    Ignored tokens get 0 outputs and no gradient, as in autograd.LinearLogprobsFunction."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: FusedOptions, backend, vocab_parallel: VocabParallel,
                compute_dtype=None):
        ctx.set_materialize_grads(False)  # an output nobody backpropagates through costs nothing
        # autocast: masters in, cast here, gradients back in the masters' dtypes (autograd.py)
        ctx.grad_dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        if compute_dtype is not None:
            if weight.dtype == torch.float32 and compute_dtype != torch.float32:
                opts = replace(opts, dweight_fp32=True)
            hidden, weight, bias = (t.to(compute_dtype) if t is not None and t.dtype in _CASTABLE else t
                                    for t in (hidden, weight, bias))
        ctx.backend = backend
        ctx.opts = opts
        ctx.vocab_parallel = vocab_parallel
        ctx.has_bias = bias is not None
        ctx.empty = hidden.shape[0] == 0
        if ctx.empty:  # every rank holds the same (zero) tokens: nothing to compute or exchange
            ctx.save_for_backward(hidden, weight, bias)
            logp = torch.zeros(0, dtype=output_dtype(hidden.dtype), device=hidden.device)
            entropy = logp.clone() if opts.return_entropy else logp.new_empty(0)
            if not opts.return_entropy:
                ctx.mark_non_differentiable(entropy)
            return logp, entropy
        group = vocab_parallel.group
        local, in_slice = _local_targets(targets, vocab_parallel, opts.ignore_index)
        local_opts = replace(opts, ignore_index=LOCAL_IGNORE)
        logp_local, _, (lse_local, mean_z_local, *_) = backend.forward(hidden, weight, bias, local, local_opts)
        # The backends return logp = t - lse; t is 0 for a target outside the slice.
        target_z = torch.where(in_slice, logp_local + lse_local, torch.zeros_like(lse_local))
        lse_max = lse_local.clone()
        dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(lse_local - lse_max)
        parts = [scale, target_z] + ([scale * mean_z_local] if opts.return_entropy else [])
        packed = torch.stack(parts)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        log_total = torch.log(packed[0])
        lse = lse_max + log_total
        valid = targets != opts.ignore_index
        # (t - max) - log sum, not t - lse: keeps log sum ~ 1 - p of a peaked token (torch_chunked.py)
        logp = _zero_ignored((packed[1] - lse_max) - log_total, valid)
        mean_z = entropy = None
        if opts.return_entropy:
            mean_z = packed[2] / packed[0]
            entropy = _zero_ignored(lse - mean_z, valid)
        ctx.local_opts = local_opts
        ctx.save_for_backward(hidden, weight, bias, targets, local, lse, logp, mean_z)
        if entropy is None:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        with torch.no_grad():
            grads = VocabParallelLogprobsFunction._gradients(ctx, grad_logp, grad_entropy)
        return not_differentiable(grads, "the vocab-parallel op's backward")

    @staticmethod
    def _gradients(ctx, grad_logp, grad_entropy):
        opts: FusedOptions = ctx.opts
        if not opts.return_entropy:
            grad_entropy = None
        if ctx.empty or (grad_logp is None and grad_entropy is None):
            # No token, or neither output used (the same on every rank): zero gradients where
            # asked, no collective.
            hidden, weight, bias = ctx.saved_tensors[:3]
            zero = lambda x, i: torch.zeros_like(x) if x is not None and ctx.needs_input_grad[i] else None  # noqa: E731
            grads = [zero(hidden, 0), zero(weight, 1), zero(bias, 2)]
            grads = [g.to(d) if g is not None else None for g, d in zip(grads, ctx.grad_dtypes)]
            return (*grads, None, None, None, None, None)
        hidden, weight, bias, targets, local, lse, logp, mean_z = ctx.saved_tensors
        valid = targets != opts.ignore_index
        grad_logp, grad_entropy = _zero_ignored(grad_logp, valid), _zero_ignored(grad_entropy, valid)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        dh, dw, db = ctx.backend.backward(hidden, weight, bias, local, (lse, mean_z, logp), grad_logp, grad_entropy,
                                         ctx.local_opts, needs)
        if dh is not None:
            dh = dh.to(output_dtype(hidden.dtype))  # fp32 (fp64 for fp64 inputs) on the wire
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.vocab_parallel.group)
        h_dtype, w_dtype, b_dtype = ctx.grad_dtypes  # the one rounding: to the callers' dtypes
        dh = dh.to(h_dtype) if dh is not None else None
        dw = dw.to(w_dtype) if dw is not None else None
        db = db.to(b_dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None


def vocab_parallel_logprobs(hidden, weight, bias, targets, opts: FusedOptions, backend_name: str, vocab_parallel,
                            compute_dtype=None, token_temperature=None):
    """Per-token (logp [N], entropy [N] | None) for flat, checked inputs: hidden [N, D] and
    targets [N] (global ids) replicated on every rank, weight [stop - start, D] and bias the
    rank's slice. backend_name: a resolved backend ("torch", "triton", "native", "reference").
    token_temperature: [N] per-token temperatures (the same on every rank), or None."""
    if backend_name == "reference":
        backend = _ReferenceSlice
    else:
        from . import backends

        backend = backends.get(backend_name)
    if token_temperature is not None:
        backend = PerTokenTemperature(backend, token_temperature)
    logp, entropy = VocabParallelLogprobsFunction.apply(hidden, weight, bias, targets, opts, backend, vocab_parallel,
                                                        compute_dtype)
    return logp, (entropy if opts.return_entropy else None)
