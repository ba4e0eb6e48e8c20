"""The package's floors, measured from its imports: the lower floors import no feature package,
no two files import each other round a circle, and imports sit at the heads of files.

Read from the source with `ast`, nothing imported, so a violation is reported as the file and
line that makes it (docs/layout.md draws the floors)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"

GROUND = {
    "workbench.config",
    "workbench.errors",
    "workbench.paths",
    "workbench.data",
    "workbench.metrics",
    "workbench.step_options",
    "workbench.sampling_params",
    "workbench.lean_imports",
}
LOWER_PACKAGES = ("workbench.models", "workbench.modalities")
FEATURES = (
    "workbench.compress",
    "workbench.engine",
    "workbench.reasoning",
    "workbench.serve",
    "workbench.ui",
    "workbench.bench",
    "workbench.inspect",
    "workbench.export",
    "workbench.harness",
    "workbench.session",
)

DEFERRED_LIMIT = 47
"""Imports of workbench modules inside function bodies: 95 before the ground floor existed; the
ones left defer a face above the importer (Session.export) or keep a command's start-up light."""


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    deferred: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(base: str, name: str | None) -> str:
    """`from base import name` names the submodule base.name when there is one, else base."""
    if name and f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    return base


def _imports() -> list[Import]:
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deferred_nodes = {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [_resolve(base, alias.name) for alias in node.names]
            else:
                continue
            for target in targets:
                if target == "workbench" or target.startswith("workbench."):
                    found.append(Import(module, target, node.lineno, id(node) in deferred_nodes))
    return found


IMPORTS = _imports()


def _in(module: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _where(imp: Import) -> str:
    return f"{MODULES[imp.importer].relative_to(PACKAGE.parent)}:{imp.line} imports {imp.target}"


def test_the_ground_floor_exists():
    missing = sorted(m for m in GROUND if m not in MODULES)
    assert not missing, f"ground-floor modules missing: {missing}"


@pytest.mark.parametrize("floor", ["ground", "models", "modalities"])
def test_lower_floors_import_no_feature_package(floor):
    lower = GROUND if floor == "ground" else {f"workbench.{floor}"}
    wrong = [_where(i) for i in IMPORTS if _in(i.importer, lower) and _in(i.target, FEATURES)]
    assert not wrong, f"the {floor} floor must not import a feature package:\n  " + "\n  ".join(wrong)


def test_the_ground_imports_only_the_ground():
    wrong = [_where(i) for i in IMPORTS if i.importer in GROUND and i.target not in GROUND]
    assert not wrong, "a ground-floor module imports from above it:\n  " + "\n  ".join(wrong)


def test_models_import_nothing_above_them():
    wrong = [
        _where(i)
        for i in IMPORTS
        if _in(i.importer, ("workbench.models",)) and not (i.target in GROUND or _in(i.target, ("workbench.models",)))
    ]
    assert not wrong, "workbench/models imports from above it:\n  " + "\n  ".join(wrong)


def test_no_file_circle():
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target != imp.importer and imp.target != "workbench":
            edges.setdefault(imp.importer, set()).add(imp.target)
    # A package __init__ that re-exports its own modules is not a circle with them.
    for module, targets in edges.items():
        edges[module] = {t for t in targets if not (MODULES[t].name == "__init__.py" and module.startswith(t + "."))}
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "files that import each other round a circle:\n  " + "\n  ".join(circles)


def test_imports_sit_at_the_head_of_files():
    deferred = [_where(i) for i in IMPORTS if i.deferred]
    assert len(deferred) <= DEFERRED_LIMIT, (
        f"{len(deferred)} imports of workbench modules inside functions (at most {DEFERRED_LIMIT}); move new ones "
        "to the file's head, deferring only a face above the importer or a command's start-up:\n  "
        + "\n  ".join(deferred)
    )


def test_the_reader_finds_imports_at_both_levels():
    """The rules above are only as good as the reader: it must see head and deferred imports."""
    assert any(i.importer == "workbench.session" and i.target == "workbench.engine" for i in IMPORTS)
    assert any(i.deferred for i in IMPORTS), "the deferred-import reader found none; it is broken"
