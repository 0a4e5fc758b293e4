"""The first minutes of a fresh clone: the set-up script says what it does, stage by stage, and
nothing of ours warns (pyproject's license form, torch without numpy)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup_env.sh"


def test_setup_script_parses_and_announces_every_stage_in_order():
    subprocess.run(["bash", "-n", str(SETUP)], check=True)
    text = SETUP.read_text()
    total = int(re.search(r"^STAGES=(\d+)$", text, re.M).group(1))
    announced = [int(n) for n in re.findall(r'^\s*stage (\d+) "', text, re.M)]
    assert sorted(set(announced)) == list(range(1, total + 1)), announced
    assert "extension" in text.lower() and "native" in text  # the long compile is announced
    assert ".venv/bin/rlsc" in text.replace("$VENV", ".venv") and "activate" in text
    # every pip call goes through quiet (its output into the log, shown on failure)
    pip_lines = [line for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert pip_lines and all(line.lstrip().startswith("quiet ") for line in pip_lines), pip_lines


def test_pyproject_uses_the_spdx_license_and_declares_numpy_and_tqdm():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # the table form is deprecated by setuptools
    assert "setuptools>=77" in project["build-system"]["requires"]  # the first to read the SPDX string
    assert '"setuptools>=77"' in SETUP.read_text()
    deps = " ".join(project["project"]["dependencies"])
    assert "numpy" in deps and "tqdm" in deps
    # numpy is installed together with torch, before the extension build imports torch
    text = SETUP.read_text()
    assert text.index("numpy") < text.index("--no-build-isolation -e")


def test_torch_finds_numpy():
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.zeros(2).numpy().sum())"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Failed to initialize NumPy" not in out.stderr, out.stderr[-1000:]


def test_make_demo_and_test_say_where_rlsc_is():
    make = (ROOT / "Makefile").read_text()
    for target in ("demo:", "test:"):
        block = make.split(target, 1)[1].split("\n\n", 1)[0]
        assert "$(VENV)/bin/rlsc" in block and "activate" in block, target
