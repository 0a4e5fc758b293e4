"""Every benchmark script imports: a rename elsewhere (a helper moved, a private name removed)
breaks a script that no other test runs, and the GPU loan that would run it is too short to
find that out."""
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py")
                 if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name):
    importlib.import_module(f"benchmarks.{name}")
