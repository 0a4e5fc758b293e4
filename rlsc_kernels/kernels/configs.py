"""The block sizes we ship for every Triton kernel (the ground floor: the launchers in
rlsc_kernels/backends/ and the ahead-of-time compile in aot.py both read them from here).

Imports nothing of the package but the plain options dataclass (KernelConfig); no torch, no
Triton, so aot.py and the tests can list the variants without importing a backend.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..options import KernelConfig

# ---- two-sweep kernels (launched by backends/triton_sweeps.py) --------------------------------
# 16-bit inputs get tensor-core sized tiles. Measured on an H100 (triton 3.6, Qwen2.5-7B head,
# 16384 tokens; see benchmarks/results/tuning/): forward 128x256x64/w16 40.1 ms, 64x256x64/w8
# 49.0 ms, 128x128x64/w8 51-57 ms against a 24.2 ms logits GEMM. The large tile wins although the
# sm_90 build spills a little (python -m rlsc_kernels.kernels.aot): the sweep is bound by L2
# traffic, which grows as the tile shrinks. fp32 inputs get smaller tiles (an IEEE fp32 dot).
FORWARD_CONFIGS = {
    "16bit": KernelConfig(block_n=128, block_v=256, block_d=64, num_warps=16, num_stages=3, group_n=16),
    "fp32": KernelConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2, group_n=16),
}
# Fused backward: 128x128x32 is the largest tile that does not spill with its two extra dot
# accumulators; it measured 433 ms exact / 263 ms filtered at the 7B head (sliced: ~160 ms).
BACKWARD_CONFIGS = {
    "16bit": KernelConfig(block_n=128, block_v=128, block_d=32, num_warps=8, num_stages=2),
    "fp32": KernelConfig(block_n=32, block_v=64, block_d=32, num_warps=4, num_stages=2),
}
# Tile kernel of the sliced backward (a GEMM with an epilogue, like the forward).
GRAD_LOGITS_CONFIGS = {
    "16bit": KernelConfig(block_n=128, block_v=256, block_d=64, num_warps=16, num_stages=3, group_n=16),
    "fp32": KernelConfig(block_n=32, block_v=64, block_d=32, num_warps=4, num_stages=2, group_n=16),
}
# Block-sparse matmuls of the sliced backward: block_n = output rows (tokens or vocab), block_v
# unused, block_d = output columns, plus the K step (must divide the grad-logits tile sizes).
MATMUL_CONFIGS = {
    "16bit": KernelConfig(block_n=128, block_v=0, block_d=128, num_warps=8, num_stages=3),
    "fp32": KernelConfig(block_n=32, block_v=0, block_d=64, num_warps=4, num_stages=2),
}
MATMUL_BLOCK_K = {"16bit": 64, "fp32": 32}


def dtype_key(is_fp32: bool) -> str:
    """The table key for an input dtype: "fp32" or "16bit"."""
    return "fp32" if is_fp32 else "16bit"


# ---- single-pass row kernels (launched by backends/triton_single_pass.py) ---------------------
@dataclass(frozen=True)
class RowConfig:
    """Launch parameters of a row-wise kernel: BLOCK_N whole rows per program, BLOCK_V columns per step."""

    block_n: int
    block_v: int
    num_warps: int


# Both kernels stream rows of a [n, V] fp32 block (memory-bound). One row per program keeps many
# programs in flight (a 1024-token chunk is 1024 programs, ~8 per SM on an H100: 62 resident
# warps of 64) and the per-row loop simple; 2048 columns per step at 8 warps is 8 values per
# thread. Chosen by reasoning, unmeasured on a GPU so far.
STATS_CONFIG = RowConfig(block_n=1, block_v=2048, num_warps=8)
GRAD_CONFIG = RowConfig(block_n=1, block_v=2048, num_warps=8)
SINGLE_PASS_CONFIGS = {"stats": STATS_CONFIG, "grad": GRAD_CONFIG}
