"""The regime matrix: which regimes users train in, which cases test them, and how they are judged.

Dimensions (every public entry point x backend x dtype x training regime x upstream gradient x
eager/compiled x one temperature or one per token) span 2592 combinations; the suite runs a deterministic pairwise covering of the
supported ones: every pair of values of any two dimensions occurs in at least one case (greedy
all-pairs, fixed order, no randomness), seeded with the triples the issues found broken (fp16
with a GradScaler and under autocast, on every backend). test_regime_matrix.py runs it on CPU
(Triton in its interpreter), test_gpu.py on CUDA; the README's "Supported regimes" table is
generated from it (regimes_markdown) and checked by a test.

Regimes:
  plain        parameters in the dtype, loss * grad_output backward.
  grad-scaler  fp32 master parameters, autocast to the dtype (none for fp32), torch.amp.GradScaler
               with its real schedule (init 2^16, doubling every clean step here: growth_interval=1),
               unscale_ -> compare -> step -> update, three steps.
  autocast     fp32 master parameters, autocast to the dtype, no scaler.
Upstream gradient: the loss is multiplied by 1, 2^-24 ("tiny") or 2^20 ("huge") before backward.
Every case runs three optimizer steps whose temperature and alpha change (a schedule): the compiled
mode must neither fail nor recompile per value. Temperature "per-sample" passes a tensor with one
value per token (the step's value times a fixed pattern), through the scaled path where the
drawn problem has no bias and the grouped one where it has (rlsc_kernels/temperature.py).

Judge (FlashAttention's rule): for every output and gradient, max |fast / grad_output - exact| <=
2 x max |same-precision PyTorch - exact| + a small absolute term, where exact is float64 PyTorch
on the same rounded inputs and the PyTorch reference runs in the same regime at grad_output 1.
Gradients stored in 16 bits (plain regime) are also allowed the 16-bit subnormal spacing / grad_output
(the final rounding of a tiny true value) and may overflow where |exact x grad_output| passes the
dtype's largest value (as PyTorch's own would; GradScaler then skips the step).
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Tuple

DIMENSIONS: Dict[str, Tuple[str, ...]] = {
    "entry": ("linear_logprobs", "loss-two-sweep", "loss-single-pass", "LinearRLSCLoss", "vocab-parallel",
              "custom-ops", "add_fused_lm_head", "trl"),
    "backend": ("torch", "native", "triton"),
    "dtype": ("fp32", "bf16", "fp16"),
    "regime": ("plain", "grad-scaler", "autocast"),
    "grad_output": ("one", "tiny", "huge"),
    "mode": ("eager", "compiled"),
    "temperature": ("float", "per-sample"),
}
GRAD_OUTPUT = {"one": 1.0, "tiny": 2.0**-24, "huge": 2.0**20}

#: Combinations that are not supported, with the reason the README gives.
NOT_SUPPORTED = {
    ("mode=compiled", "entry=vocab-parallel"): "its collectives are not custom ops: call it outside the compiled region",
    ("mode=compiled", "entry=add_fused_lm_head"): "the patched forward gathers the scored positions "
                                                  "(a data-dependent shape): compile the body, not the head",
    ("mode=compiled", "entry=trl"): "TRL's fused head gathers the scored positions (data-dependent shape)",
    ("regime=autocast", "dtype=fp32"): "autocast to fp32 is the plain fp32 regime",
    ("entry=trl", "backend=torch"): "the TRL adapter runs backend='auto' (native on CPU, Triton on CUDA)",
    ("entry=trl", "backend=triton"): "the TRL adapter runs backend='auto' (native on CPU, Triton on CUDA)",
    ("temperature=per-sample", "entry=loss-single-pass"): "the single pass takes one temperature: a per-sample "
                                                          "tensor takes the two sweeps (path='auto' does so)",
    ("temperature=per-sample", "entry=add_fused_lm_head"): "the patched head's temperature is one float (the model's "
                                                           "sampling temperature)",
    ("temperature=per-sample", "entry=trl"): "TRL's fused head passes one float temperature",
}

#: Triples the issues found broken, always in the matrix (seeds of the covering).
MUST = [dict(entry=e, backend=b, dtype="fp16", regime=r, grad_output=g, mode="eager", temperature="float")
        for e, b in (("linear_logprobs", "torch"), ("linear_logprobs", "triton"), ("loss-single-pass", "native"),
                     ("loss-single-pass", "triton"), ("loss-two-sweep", "triton"))
        for r, g in (("grad-scaler", "one"), ("autocast", "huge"))]


def unsupported(case: Dict[str, str]) -> Optional[str]:
    items = {f"{k}={v}" for k, v in case.items()}
    for pair, reason in NOT_SUPPORTED.items():
        if set(pair) <= items:
            return reason
    return None


def _pairs(case: Dict[str, str]):
    names = list(DIMENSIONS)
    for a, b in itertools.combinations(names, 2):
        yield (a, case[a], b, case[b])


def covering() -> List[Dict[str, str]]:
    """Deterministic pairwise covering of the supported combinations, MUST first."""
    names = list(DIMENSIONS)
    everything = [dict(zip(names, values)) for values in itertools.product(*DIMENSIONS.values())]
    supported = [c for c in everything if unsupported(c) is None]
    needed = set()
    for c in supported:
        needed.update(_pairs(c))
    cases = []
    for c in MUST:
        cases.append(c)
        needed.difference_update(_pairs(c))
    while needed:
        best = max(supported, key=lambda c: len(needed.intersection(_pairs(c))))
        cases.append(best)
        needed.difference_update(_pairs(best))
    return cases


def case_id(case: Dict[str, str]) -> str:
    return "-".join(case[k] for k in DIMENSIONS)


def regimes_markdown(gpu_status: str = "written (tests/rlsc_kernels/test_gpu.py), not yet run on a GPU") -> str:
    """The README's "Supported regimes" table, generated from the matrix."""
    cases = covering()
    lines = ["| Dimension | Value | Tested here (CPU; Triton in its interpreter) | On a GPU |",
             "|---|---|---|---|"]
    for dim, values in DIMENSIONS.items():
        for value in values:
            n = sum(1 for c in cases if c[dim] == value)
            here = f"{n} matrix cases" + (" (interpreter)" if value == "triton" else "")
            gpu = "n/a: the CPU backend (its cases run on Triton there)" if value == "native" else gpu_status
            lines.append(f"| {dim} | {value} | {here} | {gpu} |")
    lines.append("")
    lines.append("| Not supported | Why |")
    lines.append("|---|---|")
    for pair, reason in NOT_SUPPORTED.items():
        lines.append(f"| {' x '.join(pair)} | {reason} |")
    return "\n".join(lines)
