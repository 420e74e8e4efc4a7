"""The import graph follows docs/architecture.md's layer table (read from the page, so the two cannot drift),
has no loops, and keeps argparse in the command-line package.

Every import counts: module level, inside functions (lazy imports), ``importlib.import_module`` /
``importlib.util.find_spec`` calls with a constant name, and the module names a package loads on first use
(``_EXPORTS`` in its ``__init__``, ``COMMAND_MODULES`` in the CLI).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
LAZY_NAME_TABLES = ("_EXPORTS", "COMMAND_MODULES")  # module names loaded later by importlib
# Benchmark scripts run as `python -m kprpe.bench.<name>` with their own options (docs/performance.md).
ARGPARSE_SCRIPTS = {
    "kprpe.bench.kernels",
    "kprpe.bench.embed_memory",
    "kprpe.bench.index",
    "kprpe.bench.partial_fc",
    "kprpe.bench.vector_db",
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported kprpe module (or package)
    lazy: bool  # inside a function, or loaded by name later
    line: int


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "kprpe").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _absolute(name: str, package: str) -> str:
    """``..face.align`` seen from ``package`` -> ``kprpe.face.align``."""
    level = len(name) - len(name.lstrip("."))
    if not level:
        return name
    base = package.split(".")[: len(package.split(".")) - level + 1]
    rest = name[level:]
    return ".".join(base + ([rest] if rest else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, name: str, package: str, mods: dict[str, Path]) -> None:
        self.name, self.package, self.mods = name, package, mods
        self.depth = 0  # > 0 inside a function body
        self.edges: list[Edge] = []

    def _add(self, target: str, node: ast.AST, lazy: bool = False) -> None:
        if target.startswith("kprpe") and target != self.name:
            self.edges.append(Edge(self.name, target, lazy or self.depth > 0, node.lineno))

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = _absolute("." * node.level + (node.module or ""), self.package)
        for alias in node.names:
            full = f"{module}.{alias.name}"
            self._add(full if full in self.mods else module, node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called in ("import_module", "find_spec") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self._add(_absolute(first.value, self.package), node)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and t.id in LAZY_NAME_TABLES for t in node.targets):
            for const in ast.walk(node.value):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    if const.value.startswith(("kprpe.", ".")):
                        self._add(_absolute(const.value, self.package), const, lazy=True)
        self.generic_visit(node)


def _edges(mods: dict[str, Path]) -> list[Edge]:
    edges = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        collector = _Collector(name, package, mods)
        collector.visit(ast.parse(path.read_text()))
        edges += collector.edges
    return edges


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # the root package's re-exports are not a layer


def _layer_table() -> dict[str, tuple[set[str], set[str]]]:
    """docs/architecture.md's table: layer -> (may import, inside functions only)."""
    text = ARCHITECTURE.read_text()
    header = "| layer | owns | may import | inside functions only |"
    assert header in text, f"{ARCHITECTURE} lost its layer table header {header!r}"
    rows = {}
    for line in text[text.index(header) :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 4, f"layer table row has {len(cells)} cells: {line}"
        (name,) = re.findall(r"`([\w.]+?)/?`", cells[0])
        rows[name.removesuffix(".py")] = tuple(set(re.findall(r"`(\w+)`", cell)) for cell in cells[2:])
        if cells[2] == "everything above":
            rows[name] = (set(rows), set())
    return rows


def test_every_layer_is_in_the_table_and_every_named_layer_exists_or_is_planned():
    table = _layer_table()
    layers = {_layer(m) for m in _modules()} - {None, "__main__"}
    assert layers - set(table) == set(), "packages or modules missing from docs/architecture.md's table"
    named = {n for may, lazy in table.values() for n in may | lazy}
    assert named - set(table) == set(), "the table allows imports of layers it does not list"


def test_imports_follow_the_layer_table():
    table = _layer_table()
    wrong = []
    for edge in _edges(_modules()):
        source, target = _layer(edge.source), _layer(edge.target)
        if source is None or target is None or source == target:
            continue
        if edge.source.endswith("__main__"):  # entry points sit above every layer
            continue
        may, lazy_only = table[source]
        if target in may or (edge.lazy and target in lazy_only):
            continue
        how = "inside a function" if edge.lazy else "at module level"
        wrong.append(f"{edge.source}:{edge.line} imports {edge.target} {how}")
    wrong = sorted(set(wrong))  # `from x import a, b` is one import
    assert not wrong, "imports the layer table of docs/architecture.md does not allow:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_and_importlib_imports(tmp_path):
    # the graph must not miss the imports a layer rule is most often broken with
    source = (
        "import importlib\n"
        "def f():\n"
        "    from ..face import align\n"
        "    importlib.import_module('kprpe.train.loop')\n"
        "_EXPORTS = {'x': '..gallery.index'}\n"
    )
    collector = _Collector("kprpe.eval.example", "kprpe.eval", {})
    collector.visit(ast.parse(source))
    found = {(e.target, e.lazy) for e in collector.edges}
    assert found == {("kprpe.face", True), ("kprpe.train.loop", True), ("kprpe.gallery.index", True)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
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
    # a package's __init__ re-exports its modules; the modules importing siblings through it is the only
    # allowed way back, so __init__ files are left out of the module-level check
    graph = defaultdict(set)
    for edge in _edges(mods):
        if not edge.lazy and mods.get(edge.target, Path()).name != "__init__.py":
            graph[edge.source].add(edge.target)
    assert _cycle(graph) is None


def test_layers_form_no_loop():
    graph = defaultdict(set)
    for edge in _edges(_modules()):
        source, target = _layer(edge.source), _layer(edge.target)
        if source and target and source != target and not edge.source.endswith("__main__"):
            graph[source].add(target)
    assert _cycle(graph) is None, dict(graph)


def test_argparse_lives_in_the_command_line_package():
    users = []
    for name, path in _modules().items():
        if _layer(name) == "cli" or name.endswith("__main__") or name in ARGPARSE_SCRIPTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                users.append(name)
            elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
                users.append(name)
    assert not users, f"library modules that parse command lines (move it to kprpe.cli): {users}"
