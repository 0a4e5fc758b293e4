"""The house rules of docs/design.md ("Layout"), read from the source with `ast` (nothing is imported):
no import circle inside rlsc_kernels or rlsc, nothing in rlsc_kernels imports rlsc, the kernels are
the ground floor, and the commit of a recorded result comes from one helper.

Every import counts, at module level or inside a function (a lazy import is still a dependency).
A package's __init__ that only re-exports (no def or class) adds no edge of its own: importing
`pkg.sub` runs `pkg/__init__.py` anyway, and its re-exports are the package's public face."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlsc_kernels", "rlsc")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_reexport_hub(path: Path, tree: ast.Module) -> bool:
    return path.name == "__init__.py" and not any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of rlsc_kernels / rlsc that `name` imports (relative imports resolved;
    `from pkg import sub` is an edge to the submodule `pkg.sub` where that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # a compiled submodule (rlsc_kernels._native) is not a source file: no edge
                out.add(sub if sub in modules or alias.name.startswith("_native") else target)
    edges = {m for m in out if m.split(".")[0] in PACKAGES and m != name}
    if _is_reexport_hub(path, tree):
        edges = {m for m in edges if not m.startswith(name + ".")}
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in imports_of(name, path, modules) if m in modules} for name, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_circle_finder_finds_circles():
    """The test below cannot pass by construction: a made-up graph with two circles is caught."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "f"}, "f": set()}
    assert import_circles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve():
    modules = _modules()
    graph = import_graph()
    assert "rlsc_kernels.kernels.configs" in graph["rlsc_kernels.backends.triton_sweeps"]
    assert "rlsc_kernels.options" in graph["rlsc_kernels.kernels.configs"]
    assert len(graph) == len(modules) and "rlsc.cli" in graph


def test_no_import_circle_inside_rlsc_kernels_or_rlsc():
    circles = import_circles(import_graph())
    assert not circles, "import circles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in circles)


def test_rlsc_kernels_never_imports_rlsc():
    modules = _modules()
    offenders = {name: sorted(m for m in imports_of(name, path, modules) if m.split(".")[0] == "rlsc")
                 for name, path in modules.items() if name.split(".")[0] == "rlsc_kernels"}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"the library imports the trainer: {offenders}"


def test_kernels_are_the_ground_floor():
    """rlsc_kernels/kernels/ imports nothing of the package but itself and options.py (plain data)."""
    graph = import_graph()
    allowed = ("rlsc_kernels.kernels", "rlsc_kernels.options")
    offenders = {name: sorted(m for m in deps if not m.startswith(allowed))
                 for name, deps in graph.items() if name.startswith("rlsc_kernels.kernels")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"kernels/ reaches up: {offenders}"


@pytest.mark.parametrize("folder", ["benchmarks", "rlsc", "rlsc_kernels"])
def test_one_git_commit_helper(folder):
    """`git rev-parse` is run in one place (rlsc/provenance.py); scripts import git_commit from it."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path == ROOT / "rlsc" / "provenance.py":
            continue
        assert "rev-parse" not in path.read_text(), f"{path.relative_to(ROOT)} runs git itself; use rlsc.provenance.git_commit"


def test_git_commit(tmp_path, monkeypatch):
    from rlsc.provenance import git_commit

    monkeypatch.delenv("RLSC_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"  # not a repository
    here = git_commit()
    assert here == "unknown" or all(c in "0123456789abcdef" for c in here)
    monkeypatch.setenv("RLSC_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
