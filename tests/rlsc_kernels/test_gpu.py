"""GPU-only checks: the real compiler's bf16/fp16/fp32 dots at the shipped block sizes, int64
offsets, the filter on a realistic peaked distribution. Skipped where no CUDA GPU is present."""
import pytest
import torch

import rlsc_kernels as rk

from .oracle import TOL, assert_within_oracle

pytestmark = pytest.mark.gpu


def _inputs(N, D, V, dtype, scale=1.0, bias=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, device="cuda", generator=gen, dtype=torch.float32).to(dtype)
    w = (torch.randn(V, D, device="cuda", generator=gen) * (scale / D**0.5)).to(dtype)
    b = (torch.randn(V, device="cuda", generator=gen) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), device="cuda", generator=gen)
    y[::7] = -100
    return h, w, b, y


def _run(backend, h, w, b, y, T, filter_eps=None, entropy_weight=0.3, **options):
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    logp, ent = rk.linear_logprobs(hh, ww, y, bias=bb, temperature=T, return_entropy=True, backend=backend,
                                   filter_eps=filter_eps, **options)
    gen = torch.Generator(device=h.device).manual_seed(1)
    g = torch.randn(logp.shape, device=h.device, generator=gen, dtype=torch.float64)
    e = torch.randn(logp.shape, device=h.device, generator=gen, dtype=torch.float64)
    ((logp.double() * g).sum() + entropy_weight * (ent.double() * e).sum()).backward()
    out = {"logp": logp, "entropy": ent, "dhidden": hh.grad, "dweight": ww.grad}
    if bb is not None:
        out["dbias"] = bb.grad
    return {k: v.detach().double().cpu() for k, v in out.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,T,bias", [((1000, 576, 5003), 0.5, False), ((333, 200, 2049), 1.3, True)])
def test_triton_on_gpu_matches_float64_oracle(dtype, shape, T, bias):
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w, b, y = _inputs(*shape, dtype, bias=bias)
    exact = _run("reference", h.double(), w.double(), None if b is None else b.double(), y, T)
    same = _run("reference", h, w, b, y, T)
    fast = _run("triton", h, w, b, y, T)
    assert_within_oracle(fast, same, exact, dtype, label=f"gpu {dtype} {shape}")


@pytest.mark.parametrize("strategy,grad_matmul", [("sliced", "library"), ("sliced", "triton"), ("fused", "library")])
@pytest.mark.parametrize("filter_eps", [None, rk.AUTO_FILTER_EPS])
def test_every_backward_variant_on_gpu(strategy, grad_matmul, filter_eps):
    h, w, b, y = _inputs(1500, 640, 9001, torch.bfloat16, scale=6.0)
    exact = _run("reference", h.double(), w.double(), b.double(), y, 0.5)
    same = _run("reference", h, w, b, y, 0.5)
    fast = _run("triton", h, w, b, y, 0.5, filter_eps=filter_eps, backward=strategy, grad_matmul=grad_matmul)
    if filter_eps is None:
        assert_within_oracle(fast, same, exact, torch.bfloat16, label=f"{strategy}/{grad_matmul}")
    else:  # the filter's own error comes on top (bounded on CPU in test_gradient_filter.py)
        for name in ("dhidden", "dweight"):
            scale = exact[name].abs().max().item()
            assert (fast[name] - exact[name]).abs().max().item() <= 2e-2 * scale, name


def test_rlsc_loss_triton_equals_torch_backend_on_gpu():
    h, w, b, y = _inputs(777, 256, 3001, torch.bfloat16, scale=4.0)
    seq = torch.arange(777, device="cuda") % 16
    outs = {}
    for backend in ("torch", "triton"):
        ww = w.clone().requires_grad_()
        out = rk.linear_rlsc_loss(h, ww, y, seq_index=seq, bias=b, backend=backend, filter_eps=None)
        out.loss.backward()
        outs[backend] = (out.loss.double(), out.seq_logp.double(), ww.grad.double())
    assert torch.allclose(outs["triton"][1], outs["torch"][1], rtol=1e-4, atol=1e-3)
    scale = outs["torch"][2].abs().max()
    assert (outs["triton"][2] - outs["torch"][2]).abs().max() <= 2e-2 * scale


def test_filtered_mode_error_on_peaked_distribution():
    """Targets sampled from the model's own softmax at T = 0.5 with a peaked logit scale."""
    N, D, V, T = 2048, 512, 32000, 0.5
    h, w, b, _ = _inputs(N, D, V, torch.bfloat16, scale=10.0, bias=False)
    with torch.no_grad():
        z = (h.float() @ w.float().T) / T
        y = torch.distributions.Categorical(logits=z).sample()
        del z
    exact = _run("reference", h.double(), w.double(), None, y, T, entropy_weight=0.0)
    full = _run("triton", h, w, None, y, T, entropy_weight=0.0)
    filt = _run("triton", h, w, None, y, T, filter_eps=rk.AUTO_FILTER_EPS, entropy_weight=0.0)
    for name in ("dhidden", "dweight"):
        scale = exact[name].abs().max().item()
        e_full = (full[name] - exact[name]).abs().max().item() / scale
        e_filt = (filt[name] - exact[name]).abs().max().item() / scale
        print(f"{name}: exact-mode rel err {e_full:.2e}, filtered rel err {e_filt:.2e}")
        assert e_filt <= e_full + 4 * TOL[torch.bfloat16], name


def test_int64_offsets_when_n_times_v_exceeds_2_31():
    """N * V = 16400 * 140000 > 2^31: the last tokens' log-probs must still be right."""
    N, D, V = 16400, 64, 140000
    h, w, _, y = _inputs(N, D, V, torch.bfloat16, bias=False)
    y[-5:] = V - 1
    logp = rk.linear_logprobs(h, w, y, backend="triton")
    tail = rk.linear_logprobs(h[-64:].double(), w.double(), y[-64:], backend="reference")
    assert torch.allclose(logp[-64:].double(), tail, rtol=1e-3, atol=2e-2)


def test_int64_offsets_when_v_times_d_exceeds_2_31():
    N, D, V = 256, 4096, 530000  # V * D = 2.17e9
    h, w, _, y = _inputs(N, D, V, torch.bfloat16, bias=False)
    y[:8] = V - 1
    ww = w.clone().requires_grad_()
    rk.linear_logprobs(h, ww, y, backend="triton", filter_eps=None).sum().backward()
    rows = ww.grad[-3:].double()
    w_tail = w[-3:].double().requires_grad_()
    # gradient of sum(logp) w.r.t. the last rows, computed exactly from the full softmax
    with torch.no_grad():
        lse = torch.logsumexp((h.float() @ w.float().T).double(), dim=1)
    z = h.double() @ w_tail.T
    p = torch.exp(z - lse[:, None])
    onehot = (y[:, None] == torch.arange(V - 3, V, device="cuda")[None, :]).double() * (y[:, None] != -100)
    valid = (y != -100).double()[:, None]
    want = ((onehot - p * valid).T @ h.double())
    assert (rows - want).abs().max() <= 2e-2 * want.abs().max() + 1e-3
