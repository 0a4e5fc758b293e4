"""pytest-benchmark microbenchmarks of both ops for each implementation that runs here.

    pytest benchmarks/ --benchmark-only            # CPU: small head, fp32; GPU: Qwen2.5-7B head, 16 x 256, bf16

Not part of the test suite (pyproject's testpaths = tests); no timing is asserted.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import impls as I
from benchmarks.inputs import make_inputs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPE = dict(V=152064, D=3584, n_seqs=16, seq_len=256) if CUDA else dict(V=8192, D=256, n_seqs=4, seq_len=64)
DTYPE = torch.bfloat16 if CUDA else torch.float32
NAMES = ["rlsc-triton", "rlsc-triton-exact", "rlsc-torch", "cce", "liger", "torch-naive", "torch-chunked",
         "torch-linear-ce", "matmul-floor"]


@pytest.fixture(scope="module")
def inp():
    return make_inputs(SHAPE["V"], SHAPE["D"], SHAPE["n_seqs"], SHAPE["seq_len"], dtype=DTYPE, device=DEVICE)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, fn):
    def call():
        out = fn()
        _sync()
        return out

    benchmark.pedantic(call, warmup_rounds=1, rounds=10 if CUDA else 3, iterations=1)


@pytest.mark.parametrize("name", NAMES)
def test_logprobs_fwd(benchmark, inp, name):
    impl = I.IMPLS[name]
    why = impl.unavailable("logprobs_fwd", DEVICE)
    if why:
        pytest.skip(why)
    benchmark.extra_info.update(shape=SHAPE, dtype=str(DTYPE), op="logprobs_fwd")

    def fn():
        with torch.no_grad():
            return impl.logprobs(inp)

    _run(benchmark, fn)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "matmul-floor"])
def test_rlsc_fwd_bwd(benchmark, inp, name):
    impl = I.IMPLS[name]
    why = impl.unavailable("rlsc_fwd_bwd", DEVICE)
    if why:
        pytest.skip(why)
    benchmark.extra_info.update(shape=SHAPE, dtype=str(DTYPE), op="rlsc_fwd_bwd")
    h = inp.hidden.detach().requires_grad_()
    W = inp.weight.detach().requires_grad_()
    _run(benchmark, lambda: impl.fwd_bwd(inp, h, W))
