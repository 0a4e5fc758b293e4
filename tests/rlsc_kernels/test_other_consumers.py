"""linear_logprobs serves losses other than RLSC: a GRPO/PPO clipped objective on per-token
log-probs of padded completions, with temperature, gives the reference gradient."""
import pytest
import torch

import rlsc_kernels as rk

pytestmark = pytest.mark.interpreter


def grpo_loss(logp, old_logp, advantages, mask, clip=0.2):
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.minimum(ratio * advantages[:, None], ratio.clamp(1 - clip, 1 + clip) * advantages[:, None])
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grpo_clipped_objective_gradient_matches_reference(backend):
    torch.manual_seed(0)
    B, T, D, V = 4, 13, 24, 150
    hidden = torch.randn(B, T, D)
    weight = torch.randn(V, D) * 0.4
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    targets[~mask] = -100
    advantages = torch.randn(B)
    with torch.no_grad():
        old = rk.linear_logprobs(hidden, weight, targets, temperature=0.7, backend="reference") + 0.1 * torch.randn(B, T)
    grads = {}
    for name in ("reference", backend):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp = rk.linear_logprobs(h, w, targets, temperature=0.7, backend=name, filter_eps=None)
        assert logp.shape == (B, T) and logp.dtype == torch.float32
        grpo_loss(logp, old, advantages, mask.float()).backward()
        grads[name] = (h.grad, w.grad)
    for got, want in zip(grads[backend], grads["reference"]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
