"""Weights are finite for every L and follow the paper's formulas."""
import math

import pytest
import torch

import rlsc_kernels as rk


@pytest.mark.parametrize("weighting", rk.WEIGHTINGS)
def test_weights_are_finite_for_extreme_log_probs(weighting):
    L = torch.tensor([0.0, -1e-6, -3.0, -87.5, -745.2, -1e5, -3.4e38, 1e-7])
    n = torch.tensor([1, 1, 5, 100, 1000, 3000, 3072, 1])
    w = rk.rlsc_weights(L, n, weighting, alpha=0.1)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()


def test_formulas():
    L = torch.tensor([-0.5, -2.0])
    n = torch.tensor([2, 4])
    assert torch.allclose(rk.rlsc_weights(L, n, "rlsc", 0.1), torch.tensor([math.exp(-0.5) + 0.1, math.exp(-2) + 0.1]))
    assert torch.allclose(rk.rlsc_weights(L, n, "rlsc-l1", 0.1), L.exp())
    assert torch.allclose(rk.rlsc_weights(L, n, "entropy", 0.1), 1 + L)
    assert torch.allclose(rk.rlsc_weights(L, n, "length", 0.1), torch.tensor([math.exp(-0.25) + 0.1, math.exp(-0.5) + 0.1]))


def test_weights_are_detached():
    L = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert not rk.rlsc_weights(L, torch.tensor([1, 1]), "rlsc").requires_grad


def test_external_weight_tensor_is_checked():
    L = torch.tensor([-1.0, -2.0])
    assert torch.equal(rk.rlsc_weights(L, None, torch.tensor([1.0, 0.0], dtype=torch.float64)), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"weighting tensor must have shape \[2\]"):
        rk.rlsc_weights(L, None, torch.ones(3))
    with pytest.raises(TypeError, match="floating point"):
        rk.rlsc_weights(L, None, torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="weighting must be one of"):
        rk.rlsc_weights(L, None, "softmax")
