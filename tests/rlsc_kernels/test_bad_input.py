"""Bad input raises ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

import rlsc_kernels as rk

pytestmark = pytest.mark.interpreter


def _ok(N=6, D=8, V=20, dtype=torch.float32):
    return torch.randn(N, D, dtype=dtype), torch.randn(V, D, dtype=dtype), torch.randint(0, V, (N,))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_logprobs_errors(backend):
    h, w, y = _ok()
    call = lambda **kw: rk.linear_logprobs(kw.pop("h", h), kw.pop("w", w), kw.pop("y", y), backend=backend, **kw)  # noqa: E731
    cases = [
        (dict(h=h.numpy()), TypeError, "hidden must be a torch.Tensor"),
        (dict(h=h.long()), TypeError, "hidden must have dtype"),
        (dict(w=w[:, :5]), ValueError, r"weight must have shape \[V, D\] with D = hidden.shape\[-1\] = 8"),
        (dict(w=w.double()), TypeError, "weight dtype torch.float64 differs from hidden dtype"),
        (dict(y=y.float()), TypeError, "targets must have dtype"),
        (dict(y=y[:3]), ValueError, r"targets must have shape \[6\]"),
        (dict(y=torch.tensor([0, 1, 2, 3, 4, 20])), ValueError, r"targets holds ids outside \[0, 20\)"),
        (dict(y=torch.tensor([0, 1, 2, 3, 4, -5])), ValueError, r"targets holds ids outside"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=-1), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature="hot"), TypeError, "temperature must be a float"),
        (dict(bias=torch.zeros(19)), ValueError, r"bias must have shape \[V\] = \[20\]"),
        (dict(filter_eps="fast"), ValueError, "filter_eps must be None, 'auto' or a float"),
        (dict(filter_eps=-1.0), ValueError, "filter_eps must be a finite float >= 0"),
        (dict(h=torch.full((6, 8), float("nan"))), ValueError, "hidden contains NaN or inf"),
        (dict(w=torch.full((20, 8), float("inf"))), ValueError, "weight contains NaN or inf"),
    ]
    for kwargs, exc, message in cases:
        with pytest.raises(exc, match=message):
            call(**kwargs)


def test_unknown_backend():
    h, w, y = _ok()
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.linear_logprobs(h, w, y, backend="cuda")


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter():
    """Triton decides interpreted or compiled once, at the kernels' import (TRITON_INTERPRET then),
    so the refusal is checked in a fresh process without the variable."""
    import os
    import subprocess
    import sys

    code = ("import pytest, torch, rlsc_kernels as rk\n"
            "h, w, y = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))\n"
            "with pytest.raises(ValueError, match=\"backend='triton' needs CUDA tensors\"):\n"
            "    rk.linear_logprobs(h, w, y, backend='triton')\n"
            "print('refused')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr[-2000:]
    h, w, y = _ok()
    with pytest.raises(TypeError, match="float64"):
        rk.linear_logprobs(h.double(), w.double(), y, backend="triton")


@pytest.mark.interpreter
def test_triton_interpret_is_not_read_at_call_time(monkeypatch):
    """Options are explicit; the environment is not read per call. In the interpreter (the test
    set-up sets TRITON_INTERPRET=1 before the kernels load) clearing the variable changes nothing."""
    from rlsc_kernels.backends import triton_interpreting

    h, w, y = _ok()
    before = rk.linear_logprobs(h, w, y, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_interpreting()
    torch.testing.assert_close(rk.linear_logprobs(h, w, y, backend="triton"), before, rtol=0, atol=0)


def test_rlsc_loss_errors():
    h, w, y = _ok()
    mask = torch.ones(2, 3, dtype=torch.bool)
    cases = [
        (dict(weighting="softmax"), ValueError, "weighting must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(alpha=float("inf")), ValueError, "alpha must be a finite float"),
        (dict(weighting=torch.ones(5)), ValueError, r"weighting tensor must have shape \[2\]"),
        (dict(seq_index=torch.tensor([0, 0, 1])), ValueError, r"seq_index must have shape \[6\]"),
        (dict(seq_index=torch.tensor([0, 0, 1, 1, -1, 0])), ValueError, "negative sequence ids"),
        (dict(seq_index=torch.tensor([0, 0, 1, 1, 2, 0]), num_sequences=2), ValueError,
         r"seq_index holds ids outside \[0, num_sequences=2\)"),
        (dict(num_sequences=-1), ValueError, "num_sequences must be None or an int >= 0"),
        (dict(backward="atomic"), ValueError, "backward must be one of"),
        (dict(grad_matmul="torch"), ValueError, "grad_matmul must be one of"),
        (dict(buffer_bytes=0), ValueError, "buffer_bytes must be None or an int > 0"),
        (dict(block_configs=(16, 32)), TypeError, "block_configs must be None or an rlsc_kernels.BlockConfigs"),
        (dict(check_values="no"), TypeError, "check_values must be a bool"),
        (dict(completion_mask=torch.ones(6, dtype=torch.bool)), ValueError, "completion_mask is for the padded form"),
        (dict(completion_mask=mask, seq_index=torch.zeros(6, dtype=torch.long)), ValueError, "not both"),
    ]
    for kwargs, exc, message in cases:
        with pytest.raises(exc, match=message):
            seq = kwargs.pop("seq_index", torch.tensor([0, 0, 0, 1, 1, 1]) if "completion_mask" not in kwargs else None)
            rk.linear_rlsc_loss(h, w, y, seq_index=seq, backend="torch", **kwargs)


def test_padded_form_errors():
    h = torch.randn(2, 3, 8)
    w = torch.randn(20, 8)
    y = torch.randint(0, 20, (2, 3))
    with pytest.raises(ValueError, match=r"completion_mask must have shape \[2, 3\]"):
        rk.linear_rlsc_loss(h, w, y, completion_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="completion_mask must have dtype"):
        rk.linear_rlsc_loss(h, w, y, completion_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="num_sequences is for the packed form"):
        rk.linear_rlsc_loss(h, w, y, num_sequences=2)
    with pytest.raises(ValueError, match=r"\[B, T, D\] \(padded form\) or \[N, D\]"):
        rk.linear_rlsc_loss(h[None], w, y[None])


def test_value_checks_can_be_skipped():
    h, w, y = _ok()
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hidden contains NaN"):
        rk.linear_logprobs(h, w, y, backend="torch")
    out = rk.linear_logprobs(h, w, y, backend="torch", check_values=False)  # the caller vouched for the data
    assert torch.isnan(out[0])


def test_finite_check_has_no_false_alarm_when_the_sum_overflows():
    """Huge but finite inputs overflow the cheap fp32 sum; the exact check must clear them."""
    h = torch.full((6, 8), 3e38)
    w = torch.full((20, 8), 1e-3)
    y = torch.randint(0, 20, (6,))
    assert torch.isfinite(rk.linear_logprobs(h, w, y, backend="reference")).all()
    h[2, 3] = float("-inf")
    with pytest.raises(ValueError, match="hidden contains NaN or inf"):
        rk.linear_logprobs(h, w, y, backend="reference")


def test_device_mismatch_names_the_argument():
    h, w, y = _ok()
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        rk.linear_logprobs(h, w.to("meta"), y)
    with pytest.raises(ValueError, match="targets is on meta but hidden is on cpu"):
        rk.linear_logprobs(h, w, y.to("meta"))
    with pytest.raises(ValueError, match="bias is on meta"):
        rk.linear_logprobs(h, w, y, bias=torch.zeros(20, device="meta"))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_bias_of_another_dtype_or_device_is_refused_on_every_backend(backend):
    h, w, y = _ok()
    for op in (lambda **kw: rk.linear_logprobs(h, w, y, backend=backend, **kw),
               lambda **kw: rk.linear_rlsc_loss(h, w, y, backend=backend, **kw)):
        with pytest.raises(TypeError, match="bias dtype torch.float64 differs from hidden dtype torch.float32"):
            op(bias=torch.zeros(20, dtype=torch.float64))
        with pytest.raises(TypeError, match="bias dtype torch.bfloat16 differs"):
            op(bias=torch.zeros(20, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="bias is on meta but hidden is on cpu"):
            op(bias=torch.zeros(20, device="meta"))


def test_external_weights_with_nan_or_inf_are_refused():
    h, w, y = _ok()
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weighting tensor contains NaN or inf"):
            rk.linear_rlsc_loss(h, w, y, seq_index=seq, weighting=torch.tensor([1.0, bad]), backend="torch")
    with pytest.raises(ValueError, match=r"weighting tensor must have shape \[2\]"):
        rk.linear_rlsc_loss(h, w, y, seq_index=seq, weighting=torch.ones(3), backend="torch", path="two-sweep")
