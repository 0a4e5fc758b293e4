"""linear_rlsc_loss: every weighting and reduction, padded and packed forms, gradients, against
the paper's Algorithm 1 computed naively in float64."""
import math

import pytest
import torch

import rlsc_kernels as rk
from rlsc_kernels.backends import triton_sweeps

from .oracle import TOL, small_blocks

pytestmark = pytest.mark.interpreter


def algorithm1(hidden, weight, bias, targets, mask, temperature, alpha, weighting, reduction):
    """The paper's Algorithm 1 written out: full logits, log_softmax(z / T), gather, masked sum,
    loss = -sum_s w_s log p_s. hidden [B, T, D], mask [B, T]."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    tok = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    seq = tok.sum(-1)
    n = mask.sum(-1).double()
    L = seq.detach()
    if isinstance(weighting, torch.Tensor):
        w = weighting.double()
    else:
        w = {"rlsc": L.exp() + alpha, "rlsc-l1": L.exp(), "entropy": 1 + L, "length": (L / n).exp() + alpha}[weighting]
    loss = -(w * seq).sum()
    return (loss / len(seq) if reduction == "mean" else loss), seq, w


def _padded_batch(B=4, T=23, D=20, V=131, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=gen, dtype=torch.float64) * scale / D**0.5).to(dtype)
    bias = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # a prompt of varying length, then the completion, then padding
        start, stop = 2 + b, T - 3 * b
        mask[b, start:stop] = True
    targets[~mask] = torch.where(torch.rand((~mask).sum().item(), generator=gen) < 0.5, -100, 7)
    return hidden, weight, bias, targets, mask


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("weighting", ["rlsc", "rlsc-l1", "entropy", "length", "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_grads_match_algorithm1(backend, weighting, reduction):
    hidden, weight, bias, targets, mask = _padded_batch(seed=hash((backend, weighting, reduction)) % 1000)
    temperature, alpha = 0.5, 0.1
    w_ext = torch.rand(hidden.shape[0], dtype=torch.float64) if weighting == "tensor" else None
    weighting_arg = w_ext.float() if w_ext is not None else weighting
    h64 = hidden.double().requires_grad_()
    W64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    ref_loss, ref_seq, ref_w = algorithm1(h64, W64, b64, targets, mask.double(), temperature, alpha,
                                          w_ext if w_ext is not None else weighting, reduction)
    ref_loss.backward()

    h = hidden.clone().requires_grad_()
    W = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    out = rk.linear_rlsc_loss(h, W, targets, completion_mask=mask, bias=b, temperature=temperature, alpha=alpha,
                              weighting=weighting_arg, reduction=reduction, backend=backend, filter_eps=None,
                              **small_blocks())
    out.loss.backward()
    assert torch.allclose(out.seq_logp.double(), ref_seq.detach(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(out.seq_weight.double(), ref_w.float().double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.n_tokens, mask.sum(-1))
    assert out.token_logp.shape == (int(mask.sum()),)
    assert math.isclose(out.loss.item(), ref_loss.item(), rel_tol=1e-5, abs_tol=1e-5)
    for got, want in ((h.grad, h64.grad), (W.grad, W64.grad), (b.grad, b64.grad)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2e-5 * scale + 1e-7
    # prompt and padding positions never reach the head
    assert (h.grad[~mask] == 0).all()


def test_packed_form_equals_padded_form():
    hidden, weight, bias, targets, mask = _padded_batch(seed=5)
    padded = rk.linear_rlsc_loss(hidden, weight, targets, completion_mask=mask, bias=bias, backend="torch")
    B, T = mask.shape
    seq_index = torch.arange(B)[:, None].expand(B, T)[mask]
    packed = rk.linear_rlsc_loss(hidden[mask], weight, targets[mask], seq_index=seq_index, bias=bias, backend="torch")
    assert torch.allclose(padded.loss, packed.loss)
    assert torch.allclose(padded.seq_logp, packed.seq_logp)
    # Ignored targets inside the packed form are skipped, not scored.
    y = targets[mask].clone()
    y[::3] = -100
    skipped = rk.linear_rlsc_loss(hidden[mask], weight, y, seq_index=seq_index, bias=bias, backend="torch")
    keep = y != -100
    manual = torch.zeros(B).index_add(0, seq_index[keep], packed.token_logp[keep])
    assert torch.allclose(skipped.seq_logp, manual, atol=1e-6)
    assert torch.equal(skipped.n_tokens, torch.zeros(B, dtype=torch.long).index_add(0, seq_index, keep.long()))


def test_micro_batches_with_sum_reduction_reproduce_the_full_batch_gradient():
    """Each weight depends on its own sequence only, so micro-batches with reduction='sum' and a
    1/S scale give the full batch's 'mean' gradient exactly."""
    hidden, weight, bias, targets, mask = _padded_batch(B=6, seed=9)
    W_full = weight.clone().requires_grad_()
    rk.linear_rlsc_loss(hidden, W_full, targets, completion_mask=mask, backend="torch").loss.backward()
    W_micro = weight.clone().requires_grad_()
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        out = rk.linear_rlsc_loss(hidden[rows], W_micro, targets[rows], completion_mask=mask[rows],
                                  reduction="sum", backend="torch")
        (out.loss / 6).backward()
    assert torch.allclose(W_full.grad, W_micro.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_loss_within_same_dtype_torch_error(dtype):
    hidden, weight, bias, targets, mask = _padded_batch(B=3, T=17, D=40, V=97, dtype=dtype, seed=11)
    exact = rk.linear_rlsc_loss(hidden.double(), weight.double(), targets, completion_mask=mask, bias=bias.double(),
                                backend="reference")
    same = rk.linear_rlsc_loss(hidden, weight, targets, completion_mask=mask, bias=bias, backend="reference")
    for backend in ("torch", "triton"):
        fast = rk.linear_rlsc_loss(hidden, weight, targets, completion_mask=mask, bias=bias, backend=backend,
                                   filter_eps=None, **small_blocks())
        for name in ("loss", "seq_logp"):
            e_fast = (getattr(fast, name).double() - getattr(exact, name)).abs().max().item()
            e_ref = (getattr(same, name).double() - getattr(exact, name)).abs().max().item()
            assert e_fast <= e_ref + TOL[dtype] * getattr(exact, name).abs().max().item(), (backend, name)


def test_return_entropy_gives_token_entropies():
    hidden, weight, bias, targets, mask = _padded_batch(seed=2)
    out = rk.linear_rlsc_loss(hidden, weight, targets, completion_mask=mask, bias=bias, backend="torch",
                              return_entropy=True)
    logits = (hidden[mask] @ weight.T + bias).double() / 0.5
    want = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(out.token_entropy.double(), want, rtol=1e-5, atol=1e-5)
    assert rk.linear_rlsc_loss(hidden, weight, targets, completion_mask=mask, backend="torch").token_entropy is None


def test_module_holds_options():
    hidden, weight, bias, targets, mask = _padded_batch(seed=4)
    module = rk.LinearRLSCLoss(temperature=0.7, alpha=0.2, weighting="length", reduction="sum", backend="torch")
    got = module(hidden, weight, targets, completion_mask=mask, bias=bias)
    want = rk.linear_rlsc_loss(hidden, weight, targets, completion_mask=mask, bias=bias, temperature=0.7, alpha=0.2,
                               weighting="length", reduction="sum", backend="torch")
    assert torch.allclose(got.loss, want.loss)
    assert "length" in repr(module)


def test_long_completions_underflow_to_alpha_without_nan():
    """exp(L) of a long completion underflows; the weight must become exactly alpha, never NaN."""
    hidden, weight, bias, targets, mask = _padded_batch(B=2, T=200, D=16, V=4000, seed=8, scale=0.5)
    mask[:] = True
    targets = torch.randint(0, 4000, targets.shape)
    out = rk.linear_rlsc_loss(hidden, weight, targets, completion_mask=mask, alpha=0.1, backend="torch")
    assert (out.seq_logp < -1000).all()
    assert torch.equal(out.seq_weight, torch.full((2,), 0.1))
    assert torch.isfinite(out.loss)
