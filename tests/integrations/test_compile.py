"""torch.compile(fullgraph=True) of code calling the public ops: the registered custom ops."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import rlsc_kernels as rk


def _inputs(N, D=24, V=103, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen, dtype=dtype)
    w = (torch.randn(V, D, generator=gen) / D**0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.3).to(dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    y[::4] = -100
    return h, w, b, y


def _logprob_loss(h, w, b, y):
    logp, ent = rk.linear_logprobs(h, w, y, bias=b, temperature=0.7, return_entropy=True, softcap=5.0)
    return (logp * torch.linspace(-1, 1, logp.shape[0])).sum() + 0.3 * ent.sum()


def _grads(fn, h, w, b, y):
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    loss = fn(hh, ww, bb, y)
    loss.backward()
    return loss.detach(), hh.grad, ww.grad, bb.grad


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_linear_logprobs_matches_eager_values_and_gradients():
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_logprob_loss, backend=counter, fullgraph=True)
    h, w, b, y = _inputs(37)
    for got, ref in zip(_grads(compiled, h, w, b, y), _grads(_logprob_loss, h, w, b, y)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    # The graph holds our op, not a decomposition of it.
    assert any("rlsc_kernels.logprobs_forward" in str(node.target) for g in counter.graphs for node in g.graph.nodes)


def _plain_loss(h, w, b, y):
    logp, ent = rk.linear_logprobs(h, w, y, bias=b, temperature=0.7, return_entropy=True, softcap=5.0)
    return logp.sum() + 0.3 * ent.sum()


def test_new_token_counts_do_not_recompile_every_call():
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_plain_loss, backend=counter, fullgraph=True)
    for N in (9, 14, 23, 31, 40, 57):
        h, w, b, y = _inputs(N, seed=N)
        _grads(compiled, h, w, b, y)
    # The first shape, then one recompilation that marks N dynamic; never one per size.
    assert counter.frame_count <= 2


def test_inductor_compiles_the_op_on_cpu():
    compiled = torch.compile(_logprob_loss, fullgraph=True)
    h, w, b, y = _inputs(21)
    for got, ref in zip(_grads(compiled, h, w, b, y), _grads(_logprob_loss, h, w, b, y)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _rlsc(h, w, b, y, mask):
    return rk.linear_rlsc_loss(h, w, y, completion_mask=mask, bias=b, temperature=0.5).loss


def test_compiled_rlsc_loss_padded_form_matches_eager():
    B, T = 3, 9
    h, w, b, y = _inputs(B * T)
    h, y = h.reshape(B, T, -1), y.reshape(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :3] = False
    compiled = torch.compile(_rlsc, backend="aot_eager", fullgraph=True)
    fn = lambda f: lambda hh, ww, bb, yy: f(hh, ww, bb, yy, mask)  # noqa: E731
    for got, ref in zip(_grads(fn(compiled), h, w, b, y), _grads(fn(_rlsc), h, w, b, y)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    int_mask = mask.long()  # 0/1 integer masks (as TRL builds them) work as in eager
    torch.testing.assert_close(compiled(h, w, b, y, int_mask), _rlsc(h, w, b, y, int_mask), rtol=1e-6, atol=1e-7)


def test_compiled_packed_form_needs_num_sequences():
    h, w, b, y = _inputs(12)
    seq = torch.arange(12) // 4

    def packed(h, w, y, num_sequences):
        return rk.linear_rlsc_loss(h, w, y, seq_index=seq, num_sequences=num_sequences).loss

    eager = packed(h, w, y, 3)
    compiled = torch.compile(packed, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(h, w, y, 3), eager)
    with pytest.raises(Exception, match="num_sequences"):
        compiled(h, w, y, None)


def test_compiled_op_under_autocast_matches_eager_autocast():
    h, w, b, y = _inputs(29)

    def fn(h, w, b, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return rk.linear_logprobs(h, w, y, bias=b).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, ref = _grads(compiled, h, w, b, y), _grads(fn, h, w, b, y)
    assert got[2].dtype == torch.float32  # fp32 master weight, gradient back through the cast
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_compiled_op_still_checks_values():
    h, w, b, y = _inputs(10)
    y[3] = 10_000
    compiled = torch.compile(lambda h, w, y: rk.linear_logprobs(h, w, y).sum(), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="targets"):
        compiled(h, w, y)


def test_vocab_parallel_is_refused_under_compile():
    h, w, b, y = _inputs(6)
    split = rk.VocabParallel(0, w.shape[0], None)
    compiled = torch.compile(lambda h, w, y: rk.linear_logprobs(h, w, y, vocab_parallel=split).sum(),
                             backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="vocab_parallel is not supported under torch.compile"):
        compiled(h, w, y)


@pytest.mark.gpu
def test_compiled_op_on_cuda_with_the_triton_backend():
    h, w, b, y = (t.cuda() for t in _inputs(300, D=64, V=1031))

    def fn(h, w, b, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp, ent = rk.linear_logprobs(h, w, y, bias=b, temperature=0.7, return_entropy=True, softcap=5.0)
        return logp.sum() + 0.3 * ent.sum()

    compiled = torch.compile(fn, fullgraph=True)
    for got, ref in zip(_grads(compiled, h, w, b, y), _grads(fn, h, w, b, y)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
