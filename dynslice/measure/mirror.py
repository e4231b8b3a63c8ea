"""A local mirror of Hugging Face hub datasets, read through the same ``datasets`` calls as the hub.

Set ``DYNSLICE_HUB_MIRROR=DIR`` and every hub dataset whose repository folder ``DIR/<repo id>`` exists (for example
``DIR/Salesforce/wikitext``, ``DIR/allenai/c4``, ``DIR/cais/mmlu``) is loaded from that folder instead of the hub:
:func:`hub_location` turns the repository id into the folder, and the caller passes it to
``datasets.load_dataset`` with the same ``name``, ``data_files``, ``split`` and ``streaming`` arguments. A folder
holds the repository's files in the hub's own layout and format (parquet or json.gz data files, and the README's
``configs:`` metadata where the repository has named configs); one revision only, the one dynslice reads (for
``ptb``, the files of its ``refs/convert/parquet`` branch). A repository missing from the mirror is loaded from the
hub as usual.

The standard lm-eval tasks read their datasets by repository id from lm-eval's task YAMLs. With a mirror,
:func:`mirror_task_overrides` writes, for every leaf task under the requested names whose ``dataset_path`` is
mirrored, a YAML of the same task name that includes lm-eval's own and changes ``dataset_path`` only; lm-eval's
``TaskManager(include_path=...)`` lets these take precedence over the built-in ones.

Uses: a pre-downloaded copy of the datasets on a machine with no hub, and the paper profile's dry run
(``tests/paper_dryrun.py``), which writes a small mirror in the hub's formats.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dynslice.store.outputs import atomic_write
from dynslice.store.paths import cache_dir

MIRROR_ENV = "DYNSLICE_HUB_MIRROR"


def hub_mirror() -> Path | None:
    """The mirror folder named by ``$DYNSLICE_HUB_MIRROR`` (None when unset or empty); an error when it is not a
    folder."""
    value = os.environ.get(MIRROR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"{MIRROR_ENV}: {value!r} is not a folder; set it to a folder holding <repo id>/ folders")
    return path.resolve()


def hub_location(repo: str) -> str:
    """What to pass to ``datasets.load_dataset`` for hub repository ``repo``: its mirror folder when the mirror
    holds it, else ``repo`` itself."""
    mirror = hub_mirror()
    if mirror is None or not repo or Path(repo).is_absolute():
        return repo
    folder = mirror / repo
    return str(folder) if folder.is_dir() else repo


def mirror_fingerprint(repo: str) -> dict[str, Any] | None:
    """The mirror folder of ``repo`` and a SHA-256 of its files' names, sizes and modification times (None when
    ``repo`` is not mirrored): what cached data read from the mirror depends on."""
    location = hub_location(repo)
    if location == repo:
        return None
    files = sorted(p for p in Path(location).rglob("*") if p.is_file())
    listing = [(p.relative_to(location).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"mirror": location, "files_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}


# ------------------------------------------------------------------------------------------------- lm-eval tasks
def mirror_task_overrides(index: Mapping[str, Any], tasks: Iterable[str]) -> Path | None:
    """Write the task YAMLs that read the mirrored datasets of the lm-eval ``tasks`` (leaf task names, see the
    module notes) into ``cache_dir()/tasks-mirror/<digest>`` and return that folder, for
    ``TaskManager(include_path=...)``.

    ``index`` is lm-eval's task index (:func:`dynslice.measure.lm_tasks.builtin_index`). None when no mirror is set
    or none of ``tasks`` reads a mirrored dataset. Files are written atomically and left untouched when unchanged.
    """
    if hub_mirror() is None:
        return None
    overrides: dict[str, str] = {}
    for name in tasks:
        entry = index[name]
        repo = (entry.cfg or {}).get("dataset_path")
        location = hub_location(repo) if isinstance(repo, str) else repo
        if location == repo:
            continue
        config = {"include": str(Path(entry.yaml_path).resolve()), "task": name, "dataset_path": location}
        overrides[name] = yaml.safe_dump(config, sort_keys=False, width=1000)
    if not overrides:
        return None
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_dir() / "tasks-mirror" / digest
    out.mkdir(parents=True, exist_ok=True)
    for name, text in overrides.items():
        path = out / f"{name}.yaml"
        if not (path.is_file() and path.read_text(encoding="utf-8") == text):
            atomic_write(path, text.encode("utf-8"))
    return out
