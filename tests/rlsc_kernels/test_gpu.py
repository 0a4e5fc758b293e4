"""GPU-only checks: the real compiler's bf16/fp16/fp32 dots at the shipped block sizes, int64
offsets, the filter on a realistic peaked distribution. Skipped where no CUDA GPU is present."""
import pytest
import torch

import rlsc_kernels as rk

from .oracle import TOL, assert_within_oracle

pytestmark = pytest.mark.gpu


def _inputs(N, D, V, dtype, scale=1.0, bias=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, device="cuda", generator=gen, dtype=torch.float32).to(dtype)
    w = (torch.randn(V, D, device="cuda", generator=gen) * (scale / D**0.5)).to(dtype)
    b = (torch.randn(V, device="cuda", generator=gen) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), device="cuda", generator=gen)
    y[::7] = -100
    return h, w, b, y


def _run(backend, h, w, b, y, T, filter_eps=None, entropy_weight=0.3, **options):
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    logp, ent = rk.linear_logprobs(hh, ww, y, bias=bb, temperature=T, return_entropy=True, backend=backend,
                                   filter_eps=filter_eps, **options)
    gen = torch.Generator(device=h.device).manual_seed(1)
    g = torch.randn(logp.shape, device=h.device, generator=gen, dtype=torch.float64)
    e = torch.randn(logp.shape, device=h.device, generator=gen, dtype=torch.float64)
    ((logp.double() * g).sum() + entropy_weight * (ent.double() * e).sum()).backward()
    out = {"logp": logp, "entropy": ent, "dhidden": hh.grad, "dweight": ww.grad}
    if bb is not None:
        out["dbias"] = bb.grad
    return {k: v.detach().double().cpu() for k, v in out.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,T,bias", [((1000, 576, 5003), 0.5, False), ((333, 200, 2049), 1.3, True)])
def test_triton_on_gpu_matches_float64_oracle(dtype, shape, T, bias):
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w, b, y = _inputs(*shape, dtype, bias=bias)
    exact = _run("reference", h.double(), w.double(), None if b is None else b.double(), y, T)
    same = _run("reference", h, w, b, y, T)
    fast = _run("triton", h, w, b, y, T)
    assert_within_oracle(fast, same, exact, dtype, label=f"gpu {dtype} {shape}")


@pytest.mark.parametrize("strategy,grad_matmul", [("sliced", "library"), ("sliced", "triton"), ("fused", "library")])
@pytest.mark.parametrize("filter_eps", [None, rk.AUTO_FILTER_EPS])
def test_every_backward_variant_on_gpu(strategy, grad_matmul, filter_eps):
    h, w, b, y = _inputs(1500, 640, 9001, torch.bfloat16, scale=6.0)
    exact = _run("reference", h.double(), w.double(), b.double(), y, 0.5)
    same = _run("reference", h, w, b, y, 0.5)
    fast = _run("triton", h, w, b, y, 0.5, filter_eps=filter_eps, backward=strategy, grad_matmul=grad_matmul)
    if filter_eps is None:
        assert_within_oracle(fast, same, exact, torch.bfloat16, label=f"{strategy}/{grad_matmul}")
    else:  # the filter's own error comes on top (bounded on CPU in test_gradient_filter.py)
        for name in ("dhidden", "dweight"):
            scale = exact[name].abs().max().item()
            assert (fast[name] - exact[name]).abs().max().item() <= 2e-2 * scale, name


def test_rlsc_loss_triton_equals_torch_backend_on_gpu():
    h, w, b, y = _inputs(777, 256, 3001, torch.bfloat16, scale=4.0)
    seq = torch.arange(777, device="cuda") % 16
    outs = {}
    for backend in ("torch", "triton"):
        ww = w.clone().requires_grad_()
        out = rk.linear_rlsc_loss(h, ww, y, seq_index=seq, bias=b, backend=backend, filter_eps=None)
        out.loss.backward()
        outs[backend] = (out.loss.double(), out.seq_logp.double(), ww.grad.double())
    assert torch.allclose(outs["triton"][1], outs["torch"][1], rtol=1e-4, atol=1e-3)
    scale = outs["torch"][2].abs().max()
    assert (outs["triton"][2] - outs["torch"][2]).abs().max() <= 2e-2 * scale


def test_filtered_mode_error_on_peaked_distribution():
    """Targets sampled from the model's own softmax at T = 0.5 with a peaked logit scale."""
    N, D, V, T = 2048, 512, 32000, 0.5
    h, w, b, _ = _inputs(N, D, V, torch.bfloat16, scale=10.0, bias=False)
    with torch.no_grad():
        z = (h.float() @ w.float().T) / T
        y = torch.distributions.Categorical(logits=z).sample()
        del z
    exact = _run("reference", h.double(), w.double(), None, y, T, entropy_weight=0.0)
    full = _run("triton", h, w, None, y, T, entropy_weight=0.0)
    filt = _run("triton", h, w, None, y, T, filter_eps=rk.AUTO_FILTER_EPS, entropy_weight=0.0)
    for name in ("dhidden", "dweight"):
        scale = exact[name].abs().max().item()
        e_full = (full[name] - exact[name]).abs().max().item() / scale
        e_filt = (filt[name] - exact[name]).abs().max().item() / scale
        print(f"{name}: exact-mode rel err {e_full:.2e}, filtered rel err {e_filt:.2e}")
        assert e_filt <= e_full + 4 * TOL[torch.bfloat16], name


def test_int64_offsets_when_n_times_v_exceeds_2_31():
    """N * V = 16400 * 140000 > 2^31: the last tokens' log-probs must still be right."""
    N, D, V = 16400, 64, 140000
    h, w, _, y = _inputs(N, D, V, torch.bfloat16, bias=False)
    y[-5:] = V - 1
    logp = rk.linear_logprobs(h, w, y, backend="triton")
    tail = rk.linear_logprobs(h[-64:].double(), w.double(), y[-64:], backend="reference")
    assert torch.allclose(logp[-64:].double(), tail, rtol=1e-3, atol=2e-2)


def test_int64_offsets_when_v_times_d_exceeds_2_31():
    N, D, V = 256, 4096, 530000  # V * D = 2.17e9
    h, w, _, y = _inputs(N, D, V, torch.bfloat16, bias=False)
    y[:8] = V - 1
    ww = w.clone().requires_grad_()
    rk.linear_logprobs(h, ww, y, backend="triton", filter_eps=None).sum().backward()
    rows = ww.grad[-3:].double()
    w_tail = w[-3:].double().requires_grad_()
    # gradient of sum(logp) w.r.t. the last rows, computed exactly from the full softmax
    with torch.no_grad():
        lse = torch.logsumexp((h.float() @ w.float().T).double(), dim=1)
    z = h.double() @ w_tail.T
    p = torch.exp(z - lse[:, None])
    onehot = (y[:, None] == torch.arange(V - 3, V, device="cuda")[None, :]).double() * (y[:, None] != -100)
    valid = (y != -100).double()[:, None]
    want = ((onehot - p * valid).T @ h.double())
    assert (rows - want).abs().max() <= 2e-2 * want.abs().max() + 1e-3


# ------------------------------------------------------------------------------------------------
# The single-pass RLSC loss (backends/triton_single_pass.py) compiled, in real bf16: cuBLAS GEMMs
# with fp32 output, the row kernels at the shipped block sizes, 16-bit gradients written in place.


def _single_pass_case(N, D, V, S, dtype, *, bias, seed, logit_scale=1.0, max_rows=None, weighting="rlsc",
                      reduction="mean", entropy=True, T=0.5):
    from .test_triton_single_pass import _draw, _oracle, _single_pass

    h, w, b, y, seq = _draw(N, D, V, S, dtype, bias=bias, seed=seed, logit_scale=logit_scale)
    kw = dict(T=T, weighting=weighting, alpha=0.1, reduction=reduction, entropy=entropy)
    exact = _oracle(h.double(), w.double(), None if b is None else b.double(), y, seq, S, **kw)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    h, w, b, y, seq, weighting = (cuda(t) for t in (h, w, b, y, seq, weighting))
    kw["weighting"] = weighting
    same = _oracle(h, w, b, y, seq, S, **kw)
    from rlsc_kernels.backends.triton_single_pass import SHIPPED_CONFIGS

    fast, res, chunks = _single_pass(h, w, b, y, seq, S, max_rows=max_rows or N, configs=SHIPPED_CONFIGS, **kw)
    return fast, same, exact, res, chunks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,bias", [((1000, 576, 5003, 9), False), ((333, 200, 2049, 5), True)])
def test_single_pass_on_gpu_matches_float64_oracle(dtype, shape, bias):
    torch.backends.cuda.matmul.allow_tf32 = False
    N, D, V, S = shape
    fast, same, exact, res, chunks = _single_pass_case(N, D, V, S, dtype, bias=bias, seed=0, max_rows=N // 3)
    assert len(chunks) >= 3
    assert_within_oracle(fast, same, exact, dtype, label=f"single pass gpu {dtype} {shape}")


@pytest.mark.parametrize("weighting", ["rlsc-l1", "entropy", "length", "external"])
def test_single_pass_every_weighting_on_gpu(weighting):
    if weighting == "external":
        weighting = torch.linspace(-1.0, 2.0, 6)
    fast, same, exact, _, _ = _single_pass_case(700, 256, 3001, 6, torch.bfloat16, bias=True, seed=1, max_rows=300,
                                                weighting=weighting, reduction="sum")
    assert_within_oracle(fast, same, exact, torch.bfloat16, label=f"single pass {weighting}")


def test_single_pass_large_logits_no_worse_than_two_sweep_exact_on_gpu():
    """Logits of magnitude 20-40 in bf16: the fp32 logits block keeps the single pass at least as
    accurate as the two-sweep exact mode (whose tiles are fp32 accumulators)."""
    fast, _, exact, _, _ = _single_pass_case(1024, 512, 8191, 4, torch.bfloat16, bias=False, seed=2,
                                             logit_scale=12.0, entropy=False, max_rows=512)
    from .test_triton_single_pass import _draw

    h, w, _, y, seq = (t.cuda() if t is not None else None for t in _draw(1024, 512, 8191, 4, torch.bfloat16,
                                                                            bias=False, seed=2, logit_scale=12.0))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp = rk.linear_logprobs(hh, ww, y, temperature=0.5, backend="triton", filter_eps=None)
    seq_logp = torch.zeros(4, device="cuda").index_add(0, seq, logp)
    n_tok = torch.bincount(seq[y != -100], minlength=4)
    loss = -(rk.rlsc_weights(seq_logp, n_tok, "rlsc", 0.1) * seq_logp).sum() / 4
    loss.backward()
    two = {"loss": loss, "token_logp": logp, "seq_logp": seq_logp, "dhidden": hh.grad, "dweight": ww.grad}
    for name, ref in two.items():
        scale = exact[name].abs().max().item()
        err_one = (fast[name] - exact[name]).abs().max().item()
        err_two = (ref.detach().double().reshape(-1).cpu() - exact[name]).abs().max().item()
        print(f"{name}: single pass {err_one:.3e}, two-sweep exact {err_two:.3e} (scale {scale:.3e})")
        assert err_one <= err_two + TOL[torch.bfloat16] * scale, name


def test_single_pass_dweight_accumulates_in_fp32_over_many_chunks():
    """64 sequences in 16+ chunks: rounding dW to bf16 after each chunk would put its error well above
    a single bf16 rounding of the exact result; fp32 accumulation (rounded once at the end) stays
    within that, plus half a bf16 unit."""
    fast, same, exact, res, chunks = _single_pass_case(64 * 40, 128, 4099, 64, torch.bfloat16, bias=False, seed=3,
                                                       max_rows=40, entropy=False)
    assert len(chunks) >= 16 and res.dweight.dtype == torch.float32  # rounded once, in the backward
    err = (fast["dweight"] - exact["dweight"]).abs().max().item()
    err_bf16 = (same["dweight"] - exact["dweight"]).abs().max().item()
    print(f"dweight error: fp32-accumulated {err:.3e}, torch bf16 {err_bf16:.3e}")
    assert err <= err_bf16 + TOL[torch.bfloat16] * exact["dweight"].abs().max().item()


def test_single_pass_int64_offsets_when_chunk_rows_times_v_exceed_2_31():
    """One chunk of 15400 tokens x V 140000 (2.16e9 logits, an 8.6 GB fp32 block)."""
    from rlsc_kernels.options import FusedOptions
    from rlsc_kernels.single_pass import Weigh, rlsc_single_pass

    N, D, V = 15400, 64, 140000
    h, w, _, y = _inputs(N, D, V, torch.bfloat16, bias=False)
    y[-5:] = V - 1
    seq = torch.zeros(N, dtype=torch.int64, device="cuda")
    res = rlsc_single_pass("triton", h, w, None, y, seq, [(0, N, 0, 1)], Weigh("rlsc", 0.1, "sum", 1),
                           FusedOptions(temperature=1.0), (True, False, False))
    tail = rk.linear_logprobs(h[-64:].double(), w.double(), y[-64:], backend="reference")
    assert torch.allclose(res.token_logp[-64:].double(), tail, rtol=1e-3, atol=2e-3)
    # the gradient of the last rows (written at byte offsets past 2^31 of the in-place block)
    with torch.no_grad():
        z = h[-64:].double() @ w.double().T
        p = torch.softmax(z, -1)
        onehot = torch.nn.functional.one_hot(y[-64:].clamp(min=0), V).double() * (y[-64:] != -100).double()[:, None]
        g = -rk.rlsc_weights(res.seq_logp, torch.tensor([int((y != -100).sum())], device="cuda"), "rlsc", 0.1).double()
        want = (g * (onehot - p) * (y[-64:] != -100).double()[:, None]) @ w.double()
    assert (res.dhidden[-64:].double() - want).abs().max() <= 2e-2 * want.abs().max() + 1e-6


@pytest.mark.parametrize("variant", ["sliced", "sliced-sparse", "fused"])
def test_no_device_to_host_sync_with_value_checks_off(variant):
    """check_values=False, the packed form with num_sequences, the two sweeps: forward and
    backward run under torch.cuda.set_sync_debug_mode("error"), which raises on any sync."""
    h, w, b, y = _inputs(700, 256, 3001, torch.bfloat16)
    seq = torch.arange(700, device="cuda") // 50
    hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
    options = dict(backward=variant.split("-")[0], grad_matmul="triton" if variant.endswith("sparse") else "library")
    rk.linear_rlsc_loss(hh, ww, y, seq_index=seq, num_sequences=14, bias=bb, backend="triton", check_values=False,
                        path="two-sweep", **options).loss.backward()  # warm-up: compile outside the guard
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rk.linear_rlsc_loss(hh, ww, y, seq_index=seq, num_sequences=14, bias=bb, backend="triton",
                                  check_values=False, path="two-sweep", return_entropy=True, **options)
        out.loss.backward()
        logp = rk.linear_logprobs(hh, ww, y, bias=bb, backend="triton", check_values=False, **options)
        logp.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item() and torch.isfinite(ww.grad).all().item()


def test_single_pass_backend_makes_no_host_sync():
    """Given its chunk plan (Python ints), the Triton single pass never waits for the device."""
    from rlsc_kernels.options import FusedOptions
    from rlsc_kernels.single_pass import Weigh, rlsc_single_pass

    h, w, b, y = _inputs(700, 256, 3001, torch.bfloat16)
    seq = torch.arange(700, device="cuda") // 50
    chunks = [(0, 300, 0, 6), (300, 700, 6, 14)]
    opts = FusedOptions(temperature=0.5, return_entropy=True)

    def run():
        return rlsc_single_pass("triton", h, w, b, y, seq, chunks, Weigh("length", 0.1, "mean", 14), opts,
                                (True, True, True))

    run()  # warm-up: compile and probe the library outside the guard
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(res.dweight).all().item() and torch.isfinite(res.seq_logp).all().item()


def test_strided_targets_bias_hidden_and_weight_on_gpu():
    """The compiled kernels, not only the interpreter: a targets column, bias[::2], a transposed
    hidden and a weight at a storage offset give the answer of their contiguous copies."""
    h, w, b, y = _inputs(300, 128, 1000, torch.bfloat16)
    pairs = torch.stack([torch.zeros_like(y), y], 1)
    results = []
    for strided in (True, False):
        hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
        if strided:
            args = (hh.t().contiguous().t(), torch.cat([torch.zeros_like(ww[:5]), ww])[5:],
                    torch.stack([bb, torch.zeros_like(bb)], 1).reshape(-1)[::2], pairs[:, 1])
        else:
            args = (hh, ww, bb, y)
        logp, ent = rk.linear_logprobs(args[0], args[1], args[3], bias=args[2], temperature=0.7, return_entropy=True,
                                       backend="triton", filter_eps=None)
        (logp.sum() + 0.3 * ent.sum()).backward()
        results.append([logp, ent, hh.grad, ww.grad, bb.grad])
    for got, want in zip(*results):
        assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3)


def test_single_pass_gemms_have_fp32_output_on_gpu():
    """torch >= 2.8 on CUDA: bf16 GEMMs write fp32 directly (no upcast copies of W or the block)."""
    from rlsc_kernels.backends.triton_single_pass import gemm_path

    for dtype in (torch.bfloat16, torch.float16):
        assert gemm_path(torch.device("cuda", torch.cuda.current_device()), dtype).startswith("16-bit GEMMs with fp32")


# ---- the regime matrix on CUDA (tests/rlsc_kernels/regime_matrix.py) ---------------------------


def _gpu_cases():
    from .regime_matrix import covering

    # native is the CPU backend: its cases run here with the Triton kernels compiled for the GPU
    cases = []
    for case in covering():
        case = dict(case, backend="triton" if case["backend"] == "native" else case["backend"])
        if case not in cases:
            cases.append(case)
    return cases


@pytest.mark.parametrize("case", _gpu_cases(), ids=lambda c: "-".join(c.values()))
def test_regime_matrix_on_gpu(case):
    """Every matrix case on CUDA, judged as on CPU (2 x same-precision PyTorch + a small term)."""
    from .regime_matrix import case_id
    from .test_regime_matrix import problem, run_head_case, run_op_case, world_of_one

    p = problem(case, 0)
    if case["entry"] == "add_fused_lm_head":
        return run_head_case(case, p, device="cuda")
    if case["entry"] == "vocab-parallel":
        with world_of_one("cuda"):
            return run_op_case(case, p, device="cuda")
    return run_op_case(case, p, device="cuda")


@pytest.mark.parametrize("regime", ["plain", "grad-scaler", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("entry", ["logprobs", "loss-two-sweep"])
def test_sync_free_route_in_every_regime(regime, dtype, entry):
    """check_values=False, the packed form with num_sequences and path='two-sweep': forward and
    backward make no device-to-host sync in any regime (torch.cuda.set_sync_debug_mode("error")
    raises on one). The GradScaler's own step syncs (found_inf); the op does not."""
    if regime == "autocast" and dtype == torch.float32:
        pytest.skip("autocast to fp32 is the plain regime")
    master = torch.float32 if regime != "plain" else dtype
    h, w, b, y = _inputs(300, 96, 1001, master)
    h, w, b = (t.detach().requires_grad_() for t in (h, w, b))
    seq = torch.arange(300, device="cuda") // 100
    y = y.clamp(min=0)
    region = torch.autocast("cuda", dtype=dtype) if regime != "plain" else torch.autocast("cuda", enabled=False)
    scale = 2.0**16 if regime == "grad-scaler" else 1.0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with region:
            if entry == "logprobs":
                logp, ent = rk.linear_logprobs(h, w, y, bias=b, return_entropy=True, check_values=False,
                                               temperature=0.7)
                obj = logp.sum() + 0.3 * ent.sum()
            else:
                obj = rk.linear_rlsc_loss(h, w, y, seq_index=seq, num_sequences=3, bias=b, check_values=False,
                                          path="two-sweep", temperature=0.7).loss
        (obj * scale).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(w.grad).all()) and w.grad.dtype == master


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_single_pass_split_sequences_on_gpu_match_float64_oracle(dtype):
    """Issue 19 on the GPU: sequences longer than the chunk (split layout, open accumulator), and
    GradScaler's 2^16 applied to the fp32 gradients, rounded once (issue 16)."""
    from rlsc_kernels.backends import triton_single_pass
    from rlsc_kernels.options import FusedOptions
    from rlsc_kernels.single_pass import Weigh, rlsc_single_pass
    from rlsc_kernels.single_pass.plan import chunks_from_bounds, split_bounds

    from .test_triton_single_pass import _draw, _oracle

    torch.backends.cuda.matmul.allow_tf32 = False
    S = 5
    h, w, b, y, seq = _draw(1500, 256, 3001, S, dtype, bias=True, seed=5)
    kw = dict(T=0.7, weighting="rlsc", alpha=0.1, reduction="mean", entropy=True)
    exact = _oracle(h.double(), w.double(), b.double(), y, seq, S, **kw)
    h, w, b, y, seq = (t.cuda() for t in (h, w, b, y, seq))
    same = _oracle(h, w, b, y, seq, S, **kw)
    counts = torch.bincount(seq, minlength=S).tolist()
    chunks = chunks_from_bounds(counts, split_bounds(counts, 128))
    assert any(c.carry_start < c.t0 for c in chunks)
    weigh = Weigh("rlsc", 0.1, "mean", S)
    res = rlsc_single_pass(triton_single_pass, h, w, b, y, seq, chunks, weigh,
                           FusedOptions(temperature=0.7, return_entropy=True), (True, True, True))
    fast = {"loss": weigh.loss(res.seq_logp, res.seq_weight), "token_logp": res.token_logp, "seq_logp": res.seq_logp,
            "dhidden": res.dhidden, "dweight": res.dweight, "token_entropy": res.token_entropy, "dbias": res.dbias}
    fast = {k: v.detach().double().reshape(-1).cpu() for k, v in fast.items()}
    assert_within_oracle(fast, same, exact, dtype, label=f"split single pass gpu {dtype}")
    ww = w.detach().clone().requires_grad_()
    out = rk.linear_rlsc_loss(h, ww, y, seq_index=seq, bias=b, backend="triton", path="single-pass",
                              temperature=0.7, buffer_bytes=3001 * 4 * 128)
    (out.loss * 2.0**16).backward()
    assert ww.grad.dtype == dtype and torch.isfinite(ww.grad).all()
