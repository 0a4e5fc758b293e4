"""Float64 oracle helpers: draw inputs, run every backend, judge low-precision results.

The oracle runs the naive reference in float64 on the *same rounded inputs* the backend sees, so
the error measured is the computation's, not the input rounding's. A result in dtype X passes when
    max|fast - exact| <= max|torch in X - exact| + tol * max|exact|
i.e. no worse than PyTorch itself in that dtype, plus a small tolerance.
"""
from __future__ import annotations

import torch

import rlsc_kernels as rk

# Small tolerance on top of the same-dtype PyTorch error, relative to the largest exact value:
# half a unit in the last place of a 16-bit output (both results end in one rounding to that
# dtype, which alone can differ by that much), and a few fp32 accumulation roundings for fp32.
TOL = {torch.float32: 2e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 1e-12}


def make_inputs(N, D, V, *, dtype, bias=True, ignore_frac=0.2, logit_scale=1.0, seed=None, device="cpu"):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    h = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64) * (logit_scale / D**0.5)
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    ignored = torch.rand(N, generator=gen) < ignore_frac
    y[ignored] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(w), cast(b), y.to(device)


def run_logprobs(backend, h, w, b, y, *, temperature, entropy_weight=0.3, grad_seed=0, **kw):
    """Forward + backward of sum(g * logp) + entropy_weight * sum(e * entropy) with fixed random g, e."""
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    logp, ent = rk.linear_logprobs(hh, ww, y, bias=bb, temperature=temperature, return_entropy=True,
                                   backend=backend, **kw)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(logp.shape, generator=gen, dtype=torch.float64).to(logp.device)
    e = torch.randn(logp.shape, generator=gen, dtype=torch.float64).to(logp.device)
    ((logp.double() * g).sum() + entropy_weight * (ent.double() * e).sum()).backward()
    out = {"logp": logp, "entropy": ent, "dhidden": hh.grad, "dweight": ww.grad}
    if bb is not None:
        out["dbias"] = bb.grad
    return {k: v.detach().double().cpu() for k, v in out.items()}


def errors(result, exact):
    return {k: (result[k] - exact[k]).abs().max().item() for k in exact}


def assert_within_oracle(fast, same_dtype, exact, dtype, label="", floor=None):
    """fast, same_dtype, exact: dicts name -> float64 CPU tensor. floor: optional name -> an
    absolute error always allowed (e.g. for entropies, lse - E[z] cancels: its fp32 rounding is
    relative to the logits' magnitude, not to the entropy's, which can be ~0)."""
    for name in exact:
        scale = exact[name].abs().max().item()
        err_fast = (fast[name] - exact[name]).abs().max().item()
        err_ref = (same_dtype[name] - exact[name]).abs().max().item()
        bound = err_ref + TOL[dtype] * scale + (floor or {}).get(name, 0.0)
        assert err_fast <= bound, f"{label} {name}: error {err_fast:.3e} > torch-{dtype} error {err_ref:.3e} + tol ({bound:.3e})"


def assert_within_one_more_rounding(fast, same_dtype, exact, dtype, label=""):
    """Like assert_within_oracle, for paths that round one more input than the same-dtype
    reference (the per-token temperature's scaled path rounds h / T_t to the input dtype): within
    2 x the same-dtype error + the dtype's tolerance (+ 1e-5 relative in fp32)."""
    for name in exact:
        scale = exact[name].abs().max().item()
        err = (fast[name] - exact[name]).abs().max().item()
        err_same = (same_dtype[name] - exact[name]).abs().max().item()
        bound = 2 * err_same + TOL[dtype] * scale + (1e-5 * scale if dtype == torch.float32 else 0.0)
        assert err <= bound, f"{label} {name}: error {err:.3e} > bound {bound:.3e} (same-dtype torch {err_same:.3e})"


#: Triton backward variants: sliced with library matmuls (the default), sliced with our
#: block-sparse Triton matmuls, and the fused atomic kernel.
BACKWARD_VARIANTS = ("sliced", "sliced-sparse", "fused")


def small_blocks(variant="sliced"):
    """Keyword arguments of the ops for tiny Triton block sizes, so that small, awkward shapes
    span several token blocks, vocab blocks, splits, groups and matmul K steps, and for the
    backward variant to test (other backends accept and ignore them)."""
    tile = rk.KernelConfig(16, 32, 16, 4, 1, group_n=2)
    blocks = rk.BlockConfigs(
        forward=rk.KernelConfig(16, 32, 16, 4, 1),
        grad_logits=tile,
        backward=tile,
        matmul=rk.KernelConfig(16, 0, 16, 4, 1),
        matmul_block_k=16,
    )
    return dict(block_configs=blocks, backward=variant.split("-")[0],
                grad_matmul="triton" if variant.endswith("-sparse") else "library")
