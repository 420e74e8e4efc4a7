"""The import graph has no loops: between modules, or between sub-packages (function-level imports count)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "kprpe").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{module}.{alias.name}" if f"{module}.{alias.name}" in mods else module
                    if target.startswith("kprpe") and target != name:
                        edges[name].add(target)
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name.startswith("kprpe"))
    return edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in list(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_module_imports_itself_back():
    mods = _modules()
    edges = _edges(mods)
    # a package's __init__ re-exports its modules; the modules importing siblings through it is the only
    # allowed way back, so __init__ files are left out of the module-level check
    graph = {a: {b for b in bs if mods.get(b, Path()).name != "__init__.py"} for a, bs in edges.items()}
    assert _cycle(graph) is None


def test_subpackages_form_layers():
    # layers: each sub-package (nn, face, ...) and each top-level module (errors, images, cli, ...)
    graph = defaultdict(set)
    for a, bs in _edges(_modules()).items():
        for b in bs:
            la, lb = a.split(".")[1:2], b.split(".")[1:2]
            if la and lb and la != lb:  # the root package's re-exports are not a layer
                graph[la[0]].add(lb[0])
    assert _cycle(graph) is None, dict(graph)
    assert "face" not in graph["nn"] and "eval" not in graph["face"] and "train" not in graph["eval"]
