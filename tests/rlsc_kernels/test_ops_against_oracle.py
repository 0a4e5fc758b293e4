"""linear_logprobs on every backend against the float64 oracle: awkward shapes, ignored tokens,
bias, temperatures 0.3..2, every dtype, log-probs, entropies and all three gradients."""
import pytest
import torch

from .oracle import BACKWARD_VARIANTS, assert_within_oracle, make_inputs, run_logprobs, small_blocks

pytestmark = pytest.mark.interpreter

SHAPES = [(37, 50, 301), (5, 19, 97), (64, 48, 130)]  # none a multiple of 16/32 in every dim


def _check(backend, dtype, shape, temperature, bias, seed, strategy="sliced"):
    N, D, V = shape
    h, w, b, y = make_inputs(N, D, V, dtype=dtype, bias=bias, seed=seed)
    exact = run_logprobs("reference", h.double(), w.double(), None if b is None else b.double(), y,
                         temperature=temperature)
    same_dtype = run_logprobs("reference", h, w, b, y, temperature=temperature)
    fast = run_logprobs(backend, h, w, b, y, temperature=temperature, filter_eps=None, **small_blocks(strategy))
    assert_within_oracle(fast, same_dtype, exact, dtype, label=f"{backend}/{strategy} {dtype} {shape} T={temperature} bias={bias}")
    ignored = y == -100
    assert (fast["logp"][ignored] == 0).all() and (fast["entropy"][ignored] == 0).all()
    assert (fast["dhidden"][ignored] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-sliced-sparse", "triton-fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature,bias,shape", [(0.3, True, SHAPES[0]), (1.0, False, SHAPES[1]), (2.0, True, SHAPES[2])])
def test_logprobs_entropy_and_grads_match_float64_oracle(backend, dtype, temperature, bias, shape):
    """"triton" runs the default backward (sliced, library matmuls), the suffixes the others."""
    variant = backend.partition("-")[2] or "sliced"
    _check(backend.split("-")[0], dtype, shape, temperature, bias, seed=None, strategy=variant)


def test_torch_backend_accepts_float64_and_is_exact():
    h, w, b, y = make_inputs(23, 17, 89, dtype=torch.float64, seed=None)
    exact = run_logprobs("reference", h, w, b, y, temperature=0.5)
    fast = run_logprobs("torch", h, w, b, y, temperature=0.5)
    for k in exact:
        assert torch.allclose(fast[k], exact[k], rtol=1e-10, atol=1e-12), k


def test_torch_backend_chunks_tokens_and_vocab(monkeypatch):
    """Force many token chunks (buffer_bytes) and vocab slices: the online logsumexp must still be exact."""
    from rlsc_kernels.backends import torch_chunked

    monkeypatch.setattr(torch_chunked, "VOCAB_SLICE", 40)
    h, w, b, y = make_inputs(29, 13, 151, dtype=torch.float16, seed=None)
    exact = run_logprobs("reference", h.double(), w.double(), b.double(), y, temperature=0.7)
    same = run_logprobs("reference", h, w, b, y, temperature=0.7)
    fast = run_logprobs("torch", h, w, b, y, temperature=0.7, buffer_bytes=7 * 151 * 4)
    assert_within_oracle(fast, same, exact, torch.float16)


@pytest.mark.parametrize("strategy,grad_matmul", [("sliced", "library"), ("sliced", "triton"), ("fused", "library")])
def test_triton_shipped_block_sizes_in_interpreter(strategy, grad_matmul):
    """The block sizes that ship (not the small test ones), on a shape that is not a multiple of them."""
    h, w, b, y = make_inputs(70, 72, 300, dtype=torch.float16, seed=None)
    exact = run_logprobs("reference", h.double(), w.double(), b.double(), y, temperature=0.5)
    same = run_logprobs("reference", h, w, b, y, temperature=0.5)
    fast = run_logprobs("triton", h, w, b, y, temperature=0.5, filter_eps=None, backward=strategy,
                        grad_matmul=grad_matmul)
    assert_within_oracle(fast, same, exact, torch.float16)


@pytest.mark.parametrize("variant", ["sliced", "sliced-sparse"])
def test_sliced_backward_spans_several_vocab_slices(variant):
    """Force slices of 64 vocab rows (several per call) with an explicit buffer_bytes: dweight
    rows, dbias and the fp32 dhidden accumulation across slices must all line up."""
    h, w, b, y = make_inputs(37, 40, 301, dtype=torch.float32, seed=None)
    exact = run_logprobs("reference", h.double(), w.double(), b.double(), y, temperature=0.9)
    same = run_logprobs("reference", h, w, b, y, temperature=0.9)
    fast = run_logprobs("triton", h, w, b, y, temperature=0.9, filter_eps=None, buffer_bytes=37 * 64 * 4,
                        **small_blocks(variant))
    assert_within_oracle(fast, same, exact, torch.float32)


def test_non_contiguous_inputs_and_tied_embedding():
    """hidden as a strided view, weight as a transposed copy's transpose, and a weight that is also
    used as the input embedding: its gradient sums both uses."""
    torch.manual_seed(1)
    V, D = 83, 24
    emb = torch.randn(V, D, dtype=torch.float64) / D**0.5
    ids = torch.randint(0, V, (3, 11))
    y = torch.randint(0, V, (3, 11))
    grads = {}
    for backend in ("reference", "torch", "triton"):
        dtype = torch.float64 if backend == "reference" else torch.float32
        table = emb.to(dtype).t().contiguous().t().requires_grad_()  # non-contiguous [V, D] leaf
        assert not table.is_contiguous()
        hidden = torch.nn.functional.embedding(ids, table).transpose(0, 1)  # [11, 3, D] strided
        hidden = torch.tanh(hidden) * 2
        logp = __import__("rlsc_kernels").linear_logprobs(hidden, table, y.t(), temperature=0.8, backend=backend,
                                                          filter_eps=None)
        logp.sum().backward()
        grads[backend] = (logp.detach().double(), table.grad.double())
    for backend in ("torch", "triton"):
        assert torch.allclose(grads[backend][0], grads["reference"][0], rtol=1e-5, atol=1e-5)
        assert torch.allclose(grads[backend][1], grads["reference"][1], rtol=1e-4, atol=1e-5)


def test_only_hidden_needs_grad_frozen_head():
    h, w, b, y = make_inputs(21, 16, 70, dtype=torch.float32, seed=3)
    import rlsc_kernels as rk

    for backend in ("torch", "triton"):
        hh = h.clone().requires_grad_()
        rk.linear_logprobs(hh, w, y, bias=b, backend=backend).sum().backward()
        ref = h.double().clone().requires_grad_()
        rk.linear_logprobs(ref, w.double(), y, bias=b.double(), backend="reference").sum().backward()
        assert torch.allclose(hh.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


def test_fused_backward_slices_a_16bit_dweight_by_buffer_bytes():
    """buffer_bytes bounds the fused backward's fp32 dweight slice: 64 vocab rows per slice here."""
    h, w, b, y = make_inputs(29, 40, 301, dtype=torch.float16, seed=None)
    exact = run_logprobs("reference", h.double(), w.double(), b.double(), y, temperature=0.8)
    same = run_logprobs("reference", h, w, b, y, temperature=0.8)
    fast = run_logprobs("triton", h, w, b, y, temperature=0.8, filter_eps=None, buffer_bytes=64 * 40 * 4,
                        **small_blocks("fused"))
    assert_within_oracle(fast, same, exact, torch.float16)
