"""Test-suite set-up. Without a CUDA GPU the Triton kernels run in Triton's interpreter on CPU
tensors; TRITON_INTERPRET must be set before the kernels are first imported."""
import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Property tests must not fail at random in CI: under CI=true hypothesis runs derandomised (the
# same examples every run, no example database); every example it ever found becomes an explicit
# regression test (tests/rlsc_kernels/test_regimes.py). Locally the default profile explores.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        _hypothesis_settings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass


def pytest_collection_modifyitems(config, items):
    """gpu tests need CUDA; interpreter tests run the Triton kernels on CPU tensors, which a CUDA
    machine does only with TRITON_INTERPRET=1 set by the caller (tests/rlsc_kernels/test_gpu.py
    covers the compiled kernels there)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(reason="runs Triton on CPU tensors: set TRITON_INTERPRET=1 on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and HAS_CUDA and not interpreting:
            item.add_marker(skip_interp)
