"""--precision auto on a CPU: bf16-autocast only where the CPU has bf16 units and a decode step of
the loaded model measures faster in it; the measurement leaves the run's random stream and the
model's mode as they were."""
from __future__ import annotations

import time

import pytest
import torch

import rlsc.decoding
import rlsc_kernels.backends.native as native
from rlsc.config import RLSCConfig
from rlsc.precision import CPU_BF16_MAX_RATIO, choose_cpu_precision
from rlsc.train import load

from conftest import make_model


def test_no_bf16_units_means_fp32_without_measuring(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(native, "cpu_bf16_units", lambda: (False, False))
    monkeypatch.setattr(rlsc.decoding, "decode", lambda *a, **k: pytest.fail("measured without bf16 units"))
    choice, why = choose_cpu_precision(make_model(tiny_tokenizer))
    assert choice == "fp32" and "no bf16 units" in why


@pytest.mark.parametrize("fp32_seconds, bf16_seconds, expected", [
    (0.05, 0.02, "bf16-autocast"),                          # clearly faster
    (0.05, 0.05 * CPU_BF16_MAX_RATIO + 0.01, "fp32"),       # faster, but not by the margin
    (0.02, 0.05, "fp32"),                                   # slower
])
def test_the_choice_follows_the_measured_times(tiny_tokenizer, monkeypatch, fp32_seconds, bf16_seconds, expected):
    monkeypatch.setattr(native, "cpu_bf16_units", lambda: (False, True))
    modes = []

    def fake_decode(model, *args, **kwargs):
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        modes.append(bf16)
        t0 = time.process_time()
        while time.process_time() - t0 < (bf16_seconds if bf16 else fp32_seconds):   # CPU time, as measured
            pass

    monkeypatch.setattr(rlsc.decoding, "decode", fake_decode)
    choice, why = choose_cpu_precision(make_model(tiny_tokenizer))
    assert choice == expected, why
    assert modes == [False, True, False, True]   # warm-up, then the measured pair
    assert "AVX512-BF16" in why


def test_the_real_measurement_keeps_the_random_stream_and_the_mode(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    model.train()
    torch.manual_seed(3)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    choice, why = choose_cpu_precision(model, rows=3, prompt_tokens=5, steps=2, train_tokens=4)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    assert choice in ("fp32", "bf16-autocast") and "s in fp32, one thread" in why and "forward + backward" in why
    assert torch.get_num_threads() == threads


def test_load_resolves_auto_on_cpu_and_says_so(tiny_model_dir, monkeypatch):
    monkeypatch.setattr("rlsc.train.choose_cpu_precision", lambda model: ("bf16-autocast", "measured"))
    lines = []
    loaded = load(RLSCConfig(model=str(tiny_model_dir), device="cpu", precision="auto"), log=lines.append)
    assert loaded.precision == "bf16-autocast" and loaded.autocast_dtype == torch.bfloat16
    assert any(line.startswith("--precision auto: bf16-autocast (measured)") for line in lines)
    assert next(loaded.model.parameters()).dtype == torch.float32    # fp32 masters under autocast
    loaded = load(RLSCConfig(model=str(tiny_model_dir), device="cpu", precision="fp32"), log=lines.append)
    assert loaded.precision == "fp32"
