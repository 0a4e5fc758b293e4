"""The synthetic inputs have the entropy they are tuned to, and their targets are samples of that softmax."""
import math

import pytest
import torch

from benchmarks.inputs import fit_logit_scale, make_inputs, token_entropy


@pytest.mark.parametrize("target", [0.434, 2.0])
def test_generated_inputs_have_the_target_mean_entropy(target):
    inp = make_inputs(4096, 64, 4, 128, dtype=torch.float32, target_entropy=target, probe_tokens=512)
    assert abs(inp.mean_entropy - target) < 0.05 * max(1.0, target)
    z = (inp.hidden.double() @ inp.weight.double().T) / inp.temperature
    assert float(token_entropy(z).mean()) == pytest.approx(inp.mean_entropy, rel=1e-4)


def test_fit_logit_scale_inverts_the_entropy():
    z0 = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    c = fit_logit_scale(z0, 1.5)
    assert float(token_entropy(z0 * c).mean()) == pytest.approx(1.5, abs=1e-3)


def test_sampled_targets_have_mean_log_prob_minus_the_entropy():
    # E_{y ~ p}[log p(y)] = -H(p): a sampler biased to the mode (or to uniform) fails this.
    inp = make_inputs(512, 32, 16, 256, dtype=torch.float32, target_entropy=1.0)
    z = (inp.hidden.double() @ inp.weight.double().T) / inp.temperature
    logp = torch.log_softmax(z, -1).gather(1, inp.targets[:, None])[:, 0]
    n = inp.N
    sd = float(logp.std()) / math.sqrt(n)
    assert float(logp.mean()) == pytest.approx(-inp.mean_entropy, abs=4 * sd + 0.02)


def test_slice_regroups_tokens_into_equal_sequences():
    inp = make_inputs(256, 16, 4, 100, dtype=torch.float32)
    s = inp.slice(256, 4)
    assert s.N == 256 and s.n_seqs == 4
    assert torch.equal(s.seq_index.bincount(), torch.full((4,), 64))
    assert torch.equal(s.targets, inp.targets[:256])
