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
