"""The single pass does three GEMM-equivalents at every sequence length (issue 19): the matrix
products that reach the dispatcher (benchmarks/flop_count.py's TorchDispatchMode, which sees the
native extension's at::mm_out too), counted for the loss's forward + backward at the SmolLM2
head (V = 49152, D = 576) at the default budgets: 16 x 64 (whole chunks), 2 x 1024 (whole
chunks of a grown block), 1 x 4096 (split). The products are skipped (dry): the counts depend on
shapes only. The two sweeps' 4.0 shows the counter counts."""
import pytest
import torch

import rlsc_kernels as rk
from benchmarks.flop_count import GemmCounter
from rlsc_kernels import single_pass
from rlsc_kernels.backends import native

D, V = 576, 49152
SHAPES = [(16, 64), (2, 1024), (1, 4096)]
CPU_BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no extension"))]


def count(backend, S, L, path="auto", D=D, V=V, **kw):
    N = S * L
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen).requires_grad_()
    W = (torch.randn(V, D, generator=gen) * 0.04).requires_grad_()
    b = torch.zeros(V, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=gen)
    seq = torch.arange(N) // L
    with GemmCounter(dry=True) as c:
        out = rk.linear_rlsc_loss(h, W, y, seq_index=seq, bias=b, backend=backend, path=path, check_values=False, **kw)
        out.loss.backward()
    return c.gemm_equivalents(N, V, D), c


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("S,L", SHAPES)
def test_single_pass_is_three_gemm_equivalents_at_every_length(backend, S, L):
    gemms, c = count(backend, S, L)
    assert gemms <= 3.1, f"{backend} {S}x{L}: {gemms:.3f} GEMM-equivalents {dict(c.by_op)}"
    assert gemms >= 3.0  # the logits, dhidden and dweight products all counted


def test_the_counter_sees_the_two_sweeps_fourth_gemm():
    gemms, _ = count("torch", 16, 64, path="two-sweep")
    assert gemms >= 3.9


def test_the_long_sequences_take_the_layouts_the_cost_model_names():
    rows = single_pass.budget_rows(V, torch.float32, native.BUFFER_BYTES)
    assert rows == 682
    assert single_pass.plan([64] * 16, V, D, torch.float32, native.BUFFER_BYTES, True).layout == "whole"
    grown = single_pass.plan([1024] * 2, V, D, torch.float32, native.BUFFER_BYTES, True)
    assert (grown.layout, grown.rows) == ("whole", 1024)
    split = single_pass.plan([4096], V, D, torch.float32, native.BUFFER_BYTES, True)
    assert (split.layout, split.rows, len(split.chunks)) == ("split", 682, 7)


@pytest.mark.interpreter
def test_triton_single_pass_is_three_gemm_equivalents_when_split():
    """Triton in the interpreter, at a small head (the row kernels are slow there): two sequences
    split over 40-row chunks, one of them into the open accumulator."""
    Dt, Vt = 32, 515
    gemms, c = count("triton", 2, 150, D=Dt, V=Vt, buffer_bytes=Vt * 4 * 40)
    assert single_pass.plan([150, 150], Vt, Dt, torch.float32, Vt * 4 * 40, True).layout == "split"
    assert 3.0 <= gemms <= 3.1, dict(c.by_op)
