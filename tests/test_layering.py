"""The package's layering: the algorithm core stands alone, and no module imports itself back.

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


def test_the_experiment_side_depends_on_the_core_never_the_reverse():
    graph = _internal_graph()
    upward = {
        m: sorted(d for d in deps if not d.startswith("dynslice.core") and d != "dynslice")
        for m, deps in graph.items()
        if m.startswith("dynslice.core")
    }
    assert not any(upward.values()), upward
    # The experiment side does use the core (otherwise this test would say nothing).
    assert any(
        d.startswith("dynslice.core") for m, deps in graph.items() if not m.startswith("dynslice.core") for d in deps
    )


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
    graph = {m: {d for d in deps if d not in ("dynslice", "dynslice.core")} for m, deps in _internal_graph().items()}
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
