"""Per-sample temperature: one temperature per token, row or sequence instead of one float.

A temperature tensor is brought to one value per token (``per_token_temperature``: the shape
rules, shared by every public op that takes one), and a backend's two sweeps run at those values
through ``PerTokenTemperature``, which wraps any backend module (forward / backward) so that the
autograd Functions, the vocab-parallel Function and the custom ops take it unchanged:

  - no bias, no soft-cap: softmax((W h_t) / T_t) = softmax(W (h_t / T_t)): one sweep on the
    scaled hidden states at temperature 1 (one extra rounding of h_t / T_t to the input dtype),
    and dh_t = dh'_t / T_t in the backward;
  - a bias (b / T_t would be a different bias per token) or a soft-cap (applied before the
    temperature): the tokens are grouped by distinct temperature value, one sweep per value
    (exact; W is read once per value: cheap for a schedule over samples, slow for thousands of
    distinct values), the outputs scattered back into token order and dweight / dbias summed in
    fp32 over the groups. Finding the groups reads the distinct values on the host (one sync).

The temperature is a constant: no gradient flows to it. With check_values=False a token whose
temperature is 0, NaN or inf gets NaN outputs (grouped) or the NaN / inf the scaled inputs give
(scaled): never a crash.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from .dtypes import output_dtype
from .validation import FLOAT_DTYPES, check_tensor

#: the value check's message (api.py / custom_ops.py raise it with the other value checks)
BAD_TEMPERATURE = ("temperature tensor must hold finite values > 0 for every token (with seq_index: an id outside "
                   "[0, S) of temperature [S] has none)")


def is_per_token(temperature) -> bool:
    """True for a temperature tensor with at least one dimension (a 0-d tensor is one value)."""
    return isinstance(temperature, torch.Tensor) and temperature.dim() > 0


def per_token_temperature(temperature: torch.Tensor, targets: torch.Tensor,
                          seq_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The temperature of every token [N] (flattened like targets), detached, from a tensor
    shaped like targets (per token), [B] for targets [B, ...] (per row), or [S] with seq_index
    shaped like targets (per sequence of a packed batch). Shape, dtype and device checks only:
    no sync (traceable); an id of seq_index outside [0, S) gives NaN, caught by the value
    check (``bad_temperature``)."""
    check_tensor("temperature", temperature, dtypes=FLOAT_DTYPES)
    if temperature.device != targets.device:
        raise ValueError(f"temperature is on {temperature.device} but targets are on {targets.device}; "
                         "put them on one device")
    temperature = temperature.detach()
    shape = tuple(temperature.shape)
    if shape == tuple(targets.shape):
        return temperature.reshape(-1)
    if seq_index is not None:
        check_tensor("seq_index", seq_index, dtypes=(torch.int64, torch.int32))
        if tuple(seq_index.shape) != tuple(targets.shape):
            raise ValueError(f"seq_index must have the shape of targets {list(targets.shape)}, got {list(seq_index.shape)}")
        if seq_index.device != targets.device:
            raise ValueError(f"seq_index is on {seq_index.device} but targets are on {targets.device}")
        if temperature.dim() != 1 or shape[0] == 0:
            raise ValueError(f"with seq_index, temperature must be [S] (one value per sequence, S > 0), got {list(shape)}")
        ids = seq_index.reshape(-1).long()
        inside = (ids >= 0) & (ids < shape[0])
        picked = temperature[ids.clamp(0, shape[0] - 1)]
        return torch.where(inside, picked, torch.full_like(picked, math.nan))
    if targets.dim() >= 2 and shape == tuple(targets.shape[:1]):
        return temperature.reshape((shape[0],) + (1,) * (targets.dim() - 1)).expand(targets.shape).reshape(-1)
    raise ValueError(
        f"temperature must be a float, a 0-d tensor, a tensor shaped like targets {list(targets.shape)} (per token), "
        f"[B] = [{targets.shape[0] if targets.dim() else 0}] for targets [B, T] (per row), or [S] with seq_index "
        f"(per sequence); got shape {list(shape)}")


def bad_temperature(token_temperature: torch.Tensor) -> torch.Tensor:
    """[N] bool: True where a token's temperature is not a finite value > 0."""
    return ~(torch.isfinite(token_temperature) & (token_temperature > 0))


def scales_hidden(bias, opts) -> bool:
    """Whether a per-token temperature can divide the hidden states (no bias, no soft-cap)."""
    return bias is None and opts.softcap is None


class PerTokenTemperature:
    """A backend module (forward / backward of the two sweeps) run at one temperature per token
    (module docstring). temperature: [N] float tensor, one value per row of the hidden states
    the wrapper is called with; opts.temperature is ignored."""

    def __init__(self, backend, temperature: torch.Tensor):
        self.backend = backend
        self.temperature = temperature.detach()
        self._groups = None

    def _scaled(self, hidden):
        acc = output_dtype(hidden.dtype)
        return (hidden.to(acc) / self.temperature.to(acc)[:, None]).to(hidden.dtype)

    def groups(self):
        """[(value, token indices)] for each distinct finite nonzero temperature (one host sync;
        computed once per wrapper, so a backward reuses its forward's groups)."""
        if self._groups is None:
            t = self.temperature
            order = torch.argsort(t, stable=True)
            values, counts = torch.unique_consecutive(t[order], return_counts=True)
            parts = torch.split(order, counts.tolist())
            self._groups = [(v, idx) for v, idx in zip(values.tolist(), parts) if math.isfinite(v) and v != 0.0]
        return self._groups

    def forward(self, hidden, weight, bias, targets, opts):
        opts = replace(opts, temperature=1.0)
        if scales_hidden(bias, opts):
            return self.backend.forward(self._scaled(hidden), weight, bias, targets, opts)
        N, out = hidden.shape[0], output_dtype(hidden.dtype)
        logp = hidden.new_full((N,), math.nan, dtype=out)
        entropy = logp.clone() if opts.return_entropy else None
        saved = None
        for value, idx in self.groups():
            lp, ent, part = self.backend.forward(hidden[idx], weight, bias, targets[idx],
                                                 replace(opts, temperature=value))
            logp[idx] = lp.to(out)
            if entropy is not None:
                entropy[idx] = ent.to(out)
            if saved is None:  # (lse, mean_z | None, logp), each per token
                saved = tuple(None if s is None else hidden.new_full((N,), math.nan, dtype=s.dtype) for s in part)
            for full, s in zip(saved, part):
                if full is not None:
                    full[idx] = s
        if saved is None:  # no token with a usable temperature (check_values=False)
            saved = (logp.clone(), logp.clone() if opts.return_entropy else None, logp.clone())
        return logp, entropy, saved

    def backward(self, hidden, weight, bias, targets, saved, grad_logp, grad_entropy, opts, needs):
        opts = replace(opts, temperature=1.0)
        if scales_hidden(bias, opts):
            dh, dw, db = self.backend.backward(self._scaled(hidden), weight, bias, targets, saved, grad_logp,
                                               grad_entropy, opts, needs)
            if dh is not None:
                dh = dh / self.temperature.to(dh.dtype)[:, None]
            return dh, dw, db
        need_h, need_w, need_b = needs
        acc = output_dtype(hidden.dtype)
        dh = hidden.new_zeros(hidden.shape, dtype=acc) if need_h else None
        dw = weight.new_zeros(weight.shape, dtype=acc) if need_w else None
        db = weight.new_zeros(weight.shape[0], dtype=acc) if (need_b and bias is not None) else None
        pick = lambda x, idx: None if x is None else x[idx]  # noqa: E731
        for value, idx in self.groups():
            # dweight in fp32 per group: the sum over groups is rounded once, by the caller
            group_opts = replace(opts, temperature=value, dweight_fp32=True)
            gh, gw, gb = self.backend.backward(hidden[idx], weight, bias, targets[idx],
                                               tuple(pick(s, idx) for s in saved), pick(grad_logp, idx),
                                               pick(grad_entropy, idx), group_opts, needs)
            if dh is not None:
                dh[idx] = gh.to(acc)
            if dw is not None:
                dw += gw.to(acc)
            if db is not None:
                db += gb.to(acc)
        return dh, dw, db
