"""The Triton backward's gradient filter: its error is measured and bounded on peaked
distributions, it really skips work there, and it skips nothing on flat distributions."""
import torch

import rlsc_kernels as rk

import pytest

from .oracle import BACKWARD_VARIANTS, make_inputs, run_logprobs, small_blocks

pytestmark = pytest.mark.interpreter

BLOCK_V = 32  # small_blocks()' vocab block


def _peaked(N=48, D=32, V=640, seed=None):
    h, w, b, _ = make_inputs(N, D, V, dtype=torch.float16, bias=True, ignore_frac=0.0, logit_scale=12.0, seed=seed)
    z = (h.double() @ w.double().T + b.double()) / 0.5
    y = torch.distributions.Categorical(logits=z).sample()  # targets from the model's own softmax
    return h, w, b, y


@pytest.mark.parametrize("strategy", BACKWARD_VARIANTS)
def test_filtered_error_is_bounded_and_tiles_are_skipped(strategy):
    h, w, b, y = _peaked()
    exact = run_logprobs("reference", h.double(), w.double(), b.double(), y, temperature=0.5, entropy_weight=0.0)
    full = run_logprobs("triton", h, w, b, y, temperature=0.5, entropy_weight=0.0, filter_eps=None,
                        **small_blocks(strategy))
    filt = run_logprobs("triton", h, w, b, y, temperature=0.5, entropy_weight=0.0, filter_eps=rk.AUTO_FILTER_EPS,
                        **small_blocks(strategy))
    # Work was skipped: the filtered result differs from the exact-mode kernel somewhere.
    assert not torch.equal(full["dweight"], filt["dweight"])
    # Bound: a skipped tile carries at most eps * |g_t| gradient mass for every token, so each
    # token loses at most n_vblocks * eps * |g_t| mass, times max|W| (dh) or max|h| (dW) / T.
    g = torch.randn(48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n_vblocks = -(-640 // BLOCK_V)
    lost = n_vblocks * rk.AUTO_FILTER_EPS * g.abs().max().item() / 0.5
    for name, operand, fan_in in (("dhidden", w, 1), ("dweight", h, 48)):
        err_full = (full[name] - exact[name]).abs().max().item()
        err_filt = (filt[name] - exact[name]).abs().max().item()
        bound = err_full + lost * operand.abs().max().item() * fan_in
        assert err_filt <= bound, (name, err_filt, bound)
        # and in practice (measured): far below the bound, within 2x of the exact kernel's error
        rel = err_filt / exact[name].abs().max().item()
        assert rel < 2e-2, (name, rel)


@pytest.mark.parametrize("strategy", BACKWARD_VARIANTS)
def test_filter_skips_nothing_on_a_flat_distribution(strategy):
    """Every tile of a flat distribution holds about BLOCK_V / V of the mass, far above eps."""
    h, w, b, y = make_inputs(40, 24, 300, dtype=torch.float16, logit_scale=0.1, seed=None)
    full = run_logprobs("triton", h, w, b, y, temperature=1.0, filter_eps=None, **small_blocks(strategy))
    filt = run_logprobs("triton", h, w, b, y, temperature=1.0, filter_eps=rk.AUTO_FILTER_EPS, **small_blocks(strategy))
    for name in ("dhidden", "dweight", "dbias"):
        assert torch.equal(full[name], filt[name]), name


@pytest.mark.parametrize("strategy", BACKWARD_VARIANTS)
def test_auto_is_exact_for_fp32_and_a_huge_eps_drops_everything(strategy):
    from rlsc_kernels.options import resolve_filter_eps

    assert resolve_filter_eps("auto", torch.float32) is None
    assert resolve_filter_eps("auto", torch.float32, "fused", "library") is None
    assert resolve_filter_eps(0.0, torch.bfloat16) is None
    # eps = 3: sum_v |dz| <= 2|g| < 3|g| everywhere, so every tile is skipped and nothing flows back.
    h, w, b, y = make_inputs(20, 16, 100, dtype=torch.float32, ignore_frac=0.0, seed=None)
    out = run_logprobs("triton", h, w, b, y, temperature=1.0, entropy_weight=0.0, filter_eps=3.0,
                       **small_blocks(strategy))
    assert (out["dhidden"] == 0).all() and (out["dweight"] == 0).all()


def test_auto_filters_only_where_tiles_are_really_skipped():
    """On the default sliced backward with library matmuls a filtered tile is written as zeros
    into dense matmuls: no time saved, accuracy lost (and AdamW turns those zeros into missing
    updates: docs). There "auto" must be exact; it filters on the fused backward and on the
    block-sparse Triton matmuls, which really skip the tiles."""
    from rlsc_kernels.options import resolve_filter_eps

    assert resolve_filter_eps("auto", torch.bfloat16) is None
    assert resolve_filter_eps("auto", torch.float16, "sliced", "library") is None
    assert resolve_filter_eps("auto", torch.bfloat16, "sliced", "triton") == rk.AUTO_FILTER_EPS
    assert resolve_filter_eps("auto", torch.float16, "fused", "library") == rk.AUTO_FILTER_EPS
    assert resolve_filter_eps(1e-3, torch.bfloat16, "sliced", "library") == 1e-3
    h, w, b, y = _peaked()
    exact = run_logprobs("triton", h, w, b, y, temperature=0.5, entropy_weight=0.0, filter_eps=None,
                         **small_blocks("sliced"))
    auto = run_logprobs("triton", h, w, b, y, temperature=0.5, entropy_weight=0.0, filter_eps="auto",
                        **small_blocks("sliced"))
    for name in exact:
        assert torch.equal(exact[name], auto[name]), name
    sparse_exact = run_logprobs("triton", h, w, b, y, temperature=0.5, entropy_weight=0.0, filter_eps=None,
                                **small_blocks("sliced-sparse"))
    sparse_auto = run_logprobs("triton", h, w, b, y, temperature=0.5, entropy_weight=0.0, filter_eps="auto",
                               **small_blocks("sliced-sparse"))
    assert not torch.equal(sparse_exact["dweight"], sparse_auto["dweight"])  # it does filter there
