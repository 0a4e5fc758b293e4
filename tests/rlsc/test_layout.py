"""What the trainer takes from the library is its public API: no private name of rlsc_kernels in rlsc/
(import circles are checked for both packages by tests/test_imports.py)."""
from __future__ import annotations

import ast
from pathlib import Path

RLSC = Path(__file__).resolve().parents[2] / "rlsc"


def _imports(path: Path):
    """(rlsc modules imported anywhere in the file, private rlsc_kernels names imported or used)."""
    tree = ast.parse(path.read_text())
    local, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            local.add(node.module.split(".")[0] if node.module else None)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlsc_kernels"):
            private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            private += [node.module for part in node.module.split(".") if part.startswith("_")]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "rk" \
                and node.attr.startswith("_"):
            private.append(f"rk.{node.attr}")
    return local - {None}, private


def test_rlsc_uses_only_public_names_of_rlsc_kernels():
    private = {p.name: _imports(p)[1] for p in RLSC.glob("*.py")}
    assert not any(private.values()), private
