"""The architecture, enforced: what each package may import, no import cycle, no private name across modules.

| package                                   | may import (of ours)                                          |
|-------------------------------------------|---------------------------------------------------------------|
| verifiers/                                | verifiers/                                                    |
| linearity/                                | linearity/                                                    |
| orchestrator core (config, messages, algorithms, checkpoints, metrics, console) | the core, linearity/, verifiers/ |
| actors/                                   | actors/, the orchestrator core, linearity/, verifiers/        |
| orchestrator/ (the driver), bench/, tests/ | everything                                                   |

Imports inside functions count (a lazy import is still a dependency); imports under `if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "actors", "linearity", "verifiers")
# The orchestrator's leaf modules, shared with the actors: the typed config and messages, the RL algorithms, the
# checkpoint layout (learners write checkpoints the driver reads), metrics and console output.
CORE = {
    "orchestrator.config",
    "orchestrator.messages",
    "orchestrator.algorithms",
    "orchestrator.checkpoints",
    "orchestrator.metrics",
    "orchestrator.console",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST):
    """(imported module, imported names) for every import statement outside `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, []
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                yield child.module, [alias.name for alias in child.names]
            todo.append(child)


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES or module.split(".")[0] == "tests"


def _graph() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(our module it imports, names)], for every module of the packages, bench/ and tests/."""
    files = [p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    graph = {}
    for path in files:
        deps = []
        for module, names in _imports(ast.parse(path.read_text(), str(path))):
            if not _ours(module):
                continue
            if module not in modules:  # `from orchestrator import algorithms` names a module
                deps += [(f"{module}.{n}", []) for n in names if f"{module}.{n}" in modules]
                continue
            deps.append((module, names))
        graph[_module_name(path)] = deps
    return graph


def _allowed(importer: str, imported: str) -> bool:
    package, target = importer.split(".")[0], imported.split(".")[0]
    if package in ("verifiers", "linearity"):
        return target == package
    if importer in CORE:
        return imported in CORE or target in ("linearity", "verifiers")
    if package == "actors":
        return target in ("actors", "linearity", "verifiers") or imported in CORE
    return True


def test_packages_import_only_what_their_layer_allows():
    bad = [
        f"{importer} imports {imported}"
        for importer, deps in _graph().items()
        for imported, _ in deps
        if not _allowed(importer, imported)
    ]
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = [
        f"{importer}: from {imported} import {name}"
        for importer, deps in _graph().items()
        for imported, names in deps
        for name in names
        if name.startswith("_") and imported != importer
    ]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_tests_share_helpers_only_through_tests_helpers():
    bad = [
        f"{importer} imports {imported}"
        for importer, deps in _graph().items()
        if importer.startswith("tests.")
        for imported, _ in deps
        if imported.startswith("tests.") and imported != "tests.helpers"
    ]
    assert not bad, "tests importing other test modules:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: sorted({d for d, _ in deps if d != m}) for m, deps in _graph().items() if not m.startswith("tests")}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in graph.get(module, []):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
