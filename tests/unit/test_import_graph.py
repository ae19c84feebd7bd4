"""The package's import graph, read from the source (ast, nothing imported): no cycle between modules, and
Snakemake's API imported only under front/.

An edge is every ``import`` / ``from ... import`` of a package module, at module level or inside a function
(a lazy import is still an arrow); imports under ``if TYPE_CHECKING:`` are annotations only and are left out.
``from package import name`` points at the submodule when ``name`` is one, else at the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "distributed_downloader"
ROOT = Path(__file__).resolve().parents[2] / "workflow_scripts"


def _modules() -> dict[str, Path]:
    modules = {}
    for file in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> package modules it imports, module -> every top-level name it imports)."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    external: dict[str, set[str]] = {name: set() for name in modules}
    for name, file in modules.items():
        is_package = file.name == "__init__.py"
        for node in _imports(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _absolute(name, is_package, node)
                targets = [f"{source}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else source for t in targets]
            for target in targets:
                external[name].add(target.split(".")[0])
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges[name].add(target)
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    edges, _ = import_graph()
    assert f"{PACKAGE}.engine.lane" in edges[f"{PACKAGE}.engine.worker"]
    assert f"{PACKAGE}.inputs.columns" in edges[f"{PACKAGE}.inputs.gbif"]
    assert f"{PACKAGE}.front.api" in edges[PACKAGE]  # a lazy import inside a function counts
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules() -> None:
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_only_front_imports_snakemake() -> None:
    _, external = import_graph()
    importers = sorted(name for name, names in external.items() if "snakemake" in names)
    assert importers, "no module imports snakemake: the test reads nothing"
    assert [name for name in importers if not name.startswith(f"{PACKAGE}.front.")] == []


def _part(module: str) -> str:
    """The part a module belongs to: its subpackage (``plan``, ``net``...) or a top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_parts_depend_one_way() -> None:
    """Between parts (subpackages and top-level modules) the arrows point one way too. A package's
    ``__init__`` is left out: it may re-export a public entry point of front/ (the original's
    ``distributed_downloader.apply_tools`` and ``distributed_downloader.tools.apply_tools``)."""
    edges, _ = import_graph()
    modules = _modules()
    parts: dict[str, set[str]] = {}
    for source, targets in edges.items():
        parts.setdefault(_part(source), set())
        if modules[source].name == "__init__.py":
            continue
        for target in targets:
            if _part(target) != _part(source):
                parts[_part(source)].add(_part(target))
                parts.setdefault(_part(target), set())
    assert f"{PACKAGE}.plan" in parts[f"{PACKAGE}.engine"]
    assert cycles(parts) == []


def test_every_light_rule_has_its_stage() -> None:
    """Each rule that runs run_stage.py is a key of stages.STAGES, and the function it calls bears its name."""
    import re

    from distributed_downloader import stages

    rules = ROOT.parent / "rules"
    found = set()
    for smk in rules.glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", smk.read_text(), flags=re.M):
            if "run_stage.py" in body:
                found.add(name)
    assert found == set(stages.STAGES)
    for rule in found:
        assert callable(getattr(stages, rule)), rule
        assert rule in stages.STAGES[rule].__code__.co_names, f"STAGES[{rule!r}] does not call {rule}()"
