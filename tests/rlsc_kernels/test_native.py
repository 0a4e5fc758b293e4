"""The native CPU backend (csrc/, backend="native"): its kernels against the PyTorch single pass
and the float64 oracle, the polynomial exponential at its edges, threads, the two-sweep ops it
delegates, and what happens where the extension was not built."""
import shutil
import warnings

import pytest
import torch

import rlsc_kernels as rk
from rlsc_kernels import backends
from rlsc_kernels.backends import native, torch_single_pass
from rlsc_kernels.options import FusedOptions
from rlsc_kernels.single_pass import Weigh, plan_chunks, rlsc_single_pass

from .oracle import TOL, assert_within_oracle, make_inputs, run_logprobs

needs_native = pytest.mark.skipif(not native.available(), reason=f"native extension not built: {native.unavailable_reason()}")


def _compiler_present() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.mark.skipif(not _compiler_present(), reason="no C++ compiler: the package installs without the extension")
def test_extension_is_built_where_a_compiler_is_present():
    assert native.available(), (
        "the native extension did not import although a C++ compiler is present "
        f"({native.unavailable_reason()}); reinstall with pip install --no-build-isolation -e ."
    )


def _single_pass(module, hidden, weight, bias, targets, seq, S, opts, rows, needs=(True, True, True)):
    counts = torch.bincount(seq, minlength=S).tolist()
    chunks = plan_chunks(counts, rows)
    return rlsc_single_pass(module, hidden, weight, bias, targets, seq, chunks, Weigh("rlsc", 0.1, "mean", S), opts,
                            needs)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("V", [1, 7, 17, 1000, 4099])
@pytest.mark.parametrize("entropy", [False, True])
def test_native_kernels_match_torch_single_pass(dtype, V, entropy):
    """Awkward vocabularies (1, below and across the vector width, odd tails), bias, temperature,
    ignored tokens, several chunks: every output of the native pass against the PyTorch one,
    both judged against the same computation in float64."""
    lengths = [3, 9, 1, 14, 6]
    S, N, D = len(lengths), sum(lengths), 19
    h, w, b, y = make_inputs(N, D, V, dtype=dtype, logit_scale=4.0, seed=V + entropy)
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    opts = FusedOptions(temperature=0.7, ignore_index=-100, return_entropy=entropy)
    fast = _single_pass(native, h, w, b, y, seq, S, opts, rows=15)
    same = _single_pass(torch_single_pass, h, w, b, y, seq, S, opts, rows=15)
    exact = _single_pass(torch_single_pass, h.double(), w.double(), b.double(), y, seq, S, opts, rows=N)
    names = ["token_logp", "seq_logp", "seq_weight", "lse", "dhidden", "dweight", "dbias"]
    if entropy:
        names += ["token_entropy", "mean_z"]
    pick = lambda r: {k: getattr(r, k).double() for k in names}  # noqa: E731
    assert_within_oracle(pick(fast), pick(same), pick(exact), dtype, f"native V={V}")


@needs_native
def test_exponential_at_large_logit_gaps_and_underflow():
    """Logits spanning hundreds of units: exp(z - max) underflows to 0 without NaN, and the
    log-probs of far-below-max targets stay exact (they come from z - lse, not from exp)."""
    V, D = 300, 4
    h = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    w = torch.randn(V, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w[:, 0] = torch.linspace(-400, 60, V, dtype=torch.float64)  # gaps up to 460 between entries
    w[:, 1] = torch.linspace(-87.5, -86.5, V, dtype=torch.float64) * 0  # all equal: uniform
    w[:, 2] = torch.linspace(-30, 30, V, dtype=torch.float64)
    y = torch.tensor([0, 5, V - 1])
    seq = torch.tensor([0, 1, 2])
    opts = FusedOptions(temperature=1.0, ignore_index=-100, return_entropy=True)
    fast = _single_pass(native, h, w.float(), None, y, seq, 3, opts, rows=3)
    exact = _single_pass(torch_single_pass, h.double(), w, None, y, seq, 3, opts, rows=3)
    for name in ("token_logp", "lse", "token_entropy", "dhidden", "dweight"):
        got, want = getattr(fast, name).double(), getattr(exact, name)
        assert torch.isfinite(got).all(), name
        assert (got - want).abs().max() <= 1e-5 * max(want.abs().max().item(), 1.0), name


@needs_native
def test_thread_count_follows_torch_set_num_threads():
    ext = native.extension()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ext.num_threads() == 1 and ext.parallel_for_threads() == 1
        if before > 1:
            torch.set_num_threads(before)
            assert ext.num_threads() == before
            assert 1 < ext.parallel_for_threads() <= before
    finally:
        torch.set_num_threads(before)


@needs_native
def test_auto_backend_is_native_on_cpu():
    assert backends.resolve("auto", torch.zeros(1)) == "native"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_on_native_backend_matches_oracle(dtype):
    """linear_logprobs has no single pass: backend="native" serves it by the PyTorch two sweeps."""
    h, w, b, y = make_inputs(37, 24, 301, dtype=dtype, logit_scale=3.0, seed=1)
    fast = run_logprobs("native", h, w, b, y, temperature=0.7)
    same = run_logprobs("reference", h, w, b, y, temperature=0.7)
    exact = run_logprobs("reference", h.double(), w.double(), b.double(), y, temperature=0.7)
    assert_within_oracle(fast, same, exact, dtype, "native logprobs")


@pytest.fixture
def without_extension(monkeypatch):
    """The state of an install where no compiler was present."""
    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setattr(native, "_EXT_ERROR", ImportError("simulated: no C++ compiler at install time"))
    monkeypatch.setattr(backends, "_warned_no_native", False)


def test_without_extension_auto_falls_back_to_torch_with_one_warning(without_extension):
    h, w, b, y = make_inputs(12, 8, 31, dtype=torch.float32, seed=0)
    with pytest.warns(RuntimeWarning, match="native CPU backend not built.*simulated.*PyTorch backend") as record:
        out = rk.linear_rlsc_loss(h, w, y, bias=b)
    assert len([r for r in record if issubclass(r.category, RuntimeWarning)]) == 1
    ref = rk.linear_rlsc_loss(h, w, y, bias=b, backend="torch")
    assert torch.equal(out.loss, ref.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk.linear_logprobs(h, w, y, bias=b)  # warned once per process, not per call


def test_without_extension_backend_native_raises_clearly(without_extension):
    h, w, b, y = make_inputs(12, 8, 31, dtype=torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="backend='native' needs the compiled CPU extension.*simulated"):
        rk.linear_rlsc_loss(h, w, y, bias=b, backend="native")
    with pytest.raises(RuntimeError, match="backend='native' needs the compiled CPU extension"):
        rk.linear_logprobs(h, w, y, backend="native")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_native_backend_refuses_cuda_tensors():
    h, w, b, y = make_inputs(12, 8, 31, dtype=torch.float32, seed=0, device="cuda")
    with pytest.raises(ValueError, match="backend='native' is the CPU backend"):
        rk.linear_rlsc_loss(h, w, y, backend="native")


# ---- bf16 inputs: the bf16 GEMMs (AMX-BF16 / AVX512-BF16 through MKL) and the fp32 fallback ----

# BF16_GEMMS_USABLE: native_matmul="auto" takes the bf16 GEMMs here (Intel only, by default);
# needs_bf16_gemms: they can run here at all, which is all the tests below need, since they opt
# in with native_matmul="bf16" (so an AMD CPU with AVX512-BF16 runs them too)
BF16_GEMMS_USABLE = native.bf16_gemm_status()[0]
BF16_GEMMS_POSSIBLE, BF16_GEMMS_POSSIBLE_WHY = native.bf16_gemm_status(default=False)
needs_bf16_gemms = pytest.mark.skipif(not BF16_GEMMS_POSSIBLE, reason=f"bf16 GEMMs unavailable: {BF16_GEMMS_POSSIBLE_WHY}")

STATISTICS = ["token_logp", "seq_logp", "seq_weight", "lse", "token_entropy", "mean_z"]
GRADIENTS = ["dhidden", "dweight", "dbias"]


def _grads_with_16bit_logit_gradient(h, w, b, y, seq, S, temperature, seq_weight):
    """The GPU bf16 path's accuracy bound: dH, dW, db from the exact logit gradient rounded to bf16
    (everything else in float64), for the loss -sum_s w_s L_s / S with the given weights."""
    hd, wd = h.double(), w.double()
    z = (hd @ wd.T + b.double()) / temperature
    p = torch.softmax(z, dim=1)
    valid = y != -100
    ys = torch.where(valid, y, torch.zeros_like(y))
    onehot = torch.nn.functional.one_hot(ys, w.shape[0]).double()
    g = torch.where(valid, -seq_weight.double()[seq] / S / temperature, torch.zeros((), dtype=torch.float64))
    dz = (g[:, None] * (onehot - p)).to(torch.bfloat16).double()
    return {"dhidden": dz @ wd, "dweight": dz.T @ hd, "dbias": dz.sum(0)}


def _assert_bf16_bound(fast, fp32, exact, h, w, b, y, seq, S, label, floor=None):
    """The bf16 GEMMs' accuracy bound: statistics within the fp32 computation's error of the
    float64 oracle; dH, dW, db within twice the error of a bf16-rounded logit gradient + tol."""
    pick = lambda r, names: {k: getattr(r, k).double() for k in names}  # noqa: E731
    assert_within_oracle(pick(fast, STATISTICS), pick(fp32, STATISTICS), pick(exact, STATISTICS), torch.float32,
                         label, floor=floor)
    bound16 = _grads_with_16bit_logit_gradient(h, w, b, y, seq, S, 0.7, exact.seq_weight)
    for name in GRADIENTS:
        want = getattr(exact, name)
        err = (getattr(fast, name).double() - want).abs().max().item()
        err16 = (bound16[name] - want).abs().max().item()
        limit = 2 * err16 + TOL[torch.float32] * want.abs().max().item()
        assert err <= limit, f"{label} {name}: error {err:.3e} > 2 x 16-bit-logit-gradient error {err16:.3e} + tol"


def _bf16_case(V, seed):
    lengths = [3, 9, 1, 14, 6]
    S, N, D = len(lengths), sum(lengths), 19
    h, w, b, y = make_inputs(N, D, V, dtype=torch.bfloat16, logit_scale=4.0, seed=seed)
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    return h, w, b, y, seq, S, N


@needs_native
@needs_bf16_gemms
@pytest.mark.parametrize("V", [1, 7, 17, 1000, 4099])
def test_bf16_gemms_give_fp32_statistics_and_16bit_logit_gradients(V):
    """bf16 inputs on the bf16 GEMMs, against the float64 oracle on the same bf16 inputs: the
    statistics as exact as the fp32 computation (fp32 logits), and dH, dW, db within twice the
    error of a bf16-rounded logit gradient (the GPU bf16 path's bound) plus fp32 rounding."""
    h, w, b, y, seq, S, N = _bf16_case(V, seed=V)
    opts = FusedOptions(temperature=0.7, ignore_index=-100, return_entropy=True, native_matmul="bf16")
    fast = _single_pass(native, h, w, b, y, seq, S, opts, rows=15)
    fp32 = _single_pass(torch_single_pass, h.float(), w.float(), b.float(), y, seq, S, opts, rows=15)
    exact = _single_pass(torch_single_pass, h.double(), w.double(), b.double(), y, seq, S, opts, rows=N)
    _assert_bf16_bound(fast, fp32, exact, h, w, b, y, seq, S, f"bf16 GEMMs V={V}")


@needs_native
@needs_bf16_gemms
def test_bf16_gemms_across_vocabulary_blocks_with_a_late_maximum():
    """The bf16 forward runs the logits by vocabulary blocks of 4096, each row's e relative to its
    first block's max, rescaled when a later block's max is more than 32 above it. Three blocks
    (the last one partial), and a last block whose logits are 3x larger: some rows rescale, some
    not (checked), targets in every block; judged as in the test above."""
    V, D = 2 * 4096 + 1234, 19
    lengths = [3, 9, 1, 14, 6]
    S, N = len(lengths), sum(lengths)
    h, w, b, y = make_inputs(N, D, V, dtype=torch.float64, logit_scale=4.0, seed=11)
    w[8192:] *= 3.0
    y[:6] = torch.tensor([0, 4095, 4096, 8191, 8192, V - 1])
    h, w, b = h.bfloat16(), w.bfloat16(), b.bfloat16()
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    z = (h.double() @ w.double().T + b.double()) / 0.7
    late = z[:, 8192:].amax(1) - z[:, :4096].amax(1)
    assert (late > 32).any() and (late < 32).any(), "the inputs must exercise both sides of the rescale"
    opts = FusedOptions(temperature=0.7, ignore_index=-100, return_entropy=True, native_matmul="bf16")
    fast = _single_pass(native, h, w, b, y, seq, S, opts, rows=15)
    fp32 = _single_pass(torch_single_pass, h.float(), w.float(), b.float(), y, seq, S, opts, rows=15)
    exact = _single_pass(torch_single_pass, h.double(), w.double(), b.double(), y, seq, S, opts, rows=N)
    _assert_bf16_bound(fast, fp32, exact, h, w, b, y, seq, S, "bf16 blocks",
                       floor={"token_entropy": 1e-6 * z.abs().max().item()})


@needs_native
@pytest.mark.parametrize("V", [7, 1000])
def test_bf16_fallback_is_the_fp32_computation_of_the_bf16_inputs(V):
    """native_matmul="fp32" (the path of a CPU without bf16 units or without MKL's symbol):
    every output within the fp32 PyTorch single pass's error on the upcast inputs."""
    h, w, b, y, seq, S, N = _bf16_case(V, seed=V + 1)
    opts = FusedOptions(temperature=0.7, ignore_index=-100, return_entropy=True, native_matmul="fp32")
    fast = _single_pass(native, h, w, b, y, seq, S, opts, rows=15)
    fp32 = _single_pass(torch_single_pass, h.float(), w.float(), b.float(), y, seq, S, opts, rows=15)
    exact = _single_pass(torch_single_pass, h.double(), w.double(), b.double(), y, seq, S, opts, rows=N)
    names = STATISTICS + GRADIENTS
    pick = lambda r: {k: getattr(r, k).double() for k in names}  # noqa: E731
    assert_within_oracle(pick(fast), pick(fp32), pick(exact), torch.float32, f"bf16 fallback V={V}")


@needs_native
def test_bf16_gemm_detection_agrees_with_the_kernel():
    """The extension's own cpuid reading (hardware and OS state) against the flags Linux reports,
    and usable only with a bf16 unit and the symbol."""
    usable, amx, avx512_bf16, symbol, intel, why = native.extension().bf16_gemm_status()
    assert usable == (symbol and (amx or avx512_bf16)), why
    assert native.bf16_gemm_status() == (usable and intel, why)
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    assert avx512_bf16 == ("avx512_bf16" in flags)
    assert amx == ("amx_bf16" in flags and "amx_tile" in flags)


@needs_native
def test_native_matmul_choice_is_explicit(monkeypatch):
    """"fp32" always upcasts; "auto" takes the bf16 GEMMs only where they are usable; "bf16"
    raises where they are not (simulated); other dtypes keep their own precision."""
    assert native.gemm_dtype(torch.bfloat16, "fp32") == torch.float32
    assert native.gemm_dtype(torch.float32, "bf16") == torch.float32
    assert native.gemm_dtype(torch.float16, "auto") == torch.float32
    assert native.gemm_dtype(torch.float64, "auto") == torch.float64
    assert native.gemm_dtype(torch.bfloat16, "auto") == (torch.bfloat16 if BF16_GEMMS_USABLE else torch.float32)
    monkeypatch.setattr(native, "bf16_gemm_status", lambda default=True: (False, "simulated: no AMX"))
    assert native.gemm_dtype(torch.bfloat16, "auto") == torch.float32
    with pytest.raises(RuntimeError, match="native_matmul='bf16'.*simulated: no AMX"):
        native.gemm_dtype(torch.bfloat16, "bf16")
    with pytest.raises(ValueError, match="native_matmul must be one of"):
        from rlsc_kernels.options import check_native_matmul

        check_native_matmul("amx")


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("native_matmul", ["auto", "fp32"])
def test_grad_output_is_applied_in_fp32(dtype, native_matmul):
    """GradScaler's 2^16 (inf in fp16) and a small power of two: the gradients are exactly the
    grad_output = 1 gradients times the scale (power-of-two scaling commutes with the final
    rounding, away from subnormals), finite: no 16-bit value is formed before the upstream
    gradient is applied."""
    h, w, b, y = make_inputs(40, 16, 300, dtype=dtype, logit_scale=3.0, seed=5)
    seq = torch.arange(4).repeat_interleave(10)
    opts = FusedOptions(temperature=0.7, ignore_index=-100, native_matmul=native_matmul)
    grads = {}
    for scale in (1.0, 2.0**16, 2.0**-6):
        hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
        loss, *_ = _loss_single_pass(hh, ww, bb, y, seq, 4, opts)
        loss.backward(torch.tensor(scale, dtype=loss.dtype))
        grads[scale] = [hh.grad, ww.grad, bb.grad]
    for scale in (2.0**16, 2.0**-6):
        for one, scaled, name in zip(grads[1.0], grads[scale], ("dhidden", "dweight", "dbias")):
            assert torch.isfinite(scaled).all(), f"{dtype} x{scale} {name} not finite"
            want = (one.float() * scale).to(dtype)
            tiny = torch.finfo(dtype).tiny  # subnormals round differently at each scale
            normal = (one.float().abs() >= tiny) & (want.float().abs() >= tiny)
            assert torch.equal(scaled[normal], want[normal]), f"{dtype} x{scale} {name}"
            assert ((scaled.float() - want.float()).abs() <= tiny * max(scale, 1.0)).all(), f"{dtype} x{scale} {name}"


def _loss_single_pass(h, w, b, y, seq, S, opts):
    from rlsc_kernels import backends as B
    from rlsc_kernels.single_pass import rlsc_loss_single_pass

    return rlsc_loss_single_pass(h, w, b, y, seq, S, opts=opts, weighting="rlsc", alpha=0.1, reduction="mean",
                                 backend_name="native", two_sweep=B.get("native"), path="single-pass")


# ---- 1 - p without cancellation (issue 16 item 5) ----

@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_two_token_vocabulary_gradient_has_no_cancellation(dtype):
    """Two tokens, every target at 1 - p between 4e-8 and 5e-5 (logit gaps 10-17): the gradient's
    1 - p must not cancel. fp32: dW against float64 within 2x plain fp32 PyTorch's error
    (F.linear + log_softmax + autograd, the issue's bar) and within a few fp32 roundings of dW
    itself (1 - p from a sum that holds the target loses up to 6e-8 absolute: about 1e-4 of dW
    here). bf16: within a 16-bit logit gradient and dW's own bf16 rounding (plain bf16 PyTorch
    is off by 100% here)."""
    gen = torch.Generator().manual_seed(0)
    N = 48
    gap = 10 + 7 * torch.rand(N, generator=gen)
    h = torch.cat([(gap / 2)[:, None], torch.randn(N, 7, generator=gen)], 1)
    w = torch.tensor([[1.0, 0.3, 0.1, 0.2, -0.1, 0.05, 0.0, 0.1], [-1.0, -0.3, 0.1, -0.2, 0.1, 0.0, 0.05, -0.1]])
    h, w = h.to(dtype), w.to(dtype)
    y = torch.zeros(N, dtype=torch.int64)
    seq = torch.arange(4).repeat_interleave(N // 4)

    def plain(hh, ww):
        hh, ww = hh.detach().clone().requires_grad_(), ww.detach().clone().requires_grad_()
        logp = torch.log_softmax(hh @ ww.T, dim=1).gather(1, y[:, None]).squeeze(1)
        L = torch.zeros(4, dtype=logp.dtype).index_add(0, seq, logp)
        (-((torch.exp(L) + 0.1).detach() * L).sum() / 4).backward()
        return ww.grad.double()

    exact = plain(h.double(), w.double())
    scale = exact.abs().max().item()
    err_torch = (plain(h.float(), w.float()) - exact).abs().max().item()
    for native_matmul in ("auto", "fp32"):
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        opts = FusedOptions(temperature=1.0, ignore_index=-100, native_matmul=native_matmul)
        loss, *_ = _loss_single_pass(hh, ww, None, y, seq, 4, opts)
        loss.backward()
        err = (ww.grad.double() - exact).abs().max().item()
        if dtype == torch.float32:
            assert err <= 2 * err_torch, f"{native_matmul}: dW error {err:.3e} > 2 x fp32 PyTorch's {err_torch:.3e}"
            assert err <= 16 * 2.0**-24 * scale, f"{native_matmul}: dW error {err:.3e} of {scale:.3e}: 1 - p cancelled"
        else:
            assert err <= 2.0**-8 * scale, f"{native_matmul}: dW error {err:.3e} of {scale:.3e}"


# ---- invalid target ids with check_values=False (issue 16 item 2) ----

_BAD_IDS_SCRIPT = r"""
import torch, rlsc_kernels as rk
from rlsc_kernels.backends import native
V = 31
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    h = torch.randn(12, 8, generator=gen).to(dtype)
    w = torch.randn(V, 8, generator=gen).to(dtype)
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    for bad in (V, V + 1, 2**40, -1, -5, -2**62):
        y = torch.randint(0, V, (12,), generator=gen)
        y[7] = bad
        out = rk.linear_rlsc_loss(h, w, y, seq_index=seq, backend="native", check_values=False, path="single-pass")
        y[7] = -100
        ref = rk.linear_rlsc_loss(h, w, y, seq_index=seq, backend="native", path="single-pass")
        same = torch.equal(out.loss, ref.loss) and torch.equal(out.seq_logp, ref.seq_logp)
        print("ignored" if same else "DIFFERENT", dtype, bad)
ext = native.extension()
buf = torch.empty(3, V)
for bad in (V, -1, 2**40):
    try:
        ext.chunk_forward(buf, torch.randn(3, 8), torch.randn(V, 8), None, torch.tensor([0, bad, 1]), 1.0, False)
        print("NO ERROR chunk_forward", bad)
    except IndexError:
        print("raised chunk_forward", bad)
print("survived")
"""


@needs_native
def test_out_of_range_target_ids_count_as_ignored_and_never_reach_memory():
    """check_values=False with ids just past V, far past it and negative (not ignore_index): the
    native single pass scores them as ignored (the same loss as with ignore_index there), and the
    C++ kernel handed such an id raises IndexError; the process survives."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _BAD_IDS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the process died (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "survived" and not any(line.startswith(("NO ERROR", "DIFFERENT")) for line in lines), proc.stdout
    assert sum(line.startswith("ignored") for line in lines) == 2 * 6
    assert sum(line.startswith("raised") for line in lines) == 3


@needs_native
def test_native_matmul_keyword_of_linear_rlsc_loss():
    """The public keyword reaches the native backend: "fp32" and the default agree within the
    bf16 GEMMs' bound, a bad value is named, LinearRLSCLoss accepts it."""
    h, w, b, y, seq, S, N = _bf16_case(300, seed=2)
    ref = rk.linear_rlsc_loss(h, w, y, seq_index=seq, bias=b, backend="native", native_matmul="fp32")
    out = rk.LinearRLSCLoss(backend="native", native_matmul="auto")(h, w, y, seq_index=seq, bias=b)
    assert torch.allclose(out.seq_logp, ref.seq_logp, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="native_matmul must be one of"):
        rk.linear_rlsc_loss(h, w, y, seq_index=seq, backend="native", native_matmul="amx")


@needs_native
@needs_bf16_gemms
def test_bf16_gemms_with_sequences_longer_than_a_chunk():
    """A 150-token sequence over 32-row chunks (the driver runs the backward over row ranges of
    the buffer): the same bounds as above, through the public op, bias and ignored tokens."""
    lengths = [150, 9, 40]
    S, N, D, V = len(lengths), sum(lengths), 19, 9001
    h, w, b, y = make_inputs(N, D, V, dtype=torch.bfloat16, logit_scale=4.0, seed=21)
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))

    def run(dt, **kw):
        hh, ww, bb = (t.to(dt).detach().requires_grad_() for t in (h, w, b))
        out = rk.linear_rlsc_loss(hh, ww, y, seq_index=seq, bias=bb, temperature=0.7, backend="native",
                                  path="single-pass", buffer_bytes=V * 4 * 32, **kw)
        out.loss.backward()
        return out, {"dhidden": hh.grad.double(), "dweight": ww.grad.double(), "dbias": bb.grad.double()}

    fast, g_fast = run(torch.bfloat16, native_matmul="bf16")
    fp32, _ = run(torch.float32)
    exact, g_exact = run(torch.float64)
    for name in ("token_logp", "seq_logp"):
        err = (getattr(fast, name).double() - getattr(exact, name)).abs().max().item()
        err32 = (getattr(fp32, name).double() - getattr(exact, name)).abs().max().item()
        assert err <= err32 + TOL[torch.float32] * getattr(exact, name).abs().max().item(), name
    bound16 = _grads_with_16bit_logit_gradient(h, w, b, y, seq, S, 0.7, exact.seq_weight)
    for name in GRADIENTS:
        want = g_exact[name]
        err = (g_fast[name] - want).abs().max().item()
        err16 = (bound16[name] - want).abs().max().item()
        # + the final rounding of the bf16 gradient returned
        limit = 2 * err16 + (TOL[torch.float32] + 2.0**-8) * want.abs().max().item()
        assert err <= limit, f"{name}: error {err:.3e} > 2 x 16-bit-logit-gradient error {err16:.3e} + tol"


@needs_native
@pytest.mark.skipif(not native.bf16_gemm_status(default=False)[0],
                    reason=f"no bf16 GEMM here: {native.bf16_gemm_status(default=False)[1]}")
@pytest.mark.parametrize("M, K, N", [(17, 576, 4099), (1, 19, 7), (0, 5, 3), (3, 0, 5), (5, 8, 0)])
def test_bf16_linear_is_an_fp32_gemm_of_the_bf16_operands(M, K, N):
    """The sampler's head GEMM: fp32 output within fp32 accumulation error of the float64 product
    of the same bf16 operands (the torch bf16 mm, which rounds its output to bf16, is far off)."""
    g = torch.Generator().manual_seed(M + K + N)
    h = (torch.randn(M, K, generator=g) * 3).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    z = native.bf16_linear(h, w)
    exact = h.double() @ w.double().T
    assert z.dtype == torch.float32 and z.shape == (M, N)
    bound = 4 * K * torch.finfo(torch.float32).eps * (h.double().abs() @ w.double().abs().T) + 1e-30
    assert ((z.double() - exact).abs() <= bound).all()
    if M and K and N > 100:
        assert ((h @ w.T).double() - exact).abs().max() > 10 * (z.double() - exact).abs().max()


def test_bf16_linear_declines_what_it_does_not_take():
    h = torch.randn(3, 4)
    assert native.bf16_linear(h, torch.randn(5, 4)) is None                       # fp32
    assert native.bf16_linear(h.bfloat16()[None], torch.randn(5, 4).bfloat16()) is None   # not a matrix
