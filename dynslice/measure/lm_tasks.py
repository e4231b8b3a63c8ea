"""Finding lm-eval's tasks: its built-in task index, scanned once per process, and a task manager that indexes
only the folders defining the requested tasks (plus dynslice's offline tasks and the hub mirror's overrides).

Scanning all of lm-eval's task YAMLs takes seconds (about 15 s on 2 busy cores for lm-eval 0.4); a sweep runs
lm-eval once per zero-shot run, so :func:`builtin_index` keeps the scan for the process and :func:`task_manager`
re-indexes only the few folders the requested tasks, groups and tags are defined in.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dynslice.measure.mirror import mirror_task_overrides


@functools.cache
def builtin_index() -> Mapping[str, Any]:
    """lm-eval's index of its built-in tasks, groups and tags (``TaskManager().task_index``), read-only; scanned
    on the first call of the process."""
    from lm_eval.tasks import TaskManager

    return MappingProxyType(dict(TaskManager().task_index))


def expand(index: Mapping[str, Any], names: Iterable[str]) -> tuple[list[str], list[Path]]:
    """The leaf task names under ``names`` (groups and tags expanded, in order) and the folders of the YAML files
    that define every task and group met on the way (none inside another)."""
    leaves: list[str] = []
    folders: set[Path] = set()
    todo, seen = list(names), set()
    while todo:
        name = todo.pop(0)
        entry = index.get(name)
        if name in seen or entry is None:
            continue
        seen.add(name)
        if entry.yaml_path is not None:
            folders.add(Path(entry.yaml_path).resolve().parent)
        kind = entry.kind.name
        if kind == "GROUP":
            children = (entry.cfg or {}).get("task", [])
            for child in children if isinstance(children, list) else [children]:
                todo.append(child.get("task") if isinstance(child, Mapping) else child)
        elif kind == "TAG":
            todo.extend(sorted(entry.tags))
        else:
            leaves.append(name)
    roots = sorted(f for f in folders if not any(o != f and f.is_relative_to(o) for o in folders))
    return leaves, roots


def task_manager(standard: Sequence[str], include: Sequence[str | Path] = ()):
    """An ``lm_eval.tasks.TaskManager`` that knows the built-in tasks ``standard`` (names of tasks, groups or tags)
    and the task folders ``include``; with ``$DYNSLICE_HUB_MIRROR`` set, the standard tasks whose datasets the
    mirror holds read them from it (:func:`dynslice.measure.mirror.mirror_task_overrides`)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include]
    if standard:
        index = builtin_index()
        leaves, folders = expand(index, standard)
        overrides = mirror_task_overrides(index, leaves)
        paths = [str(f) for f in folders] + paths + ([str(overrides)] if overrides is not None else [])
    return TaskManager(include_path=paths or None, include_defaults=False)
