"""linear_rlsc_loss's single-pass path against the float64 oracle, and against its two-sweep path:
every weighting and reduction, ignored tokens, bias, temperature, entropy, several chunks,
unsorted sequence ids, empty sequences, the accepted dtypes, gradients through the loss and
through the per-token / per-sequence outputs, and what path="single-pass" refuses."""
import math

import pytest
import torch

import rlsc_kernels as rk
from rlsc_kernels import single_pass
from rlsc_kernels.backends import native

from .oracle import TOL

BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="native extension not built"))]
PATHS = ["single-pass", "two-sweep"]
WEIGHTINGS = ["rlsc", "rlsc-l1", "entropy", "length", "tensor"]


def packed_batch(lengths, D=24, V=203, *, dtype=torch.float32, seed=0, scale=3.0, ignore_frac=0.2, shuffle=True):
    """Packed tokens of sequences of the given lengths, ids shuffled (unsorted) if asked."""
    gen = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if shuffle:
        seq = seq[torch.randperm(N, generator=gen)]
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=gen, dtype=torch.float64) * scale / D**0.5).to(dtype)
    bias = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < ignore_frac] = -100
    return hidden, weight, bias, targets, seq


def oracle(hidden, weight, bias, targets, seq, S, *, temperature, alpha, weighting, reduction, extra=None):
    """Algorithm 1 over packed tokens in float64, with autograd: returns the outputs and the
    gradients of loss + extra(outputs) (extra: the same extra terms the test adds)."""
    h = hidden.to(torch.float64, copy=True).requires_grad_()
    W = weight.to(torch.float64, copy=True).requires_grad_()
    b = bias.to(torch.float64, copy=True).requires_grad_() if bias is not None else None
    z = (h @ W.T + (b if b is not None else 0)) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != -100
    tok = torch.where(valid, logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), torch.zeros(()).double())
    ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(1), torch.zeros(()).double())
    L = torch.zeros(S, dtype=torch.float64).index_add(0, seq, tok)
    n = torch.zeros(S, dtype=torch.float64).index_add(0, seq, valid.double())
    Ld = L.detach().clamp(max=0)
    if isinstance(weighting, torch.Tensor):
        w = weighting.double()
    else:
        w = {"rlsc": Ld.exp() + alpha, "rlsc-l1": Ld.exp(), "entropy": 1 + Ld,
             "length": (Ld / n.clamp(min=1)).exp() + alpha}[weighting]
    w = w.float().double()  # the op's weights are float32 by contract
    loss = -(w * L).sum() / (max(S, 1) if reduction == "mean" else 1)
    total = loss + (extra(tok, L, ent) if extra is not None else 0)
    total.backward()
    out = {"loss": loss.detach(), "seq_logp": L.detach(), "seq_weight": w, "token_logp": tok.detach(),
           "token_entropy": ent.detach(), "dhidden": h.grad, "dweight": W.grad}
    if b is not None:
        out["dbias"] = b.grad
    return out


def run_op(hidden, weight, bias, targets, seq, *, extra=None, **kw):
    h = hidden.clone().requires_grad_()
    W = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    out = rk.linear_rlsc_loss(h, W, targets, seq_index=seq, bias=b, **kw)
    ent = out.token_entropy if out.token_entropy is not None else torch.zeros_like(out.token_logp)
    total = out.loss + (extra(out.token_logp, out.seq_logp, ent) if extra is not None else 0)
    total.backward()
    res = {"loss": out.loss, "seq_logp": out.seq_logp, "seq_weight": out.seq_weight, "token_logp": out.token_logp,
           "dhidden": h.grad, "dweight": W.grad}
    if out.token_entropy is not None:
        res["token_entropy"] = out.token_entropy
    if b is not None:
        res["dbias"] = b.grad
    return {k: v.detach().double() for k, v in res.items()}


def assert_close(got, want, rel, label=""):
    for name, g in got.items():
        w = want[name]
        scale = max(w.abs().max().item(), 1e-30)
        err = (g - w).abs().max().item()
        assert err <= rel * scale + 1e-12, f"{label} {name}: max error {err:.3e} > {rel:.1e} x {scale:.3e}"


# Small buffers so that one call spans several chunks: V = 203 fp32 logits are 812 bytes a token.
SEVERAL_CHUNKS = 812 * 20
LENGTHS = [7, 13, 1, 19, 9, 4, 17]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_outputs_and_grads_match_float64_oracle(backend, path, weighting, reduction):
    seed = (WEIGHTINGS.index(weighting) * 2 + (reduction == "sum")) * 7 + PATHS.index(path)
    hidden, weight, bias, targets, seq = packed_batch(LENGTHS, seed=seed)
    S = len(LENGTHS)
    w_ext = torch.rand(S, generator=torch.Generator().manual_seed(seed)) + 0.5 if weighting == "tensor" else None
    wt = w_ext if w_ext is not None else weighting
    kw = dict(temperature=0.7, alpha=0.1, reduction=reduction)
    exact = oracle(hidden, weight, bias, targets, seq, S, weighting=wt, **kw)
    got = run_op(hidden, weight, bias, targets, seq, weighting=wt, backend=backend, path=path,
                 buffer_bytes=SEVERAL_CHUNKS, **kw)
    assert_close(got, exact, 2e-5, f"{backend}/{path}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_entropy_and_extra_gradients_through_token_and_sequence_outputs(backend, path):
    """A caller differentiating token_logp, seq_logp and token_entropy as well as the loss."""
    hidden, weight, bias, targets, seq = packed_batch(LENGTHS, seed=11)
    S = len(LENGTHS)
    gen = torch.Generator().manual_seed(3)
    a, c, e = torch.randn(S, generator=gen), torch.randn(len(seq), generator=gen), torch.randn(len(seq), generator=gen)

    def extra(tok, L, ent):
        return (a.to(L.dtype) * L).sum() + (c.to(tok.dtype) * tok).sum() + 0.5 * (e.to(ent.dtype) * ent).sum()

    kw = dict(temperature=0.5, alpha=0.1, weighting="rlsc", reduction="mean")
    exact = oracle(hidden, weight, bias, targets, seq, S, extra=extra, **kw)
    got = run_op(hidden, weight, bias, targets, seq, extra=extra, backend=backend, path=path, return_entropy=True,
                 buffer_bytes=SEVERAL_CHUNKS, **kw)
    assert set(got) == set(exact)
    assert_close(got, exact, 2e-5, f"{backend}/{path}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_single_pass_matches_oracle_to_rounding(backend):
    hidden, weight, bias, targets, seq = packed_batch(LENGTHS, dtype=torch.float64, seed=5)
    kw = dict(temperature=0.6, alpha=0.1, weighting="length", reduction="mean")
    exact = oracle(hidden, weight, bias, targets, seq, len(LENGTHS), **kw)
    got = run_op(hidden, weight, bias, targets, seq, backend=backend, path="single-pass", buffer_bytes=1624 * 20, **kw)
    assert_close(got, exact, 1e-11, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_same_dtype_torch_error(backend, dtype):
    """16-bit inputs: the single pass's error against float64 is no worse than the naive
    same-dtype PyTorch computation's (backend="reference") plus half an output ulp."""
    hidden, weight, bias, targets, seq = packed_batch(LENGTHS, dtype=dtype, seed=8, scale=12.0)
    kw = dict(temperature=0.5, alpha=0.1, weighting="rlsc", reduction="sum")
    exact = oracle(hidden, weight, bias, targets, seq, len(LENGTHS), **kw)
    got = run_op(hidden, weight, bias, targets, seq, backend=backend, path="single-pass", buffer_bytes=SEVERAL_CHUNKS, **kw)
    same = run_op(hidden, weight, bias, targets, seq, backend="reference", **kw)
    for name in got:
        scale = exact[name].abs().max().item()
        err = (got[name] - exact[name]).abs().max().item()
        bound = (same[name] - exact[name]).abs().max().item() + TOL[dtype] * scale
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_result_does_not_depend_on_chunking(backend):
    hidden, weight, bias, targets, seq = packed_batch(LENGTHS, seed=2)
    kw = dict(temperature=0.7, weighting="rlsc", reduction="mean", backend=backend, path="single-pass")
    one = run_op(hidden, weight, bias, targets, seq, **kw)  # default budget: one chunk
    for budget in (812 * 19, 812 * 25, 812 * 40):
        assert_close(run_op(hidden, weight, bias, targets, seq, buffer_bytes=budget, **kw), one, 2e-6, str(budget))


def test_chunk_plan_holds_whole_sequences_within_budget():
    counts = [7, 13, 0, 1, 19, 9, 0, 4, 17]
    chunks = single_pass.plan_chunks(counts, 20)
    starts = [sum(counts[:s]) for s in range(len(counts) + 1)]
    assert chunks[0][0] == 0 and chunks[0][2] == 0 and chunks[-1][1] == sum(counts) and chunks[-1][3] == len(counts)
    for (t0, t1, s0, s1), nxt in zip(chunks, chunks[1:] + [None]):
        assert (t0, t1) == (starts[s0], starts[s1]) and 0 < t1 - t0 <= 20
        if nxt is not None:
            assert (nxt[0], nxt[2]) == (t1, s1)
            assert t1 - t0 + counts[s1] > 20  # greedy: the next sequence did not fit
    assert single_pass.plan_chunks(counts, 18) is None  # the 19-token sequence cannot be split
    assert single_pass.plan_chunks([0, 0], 5) == [(0, 0, 0, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_empty_sequences_contribute_nothing(backend, path):
    """Sequence ids no token carries (1, 4) and one whose tokens are all ignored (2)."""
    hidden, weight, bias, targets, _ = packed_batch([5, 6, 3, 8], seed=4, ignore_frac=0.0)
    seq = torch.tensor([0] * 5 + [3] * 6 + [2] * 3 + [5] * 8)
    targets[5 + 6:5 + 6 + 3] = -100
    S = 6
    kw = dict(temperature=0.7, alpha=0.1, weighting="length", reduction="mean")
    exact = oracle(hidden, weight, bias, targets, seq, S, **kw)
    got = run_op(hidden, weight, bias, targets, seq, backend=backend, path=path, check_values=False,
                 buffer_bytes=812 * 9, **kw)
    assert_close(got, exact, 2e-5, f"{backend}/{path}")
    assert got["seq_logp"][[1, 2, 4]].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_form_single_pass_equals_two_sweep(backend):
    gen = torch.Generator().manual_seed(9)
    B, T, D, V = 3, 21, 16, 301
    hidden = torch.randn(B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.6
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, 2 + b:T - 4 * b] = True
    outs = []
    for path in PATHS:
        h = hidden.clone().requires_grad_()
        W = weight.clone().requires_grad_()
        out = rk.linear_rlsc_loss(h, W, targets, completion_mask=mask, backend=backend, path=path,
                                  buffer_bytes=V * 4 * 20)
        out.loss.backward()
        outs.append({"loss": out.loss, "seq_logp": out.seq_logp, "token_logp": out.token_logp,
                     "dhidden": h.grad, "dweight": W.grad})
        assert (h.grad[~mask] == 0).all()
    assert_close({k: v.detach().double() for k, v in outs[0].items()},
                 {k: v.detach().double() for k, v in outs[1].items()}, 2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_no_grad(backend):
    hidden, weight, bias, targets, seq = packed_batch(LENGTHS, seed=6)
    h = hidden.clone().requires_grad_()
    out = rk.linear_rlsc_loss(h, weight, targets, seq_index=seq, bias=bias, backend=backend, path="single-pass")
    out.loss.backward()
    exact = oracle(hidden, weight, bias, targets, seq, len(LENGTHS), temperature=0.5, alpha=0.1, weighting="rlsc",
                   reduction="mean")
    assert (h.grad.double() - exact["dhidden"]).abs().max() <= 2e-5 * exact["dhidden"].abs().max()
    with torch.no_grad():
        out2 = rk.linear_rlsc_loss(h, weight, targets, seq_index=seq, bias=bias, backend=backend, path="single-pass")
    assert not out2.loss.requires_grad
    assert math.isclose(out2.loss.item(), exact["loss"].item(), rel_tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_over_the_budget_are_split_across_chunks(backend):
    """A sequence longer than the chunk budget is served by the single pass (split across chunks,
    its gradient scaled when it closes), on path "auto" and "single-pass" alike. (Before issue 19
    path="single-pass" refused it and "auto" took the two sweeps.)"""
    hidden, weight, bias, targets, seq = packed_batch([5, 80, 4, 61], seed=1)
    counts = torch.bincount(seq, minlength=4).tolist()
    assert single_pass.plan(counts, 203, 24, torch.float32, 812 * 20, True).layout == "split"
    kw = dict(temperature=0.7, alpha=0.1, weighting="rlsc", reduction="mean")
    exact = oracle(hidden, weight, bias, targets, seq, 4, **kw)
    for path in ("auto", "single-pass"):
        got = run_op(hidden, weight, bias, targets, seq, backend=backend, path=path, buffer_bytes=812 * 20, **kw)
        assert_close(got, exact, 2e-5, f"{backend}/{path}")


def test_single_pass_refusals_name_the_reason():
    hidden, weight, bias, targets, seq = packed_batch([5, 6], seed=1)
    with pytest.raises(ValueError, match="path='single-pass'.*reference"):
        rk.linear_rlsc_loss(hidden, weight, targets, seq_index=seq, backend="reference", path="single-pass")
    with pytest.raises(ValueError, match="path must be one of"):
        rk.linear_rlsc_loss(hidden, weight, targets, seq_index=seq, backend="torch", path="fast")
    with pytest.raises(ValueError, match=r"weighting tensor must have shape \[2\]"):
        rk.linear_rlsc_loss(hidden, weight, targets, seq_index=seq, backend="torch", path="single-pass",
                            weighting=torch.ones(3))


def test_weigh_slices_external_weights_by_position():
    """Weigh is a pure function of (L, n, first sequence): the same call gives the same answer."""
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weigh = single_pass.Weigh(w, 0.1, "mean", 4)
    L = torch.zeros(2)
    n = torch.ones(2, dtype=torch.int64)
    assert weigh(L, n, 0)[0].tolist() == [1.0, 2.0]
    sw, coef = weigh(L, n, 2)
    assert sw.tolist() == [3.0, 4.0] and coef.tolist() == [-0.75, -1.0]
    assert weigh(L[:1], n[:1], s0=1)[0].tolist() == [2.0]
    assert weigh(L, n, 2)[0].tolist() == [3.0, 4.0]  # no state: the s0 = 1 call changed nothing
    with pytest.raises(RuntimeError, match="outside"):
        weigh(L, n, 3)


# ------------------------------------------------------------------------------------------------
# Sequences longer than the chunk budget (issue 19): split across chunks, through the driver.

from rlsc_kernels.options import FusedOptions  # noqa: E402
from rlsc_kernels.single_pass.plan import chunks_from_bounds, split_bounds  # noqa: E402

SPLIT_LENGTHS = [37, 3, 0, 50, 2, 0, 23]  # 37 opens at token 0 (dweight is its accumulator), 50 and 23 do not


def run_split(backend, lengths, rows, *, dtype=torch.float64, needs=(True, True, True), weighting="rlsc",
              entropy=True, seed=0, bias=True):
    hidden, weight, b, targets, seq = packed_batch(lengths, dtype=dtype, seed=seed, shuffle=False)
    b = b if bias else None
    S = len(lengths)
    chunks = chunks_from_bounds(lengths, split_bounds(lengths, rows))
    opts = FusedOptions(temperature=0.7, return_entropy=entropy)
    weigh = single_pass.Weigh(weighting, 0.1, "mean", S)
    res = single_pass.rlsc_single_pass(backend, hidden, weight, b, targets, seq, chunks, weigh, opts, needs)
    return res, chunks, (hidden, weight, b, targets, seq, S)


def test_split_plan_cuts_only_sequences_longer_than_the_rows():
    counts = [37, 3, 0, 50, 2, 0, 23, 10, 0]
    rows = 10
    bounds = split_bounds(counts, rows)
    chunks = chunks_from_bounds(counts, bounds)
    starts = [sum(counts[:s]) for s in range(len(counts) + 1)]
    assert bounds[0] == 0 and bounds[-1] == sum(counts)
    assert all(0 < c.t1 - c.t0 <= rows for c in chunks)
    for s, n in enumerate(counts):  # a sequence of at most `rows` tokens lies in one chunk
        if 0 < n <= rows:
            assert any(c.t0 <= starts[s] and starts[s] + n <= c.t1 for c in chunks), s
    # every sequence is weighed exactly once, in the chunk holding its last token
    assert [c.s0 for c in chunks[1:]] == [c.s1 for c in chunks[:-1]] and chunks[-1].s1 == len(counts)
    for c in chunks:
        for s in range(c.s0, c.s1):
            if counts[s]:
                assert c.t0 <= starts[s + 1] - 1 < c.t1
        assert c.carry_start <= c.t0 and c.t0 <= max(c.open_start, c.t0) <= c.t1
        if c.carry_start < c.t0:
            assert c.carry_start == starts[c.s0]
    assert chunks_from_bounds([0, 0], split_bounds([0, 0], 5)) == [(0, 0, 0, 2, 0, 0)]


def test_plan_picks_the_layout_by_the_cost_model():
    V, D, f32 = 1000, 100, torch.float32
    budget = 4 * V * 20  # 20 rows
    assert single_pass.plan([20, 5], V, D, f32, budget, True).layout == "whole"
    # a 60-token sequence: 60 rows of logits (240 kB) fit within B + 4 V D (80 kB + 400 kB): grow the block
    grown = single_pass.plan([60, 5], V, D, f32, budget, True)
    assert (grown.layout, grown.rows, grown.open_bytes) == ("whole", 60, 0)
    # a 200-token sequence does not (800 kB): split, with the open accumulator 4 V D
    split = single_pass.plan([200, 5], V, D, f32, budget, True)
    assert (split.layout, split.rows, split.open_bytes) == ("split", 20, 4 * V * D)
    # without a weight gradient the split costs no memory: always split at the budget
    no_dw = single_pass.plan([60, 5], V, D, f32, budget, False)
    assert (no_dw.layout, no_dw.rows, no_dw.open_bytes) == ("split", 20, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 7, 10, 36])
def test_split_chunks_match_float64_oracle(backend, rows):
    """Sequences spanning 2-50 chunks (rows = 1: every token its own chunk), one opening at token 0,
    empty sequences between them, ignored tokens, bias, entropy: every output against Algorithm 1."""
    res, chunks, (h, w, b, y, seq, S) = run_split(backend, SPLIT_LENGTHS, rows)
    assert any(c.carry_start < c.t0 for c in chunks)
    exact = oracle(h, w, b, y, seq, S, temperature=0.7, alpha=0.1, weighting="rlsc", reduction="mean")
    got = {"seq_logp": res.seq_logp, "seq_weight": res.seq_weight, "token_logp": res.token_logp,
           "token_entropy": res.token_entropy, "dhidden": res.dhidden, "dweight": res.dweight, "dbias": res.dbias}
    got["loss"] = single_pass.Weigh("rlsc", 0.1, "mean", S).loss(res.seq_logp, res.seq_weight)
    assert_close({k: v.double() for k, v in got.items()}, exact, 1e-11, f"{backend} rows={rows}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_split_chunks_compute_only_the_gradients_asked_for(backend, needs):
    full, _, _ = run_split(backend, SPLIT_LENGTHS, 9, dtype=torch.float32, weighting="length", seed=3)
    part, _, _ = run_split(backend, SPLIT_LENGTHS, 9, dtype=torch.float32, weighting="length", seed=3, needs=needs)
    for name, need in zip(("dhidden", "dweight", "dbias"), needs):
        got = getattr(part, name)
        assert (got is not None) == need, name
        if need:
            assert torch.allclose(got, getattr(full, name), rtol=1e-5, atol=1e-7), name
    assert torch.equal(part.token_logp, full.token_logp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["rlsc-l1", "entropy", "tensor"])
def test_public_op_long_sequences_every_weighting(backend, weighting):
    """Through linear_rlsc_loss (unsorted ids), sequences of 60-90 tokens at a 20-token budget."""
    lengths = [61, 4, 90, 13, 77]
    hidden, weight, bias, targets, seq = packed_batch(lengths, seed=21)
    S = len(lengths)
    wt = torch.rand(S, generator=torch.Generator().manual_seed(2)) + 0.5 if weighting == "tensor" else weighting
    kw = dict(temperature=0.6, alpha=0.1, reduction="sum")
    exact = oracle(hidden, weight, bias, targets, seq, S, weighting=wt, **kw)
    got = run_op(hidden, weight, bias, targets, seq, weighting=wt, backend=backend, path="single-pass",
                 buffer_bytes=812 * 20, return_entropy=True, **kw)
    assert_close(got, exact, 2e-5, f"{backend}/{weighting}")


def _peaked_two_token_batch(dtype=torch.float32):
    """A two-token vocabulary with every target at p close to 1 (issue 16's hypothesis example):
    the target's 1 - p cancels if p is computed first."""
    gen = torch.Generator().manual_seed(0)
    N, D = 12, 4
    h = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (N,), generator=gen)
    # margin ~ 11-13 nats towards each token's target: p_y = 1 - O(1e-5)
    w = torch.zeros(2, D, dtype=torch.float64)
    w[:, 0] = torch.tensor([1.0, -1.0])
    h[:, 0] = torch.where(y == 0, 6.0, -6.0).double() + torch.rand(N, generator=gen, dtype=torch.float64) * 0.5
    seq = torch.arange(N) // 4
    return h.to(dtype), w.to(dtype), y, seq


@pytest.mark.parametrize("backend", ["torch"])
def test_target_gradient_does_not_cancel_when_p_is_close_to_1(backend):
    """dweight within twice plain fp32 PyTorch's error against float64 (it was 10x worse when
    the target's 1 - p was formed from p)."""
    h, w, y, seq = _peaked_two_token_batch()
    kw = dict(temperature=1.0, alpha=0.1, weighting="rlsc", reduction="mean")
    exact = oracle(h, w, None, y, seq, 3, **kw)
    got = run_op(h, w, None, y, seq, backend=backend, path="single-pass", **kw)
    same = run_op(h, w, None, y, seq, backend="reference", **kw)
    for name in ("dweight", "dhidden"):
        err = (got[name] - exact[name]).abs().max().item()
        err_ref = (same[name] - exact[name]).abs().max().item()
        assert err <= 2 * err_ref + 1e-9 * exact[name].abs().max().item(), f"{name}: {err:.3e} vs fp32 torch {err_ref:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_scale_is_applied_in_fp32(backend, dtype):
    """grad_output = 2^16 (GradScaler's default scale, inf in fp16) and 2^-20: the 16-bit gradients
    are the float32 gradients times the scale, rounded once (these backends upcast 16-bit inputs,
    so the float32 run of the same values computes the same float32 gradients)."""
    hidden, weight, bias, targets, seq = packed_batch([40, 7, 55], dtype=dtype, seed=4, shuffle=False)

    def grads(dt, scale):
        h, W, b = (t.to(dt, copy=True).requires_grad_() for t in (hidden, weight, bias))
        # native_matmul="fp32": the native bf16 GEMMs do not compute the fp32 run's gradients
        # (test_native.py checks their scaling against their own unit-scale run)
        out = rk.linear_rlsc_loss(h, W, targets, seq_index=seq, bias=b, backend=backend, path="single-pass",
                                  buffer_bytes=812 * 20, native_matmul="fp32")
        (out.loss * scale).backward()
        return [t.grad for t in (h, W, b)]

    unit32 = grads(torch.float32, 1.0)
    for scale in (2.0**16, 2.0**-20):
        for g, g32, name in zip(grads(dtype, scale), unit32, ("dhidden", "dweight", "dbias")):
            assert g.dtype == dtype and torch.isfinite(g).all(), name
            want = (g32 * scale).to(dtype)
            assert (g != 0).float().mean() > 0.5 if scale > 1 else True
            torch.testing.assert_close(g, want, rtol=torch.finfo(dtype).eps, atol=0.0, msg=f"{name} x {scale}")


def test_backends_and_kernels_import_nothing_above_them():
    """The arrows run single_pass -> backends -> kernels (issue 18): no backend or kernel module
    imports the single-pass package or the naive oracle (reference.py)."""
    import ast
    from pathlib import Path

    root = Path(rk.__file__).parent
    for path in sorted((root / "backends").glob("*.py")) + sorted((root / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert "single_pass" not in name.split("."), f"{path.name}: {name}"
                assert not (node.__class__ is ast.ImportFrom and (node.module or "").endswith("reference")), path.name


def test_auto_takes_the_single_pass_only_where_it_is_proven():
    """Defaults only on proven paths (issue 16): "auto" tries the single pass on CPU (measured)
    and takes the two sweeps on CUDA until a GPU record adds it; "single-pass" opts in anywhere."""
    assert single_pass.auto_takes_single_pass(torch.device("cpu"))
    assert not single_pass.auto_takes_single_pass(torch.device("cuda"))
    assert not single_pass.auto_takes_single_pass("cuda:1")
    assert single_pass.SINGLE_PASS_DEFAULT_DEVICES == ("cpu",)
    hidden, weight, bias, targets, seq = packed_batch([5, 9, 30], seed=7)
    kw = dict(temperature=0.7, backend="torch", buffer_bytes=812 * 10)
    auto = run_op(hidden, weight, bias, targets, seq, path="auto", **kw)
    single = run_op(hidden, weight, bias, targets, seq, path="single-pass", **kw)
    two = run_op(hidden, weight, bias, targets, seq, path="two-sweep", **kw)
    assert all(torch.equal(auto[k], single[k]) for k in auto)
    assert not all(torch.equal(auto[k], two[k]) for k in auto)  # the paths are told apart


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_takes_the_two_sweeps_on_cuda():
    hidden, weight, bias, targets, seq = (t.cuda() for t in packed_batch([5, 9, 30], seed=7))
    kw = dict(temperature=0.7, backend="triton", buffer_bytes=812 * 10)
    auto = run_op(hidden, weight, bias, targets, seq, path="auto", **kw)
    two = run_op(hidden, weight, bias, targets, seq, path="two-sweep", **kw)
    assert all(torch.equal(auto[k], two[k]) for k in auto)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_with_retain_graph_accumulates_the_same_gradient(backend):
    """On CPU a grad_output of 1 hands autograd the saved gradient itself (no W-sized pass): a
    second backward through the retained graph must still add the same gradient."""
    hidden, weight, bias, targets, seq = packed_batch([6, 9, 4], seed=12)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = rk.linear_rlsc_loss(h, W, targets, seq_index=seq, backend=backend, path="single-pass")
    out.loss.backward(retain_graph=True)
    once = (h.grad.clone(), W.grad.clone())
    out.loss.backward(retain_graph=True)
    assert torch.equal(h.grad, 2 * once[0]) and torch.equal(W.grad, 2 * once[1])
    (out.loss * 3.0).backward()
    assert torch.allclose(W.grad, 5 * once[1], rtol=1e-6, atol=0)
