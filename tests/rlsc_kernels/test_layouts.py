"""Every tensor argument of every backend gives the answer of its contiguous copy, whatever its
layout: a strided slice, a transpose, an expanded (stride 0) view, a storage offset. The Triton
kernels read targets and bias with stride 1, so their launchers must settle layout first."""
import pytest
import torch

import rlsc_kernels as rk
from rlsc_kernels.backends import native_available

from .oracle import make_inputs, small_blocks

pytestmark = pytest.mark.interpreter

BACKENDS = ["torch", "triton", "reference"] + (["native"] if native_available() else [])


def _sliced(t):
    """Same values, every element 2 apart in memory (a [..., 0] slice of an interleaved buffer)."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def _transposed(t):
    """2-D: same values stored column-major; 1-D: a reversed-stride copy is impossible, so a slice."""
    return t.t().contiguous().t() if t.dim() == 2 else _sliced(t)


def _offset(t):
    """Same values at a storage offset of 3 elements (rows for 2-D)."""
    pad = torch.zeros((3,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t])[3:]


def _expanded(t):
    """Stride 0 along the first dim: the first row repeated (other values than t, same as its copy)."""
    return t[:1].expand_as(t)


LAYOUTS = {"sliced": _sliced, "transposed": _transposed, "offset": _offset, "expanded": _expanded}


def _logprobs_and_grads(backend, h, w, b, y, layout_of):
    """Outputs and gradients w.r.t. the contiguous leaves, with argument `name` passed through
    layout_of[name] (identity elsewhere)."""
    hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
    args = {"hidden": hh, "weight": ww, "bias": bb, "targets": y}
    args = {k: layout_of.get(k, lambda t: t)(v) for k, v in args.items()}
    logp, ent = rk.linear_logprobs(args["hidden"], args["weight"], args["targets"], bias=args["bias"],
                                   temperature=0.7, return_entropy=True, backend=backend, filter_eps=None,
                                   **small_blocks())
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(logp.shape, generator=gen)
    (logp * g).sum().add((ent * g.flip(0)).sum()).backward()
    return [logp, ent, hh.grad, ww.grad, bb.grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["hidden", "weight", "bias", "targets"])
def test_logprobs_any_layout_equals_contiguous_copy(backend, name):
    dtype = torch.float64 if backend == "reference" else torch.float32
    h, w, b, y = make_inputs(37, 24, 101, dtype=dtype, seed=7)
    for layout_name, layout in LAYOUTS.items():
        view = lambda t: layout(t)  # noqa: E731
        copy = lambda t: layout(t).contiguous()  # noqa: E731
        probe = layout({"targets": y, "bias": b, "weight": w}.get(name, h))
        assert not probe.is_contiguous() or probe.storage_offset() > 0
        got = _logprobs_and_grads(backend, h, w, b, y, {name: view})
        want = _logprobs_and_grads(backend, h, w, b, y, {name: copy})
        for i, (a, e) in enumerate(zip(got, want)):
            assert torch.allclose(a, e, rtol=1e-5, atol=1e-6), (backend, name, layout_name, i, (a - e).abs().max())


def test_triton_strided_targets_and_bias_regression():
    """The reported case: targets a column of a 2-D tensor and bias[::2] gave log-probs off by ~4."""
    h, w, b, _ = make_inputs(40, 16, 64, dtype=torch.float32, seed=3)
    pairs = torch.randint(0, 64, (40, 2))
    big_bias = torch.randn(128)
    got = rk.linear_logprobs(h, w, pairs[:, 1], bias=big_bias[::2], backend="triton", **small_blocks())
    want = rk.linear_logprobs(h, w, pairs[:, 1].contiguous(), bias=big_bias[::2].contiguous(), backend="reference")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def _rlsc(backend, h, w, y, mask=None, seq=None, weighting="rlsc", num_sequences=None):
    ww = w.detach().clone().requires_grad_()
    hh = h.detach().clone().requires_grad_()
    out = rk.linear_rlsc_loss(hh, ww, y, completion_mask=mask, seq_index=seq, weighting=weighting, backend=backend,
                              num_sequences=num_sequences, filter_eps=None, **small_blocks())
    out.loss.backward()
    return [out.loss, out.seq_logp, out.seq_weight, out.token_logp, out.n_tokens, hh.grad, ww.grad]


def _assert_same(got, want, label):
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.shape == e.shape and torch.allclose(a.double(), e.double(), rtol=1e-5, atol=1e-6), (label, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rlsc_loss_mask_seq_index_and_weights_in_any_layout(backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(4)
    B, T, D, V = 3, 9, 16, 50
    h = torch.randn(B, T, D, dtype=dtype)
    w = torch.randn(V, D, dtype=dtype) / D**0.5
    y = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < 0.7
    for layout_name, layout in LAYOUTS.items():
        if layout_name == "expanded":
            m = mask[:1].expand(B, T)
        else:
            m = layout(mask)
        _assert_same(_rlsc(backend, h, w, y, mask=m), _rlsc(backend, h, w, y, mask=m.contiguous()),
                     f"completion_mask {layout_name}")
        _assert_same(_rlsc(backend, h, w, layout(y), mask=mask), _rlsc(backend, h, w, layout(y).contiguous(), mask=mask),
                     f"padded targets {layout_name}")
    hp, yp = h.reshape(-1, D), y.reshape(-1)
    seq = torch.arange(B * T) // T
    ext = torch.rand(B)
    for layout_name, layout in LAYOUTS.items():
        s = layout(seq)
        _assert_same(_rlsc(backend, hp, w, yp, seq=s, num_sequences=B),
                     _rlsc(backend, hp, w, yp, seq=s.contiguous(), num_sequences=B), f"seq_index {layout_name}")
        x = layout(ext)
        _assert_same(_rlsc(backend, hp, w, yp, seq=seq, weighting=x), _rlsc(backend, hp, w, yp, seq=seq, weighting=x.contiguous()),
                     f"weighting tensor {layout_name}")
