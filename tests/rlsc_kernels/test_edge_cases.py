"""Legal edge cases just work, on every backend: empty sequences and empty batches, entropy for
logging only, autocast; double backward fails clearly; value checks off means no host sync."""
import contextlib
import math

import pytest
import torch

import rlsc_kernels as rk
from rlsc_kernels.backends import native_available
from rlsc_kernels.backends import torch_chunked, triton_sweeps

from .oracle import make_inputs, small_blocks

pytestmark = pytest.mark.interpreter

BACKENDS = ["torch", "triton", "reference"] + (["native"] if native_available() else [])


def _leaves(N, D=12, V=40, bias=True, dtype=torch.float32, shape=None, ignore_frac=0.2):
    h, w, b, y = make_inputs(max(N, 1), D, V, dtype=dtype, bias=bias, seed=1, ignore_frac=ignore_frac)
    h, y = h[:N], y[:N]
    if shape is not None:
        h, y = h.reshape(*shape, D), y.reshape(shape)
    return h.requires_grad_(), w.requires_grad_(), (b.requires_grad_() if b is not None else None), y


def _assert_zero_grads(*tensors):
    for t in tensors:
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5)])
def test_logprobs_of_zero_tokens_is_empty_and_differentiable(backend, shape):
    h, w, b, y = _leaves(0, shape=shape)
    logp, ent = rk.linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend, **small_blocks())
    assert logp.shape == shape and ent.shape == shape and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    _assert_zero_grads(h, w, b)


def _empty_batches(D=12):
    """(description, hidden, targets, kwargs) of batches with nothing to score."""
    h3, _, _, y3 = _leaves(6, D=D, shape=(2, 3))
    y_ignored = torch.full((5,), -100)
    return [
        ("padded, every token masked", h3, y3, dict(completion_mask=torch.zeros(2, 3, dtype=torch.bool)), 2),
        ("padded, no positions", h3[:, :0], y3[:, :0], dict(completion_mask=torch.zeros(2, 0, dtype=torch.bool)), 2),
        ("padded, no rows", h3[:0], y3[:0], {}, 0),
        ("packed, no tokens", h3.reshape(-1, D)[:0], y3.reshape(-1)[:0], {}, 0),
        ("packed, no tokens, num_sequences", h3.reshape(-1, D)[:0], y3.reshape(-1)[:0],
         dict(seq_index=torch.zeros(0, dtype=torch.long), num_sequences=4), 4),
        ("packed, every target ignored", h3.reshape(-1, D)[:5], y_ignored, dict(seq_index=torch.tensor([0, 0, 1, 2, 2])), 3),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["rlsc", "length", "entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_gives_a_differentiable_zero_loss(backend, weighting, reduction):
    for label, h, y, kwargs, S in _empty_batches():
        w = torch.randn(40, 12).requires_grad_()
        b = torch.randn(40).requires_grad_()
        hh = h.detach().requires_grad_()
        out = rk.linear_rlsc_loss(hh, w, y, bias=b, weighting=weighting, reduction=reduction, backend=backend,
                                  return_entropy=True, **kwargs, **small_blocks())
        assert out.loss.item() == 0 and out.loss.requires_grad, label
        assert out.seq_logp.shape == (S,) and (out.seq_logp == 0).all(), label
        assert out.n_tokens.shape == (S,) and (out.n_tokens == 0).all(), label
        assert torch.isfinite(out.seq_weight).all(), label
        out.loss.backward()
        _assert_zero_grads(hh, w, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sequence_without_scored_tokens_contributes_nothing(backend):
    """Dropping the empty sequences changes nothing but S; 'mean' divides by S, empty ones included."""
    D, V = 12, 40
    h, w, b, y = _leaves(9, D=D, V=V, ignore_frac=0.0)
    seq = torch.tensor([0, 0, 2, 2, 2, 4, 4, 5, 5])  # sequences 1 and 3 carry no token,
    y = y.clone()
    y[7:] = -100  # and every target of sequence 5 is ignored
    full = rk.linear_rlsc_loss(h, w, y, seq_index=seq, bias=b, reduction="sum", weighting="length",
                               backend=backend, **small_blocks())
    full.loss.backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    keep = seq < 5
    dense = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    ref = rk.linear_rlsc_loss(h[keep], w, y[keep], seq_index=dense, bias=b, reduction="sum", weighting="length",
                              backend=backend, **small_blocks())
    ref.loss.backward()
    assert torch.equal(full.n_tokens, torch.tensor([2, 0, 3, 0, 2, 0]))
    assert (full.seq_logp[[1, 3, 5]] == 0).all()
    assert torch.allclose(full.seq_logp[[0, 2, 4]], ref.seq_logp)
    assert torch.allclose(full.loss, ref.loss)
    for got, want in zip(grads, (h.grad, w.grad, b.grad)):
        assert torch.allclose(got[: want.shape[0]], want, atol=1e-7)
    mean = rk.linear_rlsc_loss(h, w, y, seq_index=seq, bias=b, reduction="mean", weighting="length", backend=backend,
                               **small_blocks())
    assert math.isclose(mean.loss.item(), full.loss.item() / 6, rel_tol=1e-6)
    padded = rk.linear_rlsc_loss(h.detach()[:8].reshape(2, 4, D), w, y[:8].reshape(2, 4), bias=b,
                                 completion_mask=torch.tensor([[True] * 4, [False] * 4]), backend=backend,
                                 **small_blocks())
    assert torch.equal(padded.n_tokens, torch.tensor([4, 0])) and padded.seq_logp[1] == 0


def _recording(module, monkeypatch):
    """Records the grad_entropy each backward call of `module` receives."""
    seen = []
    original = module.backward

    def backward(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, opts, needs):
        seen.append(grad_entropy)
        return original(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, opts, needs)

    monkeypatch.setattr(module, "backward", backward)
    return seen


@pytest.mark.parametrize("backend,module", [("torch", torch_chunked), ("triton", triton_sweeps)])
def test_entropy_for_logging_only_skips_the_entropy_backward(backend, module, monkeypatch):
    seen = _recording(module, monkeypatch)
    h, w, b, y = _leaves(20)
    # the two sweeps' Function (the single pass has its own, tested with it)
    logged = rk.linear_rlsc_loss(h, w, y, bias=b, return_entropy=True, backend=backend, path="two-sweep",
                                 **small_blocks())
    logged.loss.backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    assert logged.token_entropy is not None and seen == [None]  # no entropy path in the backward
    for t in (h, w, b):
        t.grad = None
    plain = rk.linear_rlsc_loss(h, w, y, bias=b, backend=backend, path="two-sweep", **small_blocks())
    plain.loss.backward()
    for got, want in zip(grads, (h.grad, w.grad, b.grad)):
        assert torch.equal(got, want)
    # Used in a loss, the entropy does reach the backend.
    logp, ent = rk.linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend, **small_blocks())
    (logp.sum() + ent.sum()).backward()
    assert seen[-1] is not None
    # Entropy alone: the log-prob gradient is not materialised either.
    seen.clear()
    _, ent = rk.linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend, **small_blocks())
    ent.sum().backward()
    assert len(seen) == 1 and seen[0] is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_raises_a_clear_error(backend):
    h, w, b, y = _leaves(10)
    logp = rk.linear_logprobs(h, w, y, bias=b, backend=backend, **small_blocks())
    (dh,) = torch.autograd.grad(logp.sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="backward is not differentiable"):
        dh.sum().backward()
    # create_graph=True alone (gradients not differentiated again) still works
    (dh2,) = torch.autograd.grad(rk.linear_logprobs(h, w, y, backend=backend).sum(), h, create_graph=True)
    assert torch.isfinite(dh2).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_like_f_linear_in_the_autocast_dtype(backend):
    """Inside bf16 autocast fp32 hidden/weight/bias run in bf16 (the result equals an explicit
    bf16 call), outputs stay fp32, and the fp32 leaves get fp32 gradients, rounded only once."""
    h, w, b, y = _leaves(23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = rk.linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend, **small_blocks())
        loss = rk.linear_rlsc_loss(h, w, y, bias=b, backend=backend, **small_blocks()).loss
    assert logp.dtype == ent.dtype == loss.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    h16, w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (h, w, b))
    logp16, ent16 = rk.linear_logprobs(h16, w16, y, bias=b16, return_entropy=True, backend=backend, **small_blocks())
    loss16 = rk.linear_rlsc_loss(h16, w16, y, bias=b16, backend=backend, **small_blocks()).loss
    (logp16.sum() + ent16.sum()).backward()
    assert torch.equal(logp, logp16) and torch.equal(ent, ent16) and torch.equal(loss, loss16)
    # The fp32 leaves get the same fp32 accumulation, not rounded to bf16 on the way (the one
    # rounding is to the leaves' dtype): rounded to bf16 it is the bf16 call's gradient.
    for got, want in ((h.grad, h16.grad), (w.grad, w16.grad), (b.grad, b16.grad)):
        assert torch.equal(got.to(want.dtype), want)
    # bf16 inputs with a bf16 bias that autocast leaves alone; fp64 is not an autocast dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rk.linear_logprobs(h16, w16, y, bias=b16, backend=backend, **small_blocks()), logp16)


@contextlib.contextmanager
def _no_host_reads():
    """Every Python-level way to read a tensor's value on the host raises."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}")
        return method

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("variant", ["sliced", "sliced-sparse", "fused"])
def test_packed_form_with_checks_off_reads_nothing_on_the_host_triton(variant):
    """The sync-free route: packed form, num_sequences, check_values=False, the two sweeps (the
    single pass reads the tokens per sequence to plan its chunks)."""
    h, w, b, y = _leaves(30)
    seq = torch.arange(30) // 7
    with _no_host_reads():
        out = rk.linear_rlsc_loss(h, w, y, bias=b, seq_index=seq, num_sequences=5, check_values=False,
                                  return_entropy=True, backend="triton", filter_eps=1e-3, path="two-sweep",
                                  **small_blocks(variant))
        out.loss.backward()
        logp = rk.linear_logprobs(h, w, y, bias=b, check_values=False, backend="triton", **small_blocks(variant))
        logp.sum().backward()
    with pytest.raises(AssertionError, match="host sync"), _no_host_reads():  # the guard does catch syncs
        rk.linear_rlsc_loss(h, w, y, seq_index=seq, backend="triton", path="two-sweep")


@pytest.mark.parametrize("weighting", ["rlsc", "rlsc-l1", "entropy", "length", "tensor"])
def test_packed_form_with_checks_off_runs_on_the_meta_device(weighting):
    """Meta tensors hold no data: any op whose result depends on values (a host read, a boolean
    gather, nonzero) fails there, so running forward + backward on meta proves the route has none."""
    meta = dict(device="meta")
    h = torch.empty(17, 12, **meta).requires_grad_()
    w = torch.empty(40, 12, **meta).requires_grad_()
    b = torch.empty(40, **meta).requires_grad_()
    y = torch.empty(17, dtype=torch.long, **meta)
    seq = torch.empty(17, dtype=torch.long, **meta)
    weights = torch.empty(4, **meta) if weighting == "tensor" else weighting
    out = rk.linear_rlsc_loss(h, w, y, bias=b, seq_index=seq, num_sequences=4, weighting=weights, check_values=False,
                              return_entropy=True, backend="torch", path="two-sweep")
    out.loss.backward()
    rk.linear_logprobs(h, w, y, bias=b, check_values=False, backend="torch").sum().backward()
    assert w.grad.shape == w.shape and out.seq_logp.shape == (4,)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_completion_mask_equals_the_bool_one(dtype):
    """TRL and Hugging Face collators hand out 0/1 integer masks."""
    h, w, b, y = _leaves(12, shape=(3, 4))
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) < 0.6
    want = rk.linear_rlsc_loss(h, w, y, completion_mask=mask, bias=b, backend="torch")
    got = rk.linear_rlsc_loss(h, w, y, completion_mask=mask.to(dtype), bias=b, backend="torch")
    assert torch.equal(got.loss, want.loss) and torch.equal(got.n_tokens, want.n_tokens)


def test_module_takes_every_execution_option_and_refuses_unknown_ones():
    h, w, b, y = _leaves(12)
    module = rk.LinearRLSCLoss(backend="torch", path="two-sweep", check_values=False, buffer_bytes=1 << 12)
    want = rk.linear_rlsc_loss(h, w, y, bias=b, backend="torch", path="two-sweep")
    assert torch.allclose(module(h, w, y, bias=b).loss, want.loss)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        rk.LinearRLSCLoss(strategy="fused")


def test_cpu_paths_flush_subnormal_probabilities_without_changing_results(monkeypatch):
    """Peaked distributions put probabilities below the smallest normal float; on CPU those
    subnormals made the gradient GEMMs ~200x slower, so the torch paths flush them to 0. That
    may change no result beyond the subnormal range: the flushed run must equal the unflushed
    one (and the fp32 oracle error is checked elsewhere)."""
    from rlsc_kernels.backends import torch_chunked, torch_single_pass

    x = torch.tensor([1e-39, -1e-40, 1e-30, 0.0, -2.0], dtype=torch.float32)
    assert torch_chunked.flush_subnormal_(x.clone()).tolist() == [0.0, 0.0, x[2].item(), 0.0, -2.0]
    torch.manual_seed(0)
    N, D, V = 40, 24, 300
    h = torch.randn(N, D) * 4.0  # logits spread over ~100 nats: p < 2^-126 abound
    w = torch.randn(V, D)
    y = torch.randint(0, V, (N,))
    seq = torch.arange(N) // 10
    p = torch.softmax((h.double() @ w.double().T) / 0.5, -1)
    assert ((p > 0) & (p < torch.finfo(torch.float32).tiny)).float().mean() > 0.1

    def run(path):
        hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = rk.linear_rlsc_loss(hf, wf, y, seq_index=seq, backend="torch", path=path)
        out.loss.backward()
        return out.loss.detach(), hf.grad, wf.grad

    for path in ("single-pass", "two-sweep"):
        flushed = run(path)
        with monkeypatch.context() as m:
            for module in (torch_chunked, torch_single_pass):
                m.setattr(module, "flush_subnormal_", lambda t: t)
            unflushed = run(path)
        for a, b in zip(flushed, unflushed):
            assert (a - b).abs().max() <= 1e-30 * b.abs().max(), path
