"""The Triton single-pass RLSC loss (backends/triton_single_pass.py) against the float64 oracle,
run in Triton's interpreter on CPU tensors.

The backend is called directly with the framework's chunk planner and Weigh, so chunking,
ignored tokens, bias, entropy, every weighting and reduction, and block sizes that leave ragged
edges are all exercised. bf16 runs here use the interpreter-only rounding fix (the GEMMs are
torch's, the kernels elementwise, so no bf16 tl.dot is involved); fp32 and fp16 run as on a GPU.
"""
import pytest
import torch

from rlsc_kernels.options import FusedOptions
from rlsc_kernels.reference import reference_logprobs
from rlsc_kernels.single_pass import Weigh, plan_chunks, rlsc_single_pass
from rlsc_kernels.weighting import rlsc_weights

from .oracle import TOL, assert_within_oracle

pytestmark = pytest.mark.interpreter


def _small_configs():
    from rlsc_kernels.backends.triton_single_pass import RowConfig

    # a few rows / 16-32 columns per step: rows and vocab both end in ragged blocks below
    return {"stats": RowConfig(2, 32, 4), "grad": RowConfig(4, 16, 4)}


def _draw(N, D, V, S, dtype, *, bias, seed, logit_scale=1.0, ignore_frac=0.2):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64) * (logit_scale / D**0.5)
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < ignore_frac] = -100
    # S sequences of uneven lengths, each with at least one scored token
    cuts = torch.sort(torch.randperm(N - 1, generator=gen)[: S - 1] + 1).values
    seq = torch.zeros(N, dtype=torch.int64)
    seq[cuts] = 1
    seq = seq.cumsum(0)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), cuts])
    y[starts] = torch.randint(0, V, (S,), generator=gen)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), y, seq


def _oracle(h, w, b, y, seq, S, *, T, weighting, alpha, reduction, entropy):
    """Loss, L_s, token log-probs / entropies and gradients by plain autograd in h's dtype."""
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    opts = FusedOptions(temperature=T, return_entropy=entropy)
    logp, ent = reference_logprobs(hh, ww, bb, y, opts)
    seq_logp = torch.zeros(S, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    n_tokens = torch.zeros(S, dtype=torch.int64, device=logp.device).index_add_(0, seq, (y != -100).long())
    wts = rlsc_weights(seq_logp, n_tokens, weighting, alpha)
    loss = -(wts.to(seq_logp.dtype) * seq_logp).sum() * (1.0 / S if reduction == "mean" else 1.0)
    loss.backward()
    out = {"loss": loss, "token_logp": logp, "seq_logp": seq_logp, "dhidden": hh.grad, "dweight": ww.grad}
    if entropy:
        out["token_entropy"] = ent
    if bb is not None:
        out["dbias"] = bb.grad
    return {k: v.detach().double().reshape(-1).cpu() for k, v in out.items()}


def _single_pass(h, w, b, y, seq, S, *, T, weighting, alpha, reduction, entropy, max_rows, configs=None,
                 needs=(True, True, True)):
    from rlsc_kernels.backends import triton_single_pass

    counts = torch.bincount(seq, minlength=S).tolist()
    chunks = plan_chunks(counts, max(max_rows, max(counts)))
    assert chunks is not None
    weigh = Weigh(weighting, alpha, reduction, S)
    opts = FusedOptions(temperature=T, return_entropy=entropy)
    res = rlsc_single_pass(triton_single_pass, h, w, b, y, seq, chunks, weigh, opts, needs,
                           configs=configs or _small_configs())
    out = {"loss": weigh.loss(res.seq_logp, res.seq_weight), "token_logp": res.token_logp, "seq_logp": res.seq_logp,
           "dhidden": res.dhidden, "dweight": res.dweight}
    if entropy:
        out["token_entropy"] = res.token_entropy
    if b is not None:
        out["dbias"] = res.dbias
    return {k: v.detach().double().reshape(-1).cpu() for k, v in out.items() if v is not None}, res, chunks


def _check(dtype, N, D, V, S, *, T=0.5, weighting="rlsc", alpha=0.1, reduction="mean", entropy=True, bias=True,
           max_rows=16, seed=0, logit_scale=1.0):
    h, w, b, y, seq = _draw(N, D, V, S, dtype, bias=bias, seed=seed, logit_scale=logit_scale)
    kw = dict(T=T, weighting=weighting, alpha=alpha, reduction=reduction, entropy=entropy)
    exact = _oracle(h.double(), w.double(), None if b is None else b.double(), y, seq, S, **kw)
    same = _oracle(h, w, b, y, seq, S, **kw)
    fast, res, chunks = _single_pass(h, w, b, y, seq, S, max_rows=max_rows, **kw)
    assert_within_oracle(fast, same, exact, dtype, label=f"{dtype} N={N} D={D} V={V} chunks={len(chunks)}")
    return fast, exact, res, chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_pass_matches_float64_oracle_over_several_chunks(dtype):
    fast, exact, res, chunks = _check(dtype, N=61, D=24, V=203, S=7, max_rows=19)
    assert len(chunks) >= 3
    for name in ("token_logp", "lse", "seq_weight"):
        assert torch.isfinite(getattr(res, name)).all(), name
    # float32 whatever the input dtype: grad_output is applied in float32 and the result rounded
    # to 16 bits once, at the very end of the backward (issue 16; it was rounded in the forward)
    assert res.dweight.dtype == torch.float32 and res.dhidden.dtype == torch.float32


@pytest.mark.parametrize("weighting", ["rlsc", "rlsc-l1", "entropy", "length", "external"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_weighting_and_reduction(weighting, reduction):
    if weighting == "external":
        weighting = torch.linspace(-0.5, 2.0, 5)
    _check(torch.float32, N=37, D=16, V=77, S=5, weighting=weighting, reduction=reduction, T=0.7, max_rows=12, seed=1)


@pytest.mark.parametrize("bias,entropy", [(False, False), (True, False), (False, True)])
def test_without_bias_or_entropy(bias, entropy):
    fast, _, res, _ = _check(torch.float16, N=29, D=20, V=131, S=3, bias=bias, entropy=entropy, T=1.3, seed=2)
    assert (res.dbias is not None) == bias
    assert (res.token_entropy is not None) == entropy and (res.mean_z is not None) == entropy


def test_ignored_tokens_score_nothing_and_get_no_gradient():
    h, w, b, y, seq = _draw(40, 16, 90, 4, torch.float32, bias=True, seed=3, ignore_frac=0.5)
    kw = dict(T=0.5, weighting="rlsc", alpha=0.1, reduction="mean", entropy=True)
    fast, res, _ = _single_pass(h, w, b, y, seq, 4, max_rows=15, **kw)
    ignored = y == -100
    assert ignored.any()
    assert (res.token_logp[ignored] == 0).all() and (res.token_entropy[ignored] == 0).all()
    assert (res.dhidden[ignored] == 0).all()
    # changing an ignored token's hidden state changes nothing
    h2 = h.clone()
    h2[ignored] += 3.0
    fast2, _, _ = _single_pass(h2, w, b, y, seq, 4, max_rows=15, **kw)
    for name in ("loss", "seq_logp", "dweight", "dbias"):
        assert torch.allclose(fast[name], fast2[name], rtol=1e-5, atol=1e-6), name


def test_large_logits_in_16_bit_are_no_worse_than_the_two_sweep_exact_mode():
    """Logits of magnitude 20-40 (held in bf16 they would be off by ~0.1): the single pass keeps
    them in fp32, so its error against float64 is at most the two-sweep exact mode's."""
    import rlsc_kernels as rk

    dtype, S, T = torch.bfloat16, 4, 0.5
    h, w, _, y, seq = _draw(48, 32, 257, S, dtype, bias=False, seed=4, logit_scale=12.0)
    z = h.double() @ w.double().T
    assert z.abs().max() > 20
    kw = dict(T=T, weighting="rlsc", alpha=0.1, reduction="mean", entropy=False)
    exact = _oracle(h.double(), w.double(), None, y, seq, S, **kw)
    fast, _, _ = _single_pass(h, w, None, y, seq, S, max_rows=20, **kw)
    # two-sweep exact mode: the fused log-probs op with filter_eps=None, loss built on top
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp = rk.linear_logprobs(hh, ww, y, temperature=T, backend="triton", filter_eps=None)
    seq_logp = torch.zeros(S).index_add(0, seq, logp)
    n_tokens = torch.bincount(seq[y != -100], minlength=S)
    loss = -(rlsc_weights(seq_logp, n_tokens, "rlsc", 0.1) * seq_logp).sum() / S
    loss.backward()
    two = {"loss": loss, "token_logp": logp, "seq_logp": seq_logp, "dhidden": hh.grad, "dweight": ww.grad}
    for name, ref in two.items():
        scale = exact[name].abs().max().item()
        err_one = (fast[name] - exact[name]).abs().max().item()
        err_two = (ref.detach().double().reshape(-1) - exact[name]).abs().max().item()
        assert err_one <= err_two + TOL[dtype] * scale, f"{name}: single pass {err_one:.3e} > two-sweep {err_two:.3e}"
        if name in ("token_logp", "seq_logp"):  # fp32 logits: far better than bf16 logits would be
            assert err_one <= 1e-3 * max(1.0, scale), name


def test_one_sequence_per_chunk_and_one_chunk_for_all():
    for max_rows in (None, 1000):
        h, w, b, y, seq = _draw(30, 8, 45, 3, torch.float32, bias=True, seed=5)
        rows = int(torch.bincount(seq).max()) if max_rows is None else max_rows
        kw = dict(T=0.9, weighting="rlsc", alpha=0.1, reduction="sum", entropy=True)
        exact = _oracle(h.double(), w.double(), b.double(), y, seq, 3, **kw)
        same = _oracle(h, w, b, y, seq, 3, **kw)
        fast, _, chunks = _single_pass(h, w, b, y, seq, 3, max_rows=rows, **kw)
        assert len(chunks) == (3 if max_rows is None else 1) or max_rows is None
        assert_within_oracle(fast, same, exact, torch.float32, label=f"max_rows={rows}")


def test_gradients_not_needed_are_not_computed():
    h, w, b, y, seq = _draw(20, 8, 33, 2, torch.float32, bias=True, seed=6)
    kw = dict(T=0.5, weighting="rlsc", alpha=0.1, reduction="mean", entropy=False)
    full, _, _ = _single_pass(h, w, b, y, seq, 2, max_rows=12, **kw)
    for needs in [(False, False, False), (True, False, False), (False, True, True)]:
        _, res, _ = _single_pass(h, w, b, y, seq, 2, max_rows=12, needs=needs, **kw)
        for name, need in zip(("dhidden", "dweight", "dbias"), needs):
            got = getattr(res, name)
            assert (got is not None) == need, name
            if need:
                assert torch.allclose(got.double().reshape(-1), full[name], rtol=1e-6, atol=1e-7), name
        assert torch.equal(res.token_logp.double(), full["token_logp"])


def test_chunks_that_do_not_tile_the_tokens_are_refused():
    h, w, b, y, seq = _draw(10, 8, 16, 2, torch.float32, bias=False, seed=7)
    weigh = Weigh("rlsc", 0.1, "mean", 2)
    with pytest.raises(ValueError, match="chunks must tile"):
        rlsc_single_pass("triton", h, w, None, y, seq, [(0, 5, 0, 1)], weigh, FusedOptions(), (True, True, False))


def test_shipped_block_sizes_in_the_interpreter():
    from rlsc_kernels.backends.triton_single_pass import SHIPPED_CONFIGS as shipped

    assert all(2600 > c.block_v for c in shipped.values())
    """The shipped configs on a vocabulary spanning two column blocks."""
    from rlsc_kernels.backends.triton_single_pass import SHIPPED_CONFIGS

    h, w, b, y, seq = _draw(13, 8, 2600, 2, torch.float16, bias=True, seed=8)
    kw = dict(T=0.5, weighting="rlsc", alpha=0.1, reduction="mean", entropy=True)
    exact = _oracle(h.double(), w.double(), b.double(), y, seq, 2, **kw)
    same = _oracle(h, w, b, y, seq, 2, **kw)
    fast, _, _ = _single_pass(h, w, b, y, seq, 2, max_rows=8, configs=SHIPPED_CONFIGS, **kw)
    assert_within_oracle(fast, same, exact, torch.float16, label="shipped configs")


# ------------------------------------------------------------------------------------------------
# Through the public op: linear_rlsc_loss(backend="triton") dispatches to this backend.


def _public(h, w, b, y, seq, S, dtype, *, path, extra_weight=0.0, **kw):
    import rlsc_kernels as rk

    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    backend = "reference" if dtype == torch.float64 else "triton"
    out = rk.linear_rlsc_loss(hh, ww, y, seq_index=seq, bias=bb, backend=backend, path=path, filter_eps=None,
                              return_entropy=True, **kw)
    total = out.loss
    if extra_weight:  # an upstream gradient on token_logp too (the Function's two-sweep backward)
        total = total + extra_weight * (out.token_logp.double() * torch.linspace(-1, 1, out.token_logp.numel(),
                                                                                  dtype=torch.float64)).sum()
    total.backward()
    res = {"loss": out.loss, "seq_logp": out.seq_logp, "token_logp": out.token_logp, "dhidden": hh.grad,
           "dweight": ww.grad}
    if bb is not None:
        res["dbias"] = bb.grad
    return {k: v.detach().double().reshape(-1) for k, v in res.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra_weight", [0.0, 0.5])
def test_public_op_single_pass_on_triton_matches_float64(dtype, extra_weight):
    """Unsorted sequence ids, several chunks (small buffer_bytes), bias, ignored tokens; with and
    without an extra upstream gradient through token_logp."""
    h, w, b, y, seq = _draw(45, 16, 150, 5, dtype, bias=True, seed=9)
    perm = torch.randperm(45, generator=torch.Generator().manual_seed(1))
    h, y, seq = h[perm], y[perm], seq[perm]
    kw = dict(temperature=0.6, weighting="rlsc", reduction="mean", buffer_bytes=150 * 4 * 20)
    exact = _public(h.double(), w.double(), b.double(), y, seq, 5, torch.float64, path="auto", extra_weight=extra_weight,
                    **kw)
    fast = _public(h, w, b, y, seq, 5, dtype, path="single-pass", extra_weight=extra_weight, **kw)
    two = _public(h, w, b, y, seq, 5, dtype, path="two-sweep", extra_weight=extra_weight, **kw)
    for name in exact:
        scale = exact[name].abs().max().item()
        err_one = (fast[name] - exact[name]).abs().max().item()
        err_two = (two[name] - exact[name]).abs().max().item()
        # no worse than the two-sweep path (same dtype, same kernels' interpreter) + tolerance
        assert err_one <= err_two + TOL[dtype] * scale + 1e-12, f"{name}: {err_one:.3e} vs two-sweep {err_two:.3e}"


def test_public_op_auto_path_on_triton_is_the_single_pass():
    h, w, b, y, seq = _draw(30, 8, 64, 3, torch.float32, bias=False, seed=10)
    kw = dict(temperature=0.5, weighting="length", reduction="sum")
    auto = _public(h, w, None, y, seq, 3, torch.float32, path="auto", **kw)
    single = _public(h, w, None, y, seq, 3, torch.float32, path="single-pass", **kw)
    for name in auto:
        assert torch.equal(auto[name], single[name]), name


def test_sequences_without_scored_tokens_and_an_empty_batch():
    """A sequence whose tokens are all ignored has L_s = 0 and no gradient; an empty batch
    gives zero gradients of the right shapes."""
    h, w, b, y, seq = _draw(24, 8, 40, 4, torch.float32, bias=True, seed=11)
    y[seq == 2] = -100
    kw = dict(T=0.5, weighting="rlsc", alpha=0.1, reduction="mean", entropy=True)
    exact = _oracle(h.double(), w.double(), b.double(), y, seq, 4, **kw)
    same = _oracle(h, w, b, y, seq, 4, **kw)
    fast, res, _ = _single_pass(h, w, b, y, seq, 4, max_rows=8, **kw)
    assert_within_oracle(fast, same, exact, torch.float32, label="empty sequence")
    assert res.seq_logp[2] == 0 and (res.dhidden[seq == 2] == 0).all()

    empty = rlsc_single_pass("triton", h[:0], w, b, y[:0], seq[:0], [(0, 0, 0, 2)], Weigh("rlsc", 0.1, "mean", 2),
                             FusedOptions(), (True, True, True))
    assert empty.dhidden.shape == (0, 8) and empty.token_logp.shape == (0,)
    assert (empty.dweight == 0).all() and (empty.dbias == 0).all() and (empty.seq_logp == 0).all()
    assert torch.isfinite(empty.seq_weight).all()


def test_any_layout_gives_the_contiguous_answer():
    """Sliced, transposed and stride-0 inputs give exactly the result of their contiguous copies."""
    h, w, b, y, seq = _draw(26, 12, 70, 3, torch.float32, bias=True, seed=12)
    kw = dict(T=0.8, weighting="rlsc", alpha=0.1, reduction="mean", entropy=True)
    wide = torch.zeros(26, 24)
    wide[:, ::2] = h
    h_strided = wide[:, ::2]
    w_transposed = w.T.contiguous().T
    b_stride0 = b[5:6].expand(70)
    y_strided = torch.stack([y, y], 1)[:, 1]
    for t in (h_strided, w_transposed, b_stride0, y_strided):
        assert not t.is_contiguous()
    got, _, _ = _single_pass(h_strided, w_transposed, b_stride0, y_strided, seq, 3, max_rows=10, **kw)
    want, _, _ = _single_pass(h_strided.contiguous(), w_transposed.contiguous(), b_stride0.contiguous(),
                              y_strided.contiguous(), seq, 3, max_rows=10, **kw)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-6, atol=1e-7), name


# ------------------------------------------------------------------------------------------------
# Sequences longer than the chunk (issue 19), grad_output in fp32, the target's 1 - p, and target
# ids out of range (issue 16).


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 13])
def test_sequences_longer_than_the_chunk_are_split(dtype, rows):
    from rlsc_kernels.backends import triton_single_pass
    from rlsc_kernels.single_pass.plan import chunks_from_bounds, split_bounds

    S = 4
    h, w, b, y, seq = _draw(71, 16, 90, S, dtype, bias=True, seed=13)
    counts = torch.bincount(seq, minlength=S).tolist()
    chunks = chunks_from_bounds(counts, split_bounds(counts, rows))
    assert max(counts) > rows and any(c.carry_start < c.t0 for c in chunks)
    kw = dict(T=0.6, weighting="rlsc", alpha=0.1, reduction="mean", entropy=True)
    exact = _oracle(h.double(), w.double(), b.double(), y, seq, S, **kw)
    same = _oracle(h, w, b, y, seq, S, **kw)
    weigh = Weigh("rlsc", 0.1, "mean", S)
    res = rlsc_single_pass(triton_single_pass, h, w, b, y, seq, chunks, weigh, FusedOptions(temperature=0.6,
                           return_entropy=True), (True, True, True), configs=_small_configs())
    fast = {"loss": weigh.loss(res.seq_logp, res.seq_weight), "token_logp": res.token_logp, "seq_logp": res.seq_logp,
            "dhidden": res.dhidden, "dweight": res.dweight, "token_entropy": res.token_entropy, "dbias": res.dbias}
    fast = {k: v.detach().double().reshape(-1) for k, v in fast.items()}
    assert_within_oracle(fast, same, exact, dtype, label=f"split {dtype} rows={rows}")


def test_public_op_long_sequences_on_triton_match_float64():
    h, w, b, y, seq = _draw(80, 16, 150, 3, torch.float32, bias=True, seed=14)
    kw = dict(temperature=0.6, weighting="rlsc", reduction="mean", buffer_bytes=150 * 4 * 10)
    exact = _public(h.double(), w.double(), b.double(), y, seq, 3, torch.float64, path="auto", **kw)
    fast = _public(h, w, b, y, seq, 3, torch.float32, path="single-pass", **kw)
    for name in exact:
        scale = exact[name].abs().max().item()
        assert (fast[name] - exact[name]).abs().max().item() <= 2e-5 * scale + 1e-12, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_scale_does_not_overflow_16_bit_gradients(dtype):
    """grad_output = 2^16 (GradScaler's default scale, inf in fp16): dW was rounded to the weight
    dtype in the forward and the scale cast to fp16 in the backward (100% non-finite dW). Now the
    16-bit gradients are the grad_output = 1 ones times the scale, rounded once."""
    import rlsc_kernels as rk

    h, w, b, y, seq = _draw(40, 16, 70, 3, dtype, bias=True, seed=15)
    grads = {}
    for scale in (1.0, 2.0**16):
        hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
        out = rk.linear_rlsc_loss(hh, ww, y, seq_index=seq, bias=bb, backend="triton", path="single-pass",
                                  buffer_bytes=70 * 4 * 16)
        (out.loss * scale).backward()
        grads[scale] = [hh.grad, ww.grad, bb.grad]
    for g1, gs, name in zip(grads[1.0], grads[2.0**16], ("dhidden", "dweight", "dbias")):
        assert gs.dtype == dtype and torch.isfinite(gs).all(), name
        normal = g1.abs() >= torch.finfo(dtype).tiny
        rel = ((gs.double() - g1.double() * 2.0**16).abs() / (g1.double().abs() * 2.0**16))[normal]
        assert rel.max() <= 2 * torch.finfo(dtype).eps, f"{name}: {rel.max():.3e}"


def test_target_gradient_does_not_cancel_when_p_is_close_to_1():
    """Two-token vocabulary, every target at p = 1 - O(1e-5): dweight within twice plain fp32
    PyTorch's error against float64 (1 - p from the log-prob, not from p)."""
    gen = torch.Generator().manual_seed(0)
    N, D = 12, 4
    y = torch.randint(0, 2, (N,), generator=gen)
    h = torch.zeros(N, D, dtype=torch.float64)
    h[:, 0] = torch.where(y == 0, 6.0, -6.0).double() + torch.rand(N, generator=gen, dtype=torch.float64) * 0.5
    h[:, 1:] = torch.randn(N, D - 1, generator=gen, dtype=torch.float64)
    w = torch.zeros(2, D, dtype=torch.float64)
    w[:, 0] = torch.tensor([1.0, -1.0])
    w[:, 1:] = torch.randn(2, D - 1, generator=gen, dtype=torch.float64) * 0.01
    seq = torch.arange(N) // 4
    kw = dict(T=1.0, weighting="rlsc", alpha=0.1, reduction="mean", entropy=False)
    exact = _oracle(h, w, None, y, seq, 3, **kw)
    same = _oracle(h.float(), w.float(), None, y, seq, 3, **kw)
    fast, _, _ = _single_pass(h.float(), w.float(), None, y, seq, 3, max_rows=4, **kw)
    for name in ("dweight", "dhidden"):
        err = (fast[name] - exact[name]).abs().max().item()
        err_ref = (same[name] - exact[name]).abs().max().item()
        assert err <= 2 * err_ref + 1e-9 * exact[name].abs().max().item(), f"{name}: {err:.3e} vs {err_ref:.3e}"


def test_target_ids_out_of_range_read_and_write_nothing_out_of_bounds():
    """check_values=False lets any id through. The kernels only compare ids with column indices:
    an id outside [0, V) gets logp = -lse (its target logit taken as 0 ... never read) and the
    gradient -g p over the row, with every output finite and the other tokens unchanged."""
    h, w, b, y, seq = _draw(30, 8, 40, 3, torch.float32, bias=True, seed=16)
    kw = dict(T=0.7, weighting="rlsc", alpha=0.1, reduction="mean", entropy=True)
    good, res_good, _ = _single_pass(h, w, b, y, seq, 3, max_rows=12, **kw)
    bad_y = y.clone()
    bad = [1, 7, 20]
    bad_y[bad] = torch.tensor([40, 2**40, -7])
    _, res, _ = _single_pass(h, w, b, bad_y, seq, 3, max_rows=12, **kw)
    for name in ("token_logp", "lse", "token_entropy", "dhidden", "dweight", "dbias", "seq_logp"):
        assert torch.isfinite(getattr(res, name)).all(), name
    assert torch.allclose(res.token_logp[bad], -res.lse[bad], rtol=1e-6, atol=1e-6)
    keep = torch.ones(30, dtype=torch.bool)
    keep[bad] = False
    assert torch.equal(res.token_logp[keep], res_good.token_logp[keep])
    assert torch.equal(res.lse, res_good.lse)


def test_fp16_logit_gradient_keeps_small_probabilities(monkeypatch):
    """The fp16 dz is formed before grad_output is known: at g ~ 1/S a probability below ~1e-6
    would flush to 0 there, losing whole rows of dW that GradScaler's 2^16 makes representable.
    The operand is scaled by a power of two (|K g| <= 2^14, divided out in fp32): every dW entry
    whose exact scaled value is a normal fp16 comes out within a few fp16 ulps. Forcing K = 1
    shows the test can fail."""
    import rlsc_kernels as rk
    from rlsc_kernels.backends import triton_single_pass

    S = 16
    h, w, b, y, seq = _draw(64, 16, 300, S, torch.float16, bias=False, seed=17, logit_scale=14.0, ignore_frac=0.0)
    scale = 2.0**16
    kw = dict(T=1.0, weighting="rlsc", alpha=0.1, reduction="mean", entropy=False)
    exact = _oracle(h.double(), w.double(), None, y, seq, S, **kw)["dweight"] * scale

    def dweight():
        ww = w.detach().clone().requires_grad_()
        out = rk.linear_rlsc_loss(h, ww, y, seq_index=seq, backend="triton", path="single-pass", temperature=1.0)
        (out.loss * scale).backward()
        return ww.grad.double().reshape(-1)

    # each entry's error relative to the sum of its terms' magnitudes, sum_t |dz_tv| |h_td|
    # (a sum that cancels has no relative accuracy to keep), where that is a normal fp16
    with torch.no_grad():
        hh, ww = h.double(), w.double()
        p = torch.softmax(hh @ ww.T, -1)
        L = torch.zeros(S, dtype=torch.float64).index_add(0, seq, p.gather(1, y[:, None]).squeeze(1).log())
        g = -(L.exp() + 0.1).float().double()[seq] / S
        dz = g[:, None] * (torch.nn.functional.one_hot(y, 300).double() - p)
        terms = (dz.abs().T @ hh.abs()).reshape(-1) * scale
    normal = terms >= torch.finfo(torch.float16).tiny
    rel = lambda got: ((got - exact).abs() / terms)[normal].max().item()  # noqa: E731
    err = rel(dweight())
    assert err <= 2.0**-7, f"max relative error {err:.3e} over normal entries"
    with monkeypatch.context() as m:
        m.setattr(triton_single_pass.SinglePassOps, "grad_scale", lambda self, bound: 1.0)
        assert rel(dweight()) > 2.0**-7  # without the scale, small entries are flushed or coarse
