"""The package's import structure: no cycles between seal's modules, and no imports hidden in functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "seal"
OPTIONAL = {"vllm"}  # may be missing: imported where used


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""]


def seal_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """seal modules imported at module level (`from seal.generate import X` counts as seal.generate, or
    seal.generate.X when X is a module)."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # if TYPE_CHECKING: ... does not run
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in imported(node):
                if name.startswith("seal"):
                    out.add(name)
                    if isinstance(node, ast.ImportFrom):
                        out.update(f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known)
    return out & known


def test_no_import_cycles():
    trees = modules()
    graph = {name: seal_imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    for name in list(graph):  # importing seal.a.b runs seal.a's __init__ first
        for dep in list(graph[name]):
            parent = dep.rsplit(".", 1)[0]
            if parent in graph and parent != "seal" and not (name + ".").startswith(parent + "."):
                graph[name].add(parent)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_imports_are_at_module_level():
    """Only optional packages may be imported inside a function (where they are needed)."""
    hidden = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        top = {n.split(".")[0] for n in imported(inner)}
                        if top - OPTIONAL:
                            hidden.append(f"{name}.{node.name}: {', '.join(sorted(top))}")
    assert not hidden, hidden


def test_the_check_finds_a_cycle(tmp_path, monkeypatch):
    """The cycle check is not vacuous: two modules importing each other are reported."""
    pkg = tmp_path / "seal"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from seal.b import x\n")
    (pkg / "b.py").write_text("from seal.a import y\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "seal.a -> seal.b -> seal.a" in str(e)
    else:
        raise AssertionError("the cycle was not found")
