"""linear_token_stats (log-prob, entropy, self-certainty) against a float64 oracle of the papers'
formulas from full logits: every backend, every dtype, bias, float and per-token / per-row /
per-sequence temperatures, soft-cap, ignored tokens, the empty batch and bad input."""
import math

import pytest
import torch

import rlsc_kernels as rk
from rlsc_kernels.backends import native_available

from .oracle import assert_within_one_more_rounding, make_inputs, small_blocks

pytestmark = pytest.mark.interpreter

BACKENDS = ["torch", "reference", "triton"] + (["native"] if native_available() else [])
NAMES = ("logp", "entropy", "self_certainty")


def oracle_stats(h, w, b, y, temperature, softcap=None):
    """The papers' formulas from the full logits: logp = log p_y, H = -sum p log p, and Intuitor's
    self-certainty KL(U || p) = -log V - (1/V) sum_v log p_v. The logits GEMM runs in the inputs'
    dtype (float64 inputs: the exact oracle; low precision: PyTorch's own same-dtype error)."""
    z = torch.nn.functional.linear(h, w, b)
    z = z.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = temperature if not isinstance(temperature, torch.Tensor) else temperature.reshape(-1, 1).to(z.dtype)
    logq = torch.log_softmax(z / t, dim=-1)
    valid = y != -100
    logp = logq.gather(-1, torch.where(valid, y, 0)[:, None]).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    sc = -math.log(w.shape[0]) - logq.mean(-1)
    zero = torch.zeros_like(logp)
    return {"logp": torch.where(valid, logp, zero), "entropy": torch.where(valid, ent, zero),
            "self_certainty": torch.where(valid, sc, zero)}


def _run(fn, h, w, b, y):
    """fn(h, w, b) -> dict of the three [N] stats; returns them and the gradients of a fixed random
    combination sum(g1 logp + g2 H + g3 SC), as float64 CPU tensors."""
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    out = fn(hh, ww, bb)
    gen = torch.Generator().manual_seed(3)
    loss = sum((out[k].double() * torch.randn(out[k].shape, generator=gen, dtype=torch.float64)).sum() for k in NAMES)
    loss.backward()
    res = {k: out[k] for k in NAMES} | {"dhidden": hh.grad, "dweight": ww.grad}
    if bb is not None:
        res["dbias"] = bb.grad
    return {k: v.detach().double().cpu() for k, v in res.items()}


def _fast(backend, y, temperature, softcap=None, **kw):
    extra = small_blocks() if backend == "triton" else {}

    def fn(h, w, b):
        s = rk.linear_token_stats(h, w, y, bias=b, temperature=temperature, softcap=softcap,
                                  backend=backend, filter_eps=None, **extra, **kw)
        return {"logp": s.logp, "entropy": s.entropy, "self_certainty": s.self_certainty}
    return fn


def _check(backend, dtype, N, D, V, *, temperature, bias, softcap=None, seed=0):
    h, w, b, y = make_inputs(N, D, V, dtype=dtype, bias=bias, seed=seed, logit_scale=3.0)
    if isinstance(temperature, str):  # a per-token tensor from a few distinct values
        gen = torch.Generator().manual_seed(seed)
        temperature = torch.tensor([0.4, 0.7, 1.3])[torch.randint(0, 3, (N,), generator=gen)]
    exact = _run(lambda h_, w_, b_: oracle_stats(h_, w_, b_, y, temperature, softcap), h.double(), w.double(),
                 None if b is None else b.double(), y)
    same = _run(lambda h_, w_, b_: oracle_stats(h_, w_, b_, y, temperature, softcap), h, w, b, y)
    fast = _run(_fast(backend, y, temperature, softcap), h, w, b, y)
    label = f"{backend} {dtype} T={'tensor' if isinstance(temperature, torch.Tensor) else temperature} bias={bias} softcap={softcap}"
    # the scaled-hidden path rounds h / T_t once to the input dtype: one more input rounding
    assert_within_one_more_rounding(fast, same, exact, dtype, label)
    ignored = y == -100
    for name in NAMES:
        assert (fast[name][ignored] == 0).all(), name
    assert (fast["dhidden"][ignored] == 0).all()
    assert (fast["self_certainty"][~ignored] >= -1e-3 * max(1.0, exact["self_certainty"].abs().max().item())).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature,bias", [(0.5, True), (1.0, False), ("tensor", False), ("tensor", True)])
def test_token_stats_match_float64_oracle(backend, dtype, temperature, bias):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 dots wrongly (DESIGN: interpreter trap); bf16 Triton runs on GPU")
    _check(backend, dtype, 37, 19, 101, temperature=temperature, bias=bias)


@pytest.mark.parametrize("backend", ["torch"] + (["native"] if native_available() else []))
@pytest.mark.parametrize("temperature", [0.6, "tensor"])
def test_soft_capped_self_certainty_matches_oracle(backend, temperature):
    _check(backend, torch.float32, 29, 13, 77, temperature=temperature, bias=True, softcap=2.5, seed=1)


def test_float64_is_exact_and_self_certainty_is_the_kl_from_uniform():
    h, w, b, y = make_inputs(23, 11, 53, dtype=torch.float64, seed=4)
    s = rk.linear_token_stats(h, w, y, bias=b, temperature=0.8, backend="torch")
    p = torch.softmax((h @ w.T + b) / 0.8, -1)
    kl = (1 / 53 * torch.log((1 / 53) / p)).sum(-1)  # KL(U || p) straight from its definition
    valid = y != -100
    torch.testing.assert_close(s.self_certainty[valid], kl[valid], rtol=1e-10, atol=1e-12)
    assert s.logp.dtype == torch.float64


def test_per_row_and_per_sequence_temperature_equal_per_token():
    h, w, b, y = make_inputs(24, 9, 31, dtype=torch.float32, seed=5)
    t_row = torch.tensor([0.5, 1.5, 0.9])
    per_token = t_row[:, None].expand(3, 8)
    ref = rk.linear_token_stats(h.reshape(3, 8, 9), w, y.reshape(3, 8), bias=b, temperature=per_token.contiguous())
    rows = rk.linear_token_stats(h.reshape(3, 8, 9), w, y.reshape(3, 8), bias=b, temperature=t_row)
    seq_index = torch.arange(3).repeat_interleave(8)
    packed = rk.linear_token_stats(h, w, y, bias=b, temperature=t_row, seq_index=seq_index)
    for name in NAMES:
        torch.testing.assert_close(getattr(rows, name), getattr(ref, name))
        torch.testing.assert_close(getattr(packed, name), getattr(ref, name).reshape(-1))
    # and a float temperature is the constant tensor
    flat = rk.linear_token_stats(h, w, y, bias=b, temperature=0.9)
    const = rk.linear_token_stats(h, w, y, bias=b, temperature=torch.full((24,), 0.9))
    for name in NAMES:
        torch.testing.assert_close(getattr(const, name), getattr(flat, name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, "tensor"])
def test_empty_batch_gives_empty_stats_and_zero_gradients(backend, temperature):
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    t = torch.zeros(0) + 1.0 if temperature == "tensor" else temperature
    s = rk.linear_token_stats(h, w, y, bias=b, temperature=t, backend=backend)
    assert s.logp.shape == s.entropy.shape == s.self_certainty.shape == (0,)
    (s.logp.sum() + s.entropy.sum() + s.self_certainty.sum()).backward()
    assert w.grad is None or (w.grad == 0).all()
    assert b.grad is None or (b.grad == 0).all()


def test_outputs_asked_for_only_and_self_certainty_shortcut():
    h, w, b, y = make_inputs(10, 6, 21, dtype=torch.float32, seed=6)
    s = rk.linear_token_stats(h, w, y, bias=b, entropy=False, self_certainty=False)
    assert s.entropy is None and s.self_certainty is None
    sc = rk.linear_self_certainty(h, w, y, bias=b, temperature=0.7)
    torch.testing.assert_close(sc, rk.linear_token_stats(h, w, y, bias=b, temperature=0.7).self_certainty)


def test_bad_input_names_the_argument():
    h, w, b, y = make_inputs(6, 4, 9, dtype=torch.float32, seed=7)
    with pytest.raises(ValueError, match="temperature"):
        rk.linear_token_stats(h, w, y, temperature=torch.ones(5))
    with pytest.raises(ValueError, match="temperature tensor must hold finite values > 0"):
        rk.linear_token_stats(h, w, y, temperature=torch.tensor([1.0, 0.5, -1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="temperature"):
        rk.linear_token_stats(h, w, y, temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        rk.linear_token_stats(h, w, y, temperature=torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_index"):
        rk.linear_token_stats(h, w, y, temperature=torch.ones(2), seq_index=torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="softcap"):
        rk.linear_token_stats(h, w, y, softcap=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        rk.linear_token_stats(h, w, y, reduction="sum")
