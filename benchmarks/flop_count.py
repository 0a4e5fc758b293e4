"""Matrix-product FLOPs as the dispatcher sees them (issue 19's GEMM-equivalent count).

`GemmCounter` is a TorchDispatchMode: every matrix product that reaches the dispatcher, from
Python or from C++ (the native extension's at::mm_out goes through it too), is counted as
2 m k n flops; elementwise work is not. One GEMM-equivalent of the RLSC head is the logits GEMM,
2 N V D flops. `dry=True` skips the products themselves (outputs zeros, in-place accumulations unchanged):
the counts depend on shapes only, so a test can count full-size heads in seconds; the values
computed under it are garbage.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# (op packet) -> (index of the first matrix operand, index of the second) in args
_MATMULS = {
    aten.mm: (0, 1),
    aten.addmm: (1, 2),
    aten.addmm_: (1, 2),
    aten.bmm: (0, 1),
    aten.baddbmm: (1, 2),
    aten.baddbmm_: (1, 2),
    aten.mv: (0, 1),
    aten.addmv: (1, 2),
    aten.addmv_: (1, 2),
}


def _flops(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.dim() == 3:  # bmm: [B, m, k] x [B, k, n]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if b.dim() == 1:  # mv: [m, k] x [k]
        return 2 * a.shape[0] * a.shape[1]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


class GemmCounter(TorchDispatchMode):
    """with GemmCounter() as c: ... ; c.flops (total), c.by_op (per aten op name)."""

    def __init__(self, dry: bool = False):
        super().__init__()
        self.dry = dry
        self.flops = 0
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        idx = _MATMULS.get(func.overloadpacket)
        if idx is not None:
            f = _flops(args[idx[0]], args[idx[1]])
            self.flops += f
            self.by_op[str(func.overloadpacket)] += f
            if self.dry:
                if "out" in kwargs:
                    return kwargs["out"].zero_()  # zeros, not stale memory: keeps later values finite
                if func.overloadpacket in (aten.addmm_, aten.baddbmm_, aten.addmv_):
                    return args[0]
                a, b = args[idx[0]], args[idx[1]]
                shape = (*a.shape[:-1], *b.shape[1:]) if a.dim() == 2 else (a.shape[0], a.shape[1], b.shape[2])
                return torch.zeros(shape, dtype=a.dtype, device=a.device)
        return func(*args, **kwargs)

    def gemm_equivalents(self, N: int, V: int, D: int) -> float:
        return self.flops / (2.0 * N * V * D)
