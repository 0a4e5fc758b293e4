"""The single-pass RLSC loss: three GEMMs per chunk instead of five, at every sequence length.

The RLSC weight w_s is a detached function of its own sequence's L_s alone, so every token's
upstream gradient is g_t = dLoss/dL_s(t) = -w_s (/ S for "mean"), a scalar known when its
sequence ends, times a quantity that does not depend on it. Per chunk of tokens:
    z = (h W^T + b) / T          one GEMM, held for the chunk only
    lse, logp, L_s, w_s          from z (fp32 statistics)
    dz = g_t ([v = y_t] - p) / T  in place of z (g_t = 1 for a sequence still open)
    dH = dz W,  dW += dz^T h      two GEMMs (dW accumulated in fp32 over the chunks)
and the autograd backward only scales these gradients by the scalar grad_output.

    plan.py      the weighting as a pure function (Weigh), the chunk layouts and their cost model
    driver.py    the one chunk loop; backends supply primitives (backends/*: SinglePassOps)
    function.py  the autograd boundary and linear_rlsc_loss's dispatch (maybe_single_pass)
"""
from .driver import SinglePassResult, run
from .function import (
    PATHS,
    SINGLE_PASS_DEFAULT_DEVICES,
    RLSCSinglePassFunction,
    auto_takes_single_pass,
    check_path,
    maybe_single_pass,
    rlsc_loss_single_pass,
    rlsc_single_pass,
    single_pass_backend,
)
from .plan import DEFAULT_BUFFER_BYTES, Chunk, Plan, Weigh, budget_rows, plan, plan_chunks

__all__ = [
    "PATHS", "SINGLE_PASS_DEFAULT_DEVICES", "DEFAULT_BUFFER_BYTES", "Chunk", "Plan", "RLSCSinglePassFunction",
    "SinglePassResult", "Weigh", "auto_takes_single_pass", "budget_rows", "check_path", "maybe_single_pass", "plan",
    "plan_chunks", "rlsc_loss_single_pass", "rlsc_single_pass", "run", "single_pass_backend",
]
