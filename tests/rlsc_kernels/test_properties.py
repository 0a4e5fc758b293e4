"""Property-based tests (hypothesis): over shapes (including ones no block size divides, V = 1,
D = 1), layouts, temperatures, masks, dtypes and backward variants, every backend agrees with
the float64 oracle within the same-dtype PyTorch error (oracle.py), and the RLSC loss with
Algorithm 1 run in float64. Example counts are small (the interpreter is slow on 2 cores)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlsc_kernels as rk
from rlsc_kernels.backends import native_available

from .oracle import assert_within_oracle, run_logprobs, small_blocks

pytestmark = pytest.mark.interpreter

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: backend name -> backward variants it runs (the torch backend ignores them)
BACKENDS = ["torch", "triton-sliced", "triton-sliced-sparse", "triton-fused"] + (["native"] if native_available() else [])


def _layout(t, kind):
    if kind == "sliced":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    if kind == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == "offset":
        return torch.cat([torch.zeros((2,) + tuple(t.shape[1:]), dtype=t.dtype), t])[2:]
    return t


@st.composite
def head_problems(draw, max_n=40):
    N = draw(st.integers(1, max_n))
    D = draw(st.integers(1, 40))
    V = draw(st.integers(1, 90))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    h = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64) * (scale / math.sqrt(D))
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5 if draw(st.booleans()) else None
    y = torch.randint(0, V, (N,), generator=gen)
    ignore_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    y[torch.rand(N, generator=gen) < ignore_frac] = -100
    if draw(st.booleans()):
        y = y.int()
    return dict(h=h, w=w, b=b, y=y, temperature=draw(st.floats(0.25, 3.0)),
                layouts={name: draw(st.sampled_from(["contiguous", "sliced", "transposed", "offset"]))
                         for name in ("h", "w", "b", "y")})


def _run(backend, p, dtype, **kw):
    h, w, b = (None if t is None else t.to(dtype) for t in (p["h"], p["w"], p["b"]))
    lay = p["layouts"]
    name, _, variant = backend.partition("-")
    if name != "reference":
        h, w = _layout(h, lay["h"]), _layout(w, lay["w"])
        b = None if b is None else _layout(b, lay["b"])
    y = _layout(p["y"], lay["y"]) if name != "reference" else p["y"]
    return run_logprobs(name, h, w, b, y, temperature=p["temperature"], filter_eps=None,
                        **small_blocks(variant or "sliced"), **kw)


@settings(max_examples=12, **SETTINGS)
@given(p=head_problems(), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS))
def test_logprobs_entropy_and_grads_match_the_float64_oracle(p, dtype, backend):
    exact = _run("reference", p, torch.float64)
    same = _run("reference", p, dtype)
    fast = _run(backend, p, dtype)
    # entropy = lse - E[z] in fp32 accumulators: a few fp32 ulps of the largest |logit|
    z = p["h"] @ p["w"].T + (p["b"] if p["b"] is not None else 0)
    floor = {"entropy": 16 * 2.0**-24 * (z.abs().max().item() / p["temperature"])}
    assert_within_oracle(fast, same, exact, dtype, label=f"{backend} {dtype} layouts={p['layouts']}", floor=floor)
    ignored = p["y"] == -100
    assert (fast["logp"][ignored] == 0).all() and (fast["dhidden"][ignored] == 0).all()


@settings(max_examples=6, **SETTINGS)
@given(p=head_problems(max_n=24))
def test_torch_backend_in_float64_equals_the_oracle(p):
    exact = _run("reference", p, torch.float64)
    fast = _run("torch", p, torch.float64)
    for k in exact:
        assert torch.allclose(fast[k], exact[k], rtol=1e-9, atol=1e-11), k


def _algorithm1(h, w, b, y, seq, S, temperature, alpha, reduction):
    """The paper's Algorithm 1 in float64 with full logits (exact oracle for the RLSC loss)."""
    z = (h @ w.T + (b if b is not None else 0)) / temperature
    lp = torch.log_softmax(z, -1)
    valid = y != -100
    tok = torch.where(valid, lp.gather(1, torch.where(valid, y, 0).long()[:, None])[:, 0], torch.zeros(()).double())
    L = torch.zeros(S, dtype=torch.float64).index_add(0, seq, tok)
    loss = -((L.detach().clamp(max=0).exp() + alpha) * L).sum()
    return loss / max(S, 1) if reduction == "mean" else loss, L


@settings(max_examples=10, **SETTINGS)
@given(p=head_problems(max_n=30), backend=st.sampled_from(["torch", "triton-sliced", "triton-fused", "reference"]
                                                        + (["native"] if native_available() else [])),
       n_seqs=st.integers(1, 6), reduction=st.sampled_from(["mean", "sum"]), path=st.sampled_from(["auto", "two-sweep"]),
       data=st.data())
def test_rlsc_loss_matches_algorithm1_in_float64(p, backend, n_seqs, reduction, path, data):
    """fp32 inputs (some sequences empty: ids no token carries, every target ignored)."""
    N = p["h"].shape[0]
    seq = torch.tensor(sorted(data.draw(st.lists(st.integers(0, n_seqs - 1), min_size=N, max_size=N))))
    h64 = p["h"].clone().requires_grad_()
    w64 = p["w"].clone().requires_grad_()
    ref, ref_L = _algorithm1(h64, w64, p["b"], p["y"], seq, n_seqs, p["temperature"], 0.1, reduction)
    ref.backward()
    name, _, variant = backend.partition("-")
    h = _layout(p["h"].float(), p["layouts"]["h"]).detach().requires_grad_()
    w = _layout(p["w"].float(), p["layouts"]["w"]).detach().requires_grad_()
    b = None if p["b"] is None else p["b"].float()
    out = rk.linear_rlsc_loss(h, w, _layout(p["y"], p["layouts"]["y"]), seq_index=seq, num_sequences=n_seqs, bias=b,
                              temperature=p["temperature"], reduction=reduction, backend=name, filter_eps=None,
                              path=path, **small_blocks(variant or "sliced"))
    out.loss.backward()
    assert torch.allclose(out.seq_logp.double(), ref_L.detach(), rtol=1e-5, atol=1e-4 * (1 + ref_L.abs().max().item()))
    assert math.isclose(out.loss.item(), ref.item(), rel_tol=1e-4, abs_tol=1e-4)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert (got.double() - want).abs().max().item() <= 1e-4 * (want.abs().max().item() + 1e-3)
