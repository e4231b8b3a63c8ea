"""Output ownership: dynslice deletes, replaces or moves aside only what it can prove it wrote.

The proof is a record dynslice wrote itself, with a unique id, listing the files it wrote by path (relative to a
folder) with their size and SHA-256. A file is *ours* when it is listed and its bytes still match; everything else
is *foreign* and is never touched. Paths are checked resolved: a listed name that is absolute, holds ``..``, is a
symbolic link or resolves outside its folder is foreign.

Two kinds of record:

* a **ledger** (``.dynslice-ledger-<run id>.jsonl``) of a ``run_all.sh`` run: one JSON line per file written under
  the run's folders. :func:`dynslice.store.outputs.atomic_write` appends to it while ``$DYNSLICE_LEDGER`` names it, so
  every record, table, figure and executed notebook of the run (in any process of the run) is listed as written.
* a **manifest** (``.dynslice-owned.json``) of a folder written in one piece (a published reference):
  ``{"dynslice_owned": 1, "id", "created", "kind", "files": {path: {"bytes", "sha256"}}}``.

:func:`remove_owned` deletes the files of a listing that are still ours and then the folders this left empty;
nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

MANIFEST = ".dynslice-owned.json"
LEDGER_PREFIX = ".dynslice-ledger-"
LEDGER_ENV = "DYNSLICE_LEDGER"
#: One listed file: ``(bytes, sha256)``.
Entry = tuple[int, str]


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str | os.PathLike) -> Entry:
    """``(bytes, sha256)`` of a regular file."""
    return os.stat(path).st_size, sha256_file(path)


def new_id() -> str:
    """A unique id for a run, a save or a published folder."""
    return uuid.uuid4().hex


def safe_relative(folder: Path, rel: object) -> Path | None:
    """``folder / rel`` when ``rel`` is a relative name inside ``folder`` (no ``..``, not absolute, no link on the
    way out); ``None`` otherwise."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return None
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or p.parts[:1] == ("~",):
        return None
    target = folder / p
    try:
        if not target.resolve().is_relative_to(folder.resolve()):
            return None
    except (OSError, RuntimeError):
        return None
    return target


def walk_files(folder: Path) -> list[str]:
    """Every non-folder entry under ``folder`` (links included, never followed), as sorted relative paths."""
    out = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        rel_top = Path(top).relative_to(folder)
        for name in files:
            out.append((rel_top / name).as_posix())
        for name in dirs:  # a link to a folder is listed by os.walk among the folders: it is an entry of its own
            if os.path.islink(os.path.join(top, name)):
                out.append((rel_top / name).as_posix())
    return sorted(out)


def is_ours(folder: Path, rel: str, allowed: Iterable[Entry]) -> bool:
    """Whether ``folder/rel`` is a regular file (not a link) inside ``folder`` whose size and hash are among
    ``allowed``."""
    target = safe_relative(folder, rel)
    if target is None:
        return False
    try:
        st = os.lstat(target)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    allowed = list(allowed)
    if not any(size == st.st_size for size, _ in allowed):
        return False
    digest = sha256_file(target)
    return any(size == st.st_size and h == digest for size, h in allowed)


def foreign(folder: Path, listing: Mapping[str, Iterable[Entry]], ignore: Iterable[str] = ()) -> list[str]:
    """Entries under ``folder`` that ``listing`` does not prove ours (sorted relative paths)."""
    skip = set(ignore)
    return [rel for rel in walk_files(folder) if rel not in skip and not is_ours(folder, rel, listing.get(rel, ()))]


def remove_owned(
    folder: Path, listing: Mapping[str, Iterable[Entry]], extra: Iterable[str] = (), *, keep_top: bool = False
) -> list[str]:
    """Delete the files of ``listing`` that are still ours (and the ``extra`` names, e.g. the record itself), then
    every folder under ``folder`` left empty (``folder`` itself too unless ``keep_top``). Returns what was kept
    (foreign entries)."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    for rel in walk_files(folder):
        if rel in listing and is_ours(folder, rel, listing[rel]):
            (folder / rel).unlink()
    for rel in extra:
        target = safe_relative(folder, rel)
        if target is not None and target.is_file() and not target.is_symlink():
            target.unlink()
    for top, _, _ in list(os.walk(folder, topdown=False, followlinks=False)):  # deepest folders first
        if keep_top and Path(top) == folder:
            continue
        try:
            os.rmdir(top)
        except OSError:
            pass  # not empty: something foreign is left in it
    return walk_files(folder) if folder.is_dir() else []


def describe(names: list[str], limit: int = 3) -> str:
    """``a, b, c (+N more)``."""
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, both resolved (links, ``..``)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


# ------------------------------------------------------------------------------------------------------ ledger
def ledger_path(results: Path, run_id: str) -> Path:
    """The ledger of run ``run_id`` in its results folder."""
    return results / f"{LEDGER_PREFIX}{run_id}.jsonl"


@dataclass(frozen=True)
class Ledger:
    """The files a run wrote under its folders (``results`` and ``figures``): ``{root: {rel: [entries]}}``.

    ``guard``: writes under the roots refuse to replace a file the ledger does not list (off for a run that began
    before dynslice kept ledgers, whose earlier files are not listed).
    """

    path: Path
    roots: dict[str, Path]
    guard: bool = True

    @classmethod
    def create(cls, path: Path, roots: Mapping[str, Path], guard: bool = True) -> Ledger:
        """Start a ledger (or reuse the one at ``path``: a resumed run appends)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps(
            {"dynslice_ledger": 1, "guard": guard, "roots": {k: str(Path(v).resolve()) for k, v in roots.items()}}
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return cls.open(path)
        with os.fdopen(fd, "w") as f:
            f.write(header + "\n")
        return cls(path, {k: Path(v).resolve() for k, v in roots.items()}, guard)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Ledger:
        """Read a ledger's header; ``ValueError`` when it is not one."""
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                head = json.loads(f.readline())
            roots = {str(k): Path(v) for k, v in head["roots"].items()}
            guard = bool(head.get("guard", True))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path} is not a dynslice ledger") from None
        return cls(path, roots, guard)

    def locate(self, path: Path) -> tuple[str, str] | None:
        """``(root, rel)`` of ``path`` when it lies under one of the roots (resolved), else ``None``."""
        full = path.parent.resolve() / path.name
        for name, root in self.roots.items():
            if full.is_relative_to(root) and full != root:
                return name, full.relative_to(root).as_posix()
        return None

    def record(self, path: Path) -> None:
        """Append ``path`` (a file just written) when it lies under a root; one line, appended atomically."""
        where = self.locate(path)
        if where is None:
            return
        size, digest = fingerprint(path)
        line = json.dumps({"root": where[0], "path": where[1], "bytes": size, "sha256": digest}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    def listing(self) -> dict[str, dict[str, list[Entry]]]:
        """``{root: {rel: [(bytes, sha256), ...]}}`` of every file recorded (a path written twice has two)."""
        out: dict[str, dict[str, list[Entry]]] = {name: {} for name in self.roots}
        with open(self.path, encoding="utf-8") as f:
            f.readline()
            for line in f:
                try:
                    e = json.loads(line)
                    entry = (int(e["bytes"]), str(e["sha256"]))
                    out[e["root"]].setdefault(str(e["path"]), []).append(entry)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill: what it named is not proven ours
        return out


def active_ledger() -> Ledger | None:
    """The ledger named by ``$DYNSLICE_LEDGER`` (set by run_all.sh for its run), if any."""
    name = os.environ.get(LEDGER_ENV)
    if not name:
        return None
    try:
        return Ledger.open(name)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------- manifest
def make_manifest(folder: Path, kind: str, ignore: Iterable[str] = ()) -> str:
    """The text of a manifest (with a new id) listing every file under ``folder``; the caller writes it to
    ``folder/.dynslice-owned.json``."""
    skip = {MANIFEST, *ignore}
    files = {
        rel: {"bytes": size, "sha256": digest}
        for rel in walk_files(folder)
        if rel not in skip
        for size, digest in [fingerprint(folder / rel)]
    }
    manifest = {
        "dynslice_owned": 1,
        "id": new_id(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kind": kind,
        "files": files,
    }
    return json.dumps(manifest, indent=1) + "\n"


def read_manifest(folder: Path, kind: str | None = None) -> dict[str, list[Entry]] | None:
    """The listing of ``folder``'s manifest (``None`` when there is none or it is not one of dynslice's)."""
    path = folder / MANIFEST
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > (64 << 20):
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(obj, dict) or obj.get("dynslice_owned") != 1 or not isinstance(obj.get("id"), str):
            return None
        if kind is not None and obj.get("kind") != kind:
            return None
        return {str(rel): [(int(e["bytes"]), str(e["sha256"]))] for rel, e in obj["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
