"""The package's layering: groups by purpose whose imports only point down, a core that stands alone, and no
import cycle.

Every ``import`` statement counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dynslice"
#: Third-party packages the core may import: torch, numpy for the allocator's arithmetic, tqdm for progress bars,
#: triton for the GPU kernel (imported only when CUDA is there).
CORE_THIRD_PARTY = {"torch", "numpy", "tqdm", "triton"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved, ``from x import y`` as x.y too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _internal_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}


def test_the_core_imports_only_torch_and_the_standard_library():
    """``dynslice.core`` imports the standard library, torch (numpy, tqdm, triton) and itself; nothing else."""
    bad = {}
    for name, path in _modules().items():
        if not name.startswith("dynslice.core"):
            continue
        for imp in _imports(name, path):
            top = imp.split(".")[0]
            if imp.startswith("dynslice.core") or imp == "__future__" or top in sys.stdlib_module_names:
                continue
            if top in CORE_THIRD_PARTY:
                continue
            bad.setdefault(name, set()).add(imp)
    # "dynslice" alone (``from dynslice import x``) would reach the experiment side too.
    assert not bad, f"core modules import outside the core: {bad}"


#: The groups of the package, lowest first, and which groups each may import (besides itself). Imports only
#: point down; publish and scale sit side by side (neither imports the other); the face (the CLI) may import all.
GROUPS: dict[str, set[str]] = {
    "core": set(),
    "store": {"core"},
    "measure": {"core", "store"},
    "experiment": {"core", "store", "measure"},
    "publish": {"core", "store", "measure", "experiment"},
    "scale": {"core", "store", "measure", "experiment"},
    "face": {"core", "store", "measure", "experiment", "publish", "scale"},
}
#: Top-level modules and the group they belong to; everything else lives in a sub-package named for its group.
TOP_LEVEL = {"dynslice": None, "dynslice.cli": "face", "dynslice.__main__": "face", "dynslice.measured": None}
#: Experiment modules that load and run models: publishing reads their records and never imports them.
RUNNERS = {
    "dynslice.experiment.pipeline",
    "dynslice.experiment.sweep",
    "dynslice.experiment.ablations",
    "dynslice.experiment.frontier",
}


def group_of(module: str) -> str | None:
    """The group of a dynslice module (``None`` for the package namespaces and data folders)."""
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    group = module.split(".")[1]
    assert group in GROUPS, f"{module} is in no group: move it into one of {sorted(GROUPS)}"
    return group


def test_every_module_sits_in_a_group():
    names = set(_modules())
    assert {group_of(m) for m in names} - {None} == set(GROUPS), "every group holds modules"
    loose = {m for m in names if m.count(".") == 1 and m.split(".")[1] not in GROUPS} - set(TOP_LEVEL)
    assert not loose, f"only the CLI stays at the top level: {sorted(loose)}"


def test_imports_only_point_down():
    """Each group imports only the groups below it (``GROUPS``); publishing and scaling never import each other."""
    bad = {}
    for module, deps in _internal_graph().items():
        mine = group_of(module)
        if mine is None:
            continue
        for dep in deps:
            theirs = group_of(dep)
            if theirs is not None and theirs != mine and theirs not in GROUPS[mine]:
                bad.setdefault(f"{module} ({mine})", []).append(f"{dep} ({theirs})")
    assert not bad, f"imports that point up or sideways: {bad}"


def test_publishing_reads_records_and_runs_nothing():
    graph = _internal_graph()
    bad = {m: sorted(d & RUNNERS) for m, d in graph.items() if group_of(m) == "publish" and d & RUNNERS}
    assert not bad, f"publish modules import a runner: {bad}"


def test_the_layering_test_can_fail():
    """The rules above do reject an upward import (so their passing says something)."""
    assert "experiment" not in GROUPS["store"] and "publish" not in GROUPS["scale"]
    assert group_of("dynslice.experiment.sweep") == "experiment" and group_of("dynslice.cli") == "face"
    # The experiment side does use the core (otherwise the rules would say nothing).
    graph = _internal_graph()
    assert any(d.startswith("dynslice.core") for m, deps in graph.items() if group_of(m) == "experiment" for d in deps)


def _private_imports(path: Path) -> list[str]:
    """``from dynslice.x import _name`` and ``module._name(...)`` reaching into another dynslice module."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dynslice"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.module}.{alias.name}")
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dynslice"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id].split(".")[-1] in {p.stem for p in PACKAGE.rglob("*.py")} | {"dynslice"}
        ):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_crosses_modules():
    """A name starting with ``_`` is private to its module: no other module of the package imports it."""
    bad = {m: _private_imports(p) for m, p in _modules().items()}
    assert not {m: v for m, v in bad.items() if v}, {m: v for m, v in bad.items() if v}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    # The package's __init__ files are namespaces; an edge into "dynslice" itself is the version string only.
    spaces = {"dynslice"} | {f"dynslice.{g}" for g in GROUPS}
    graph = {m: {d for d in deps if d not in spaces} for m, deps in _internal_graph().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, None),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycle(graph) == expected
