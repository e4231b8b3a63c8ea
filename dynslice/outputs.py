"""Output safety: check every output path before any work, and never replace a file dynslice did not write.

Rules (the same for the CLI and the library):

- A JSON output may replace only a previous dynslice record, and only with ``overwrite``.
- A model folder may be written into a missing path or an empty folder; with ``overwrite`` it may also replace a
  previous dynslice model folder that holds nothing but the files dynslice wrote there.
- Saves go through a clearly named temporary folder (``.dynslice-tmp-<name>-<pid>``) that carries an
  ``INCOMPLETE`` marker until it is complete; leftovers of a killed save are cleaned up by the next save.
- Files and folders get the permissions the user's umask gives (``0666``/``0777`` masked), like any other file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".dynslice-tmp-"
OLD_PREFIX = ".dynslice-old-"
INCOMPLETE_MARKER = "DYNSLICE_INCOMPLETE"
SLICED_META = "dynslice.json"

#: Keys by which a JSON object is recognised as a record written by dynslice (run, eval, LR, allocation).
_RECORD_SIGNATURES: tuple[frozenset[str], ...] = (
    frozenset({"record_version", "config"}),
    frozenset({"config", "versions"}),
    frozenset({"metric", "lr", "normalized"}),
    frozenset({"widths", "sp", "sb", "budget"}),
    frozenset({"mode", "peak_host_bytes", "peak_gpu_bytes"}),  # dynslice plan
)


def umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:  # pragma: no cover - not Linux
        pass
    old = os.umask(0o022)  # pragma: no cover
    os.umask(old)  # pragma: no cover
    return old  # pragma: no cover


def file_mode() -> int:
    """Mode of a new file under the current umask (``0666 & ~umask``)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask (``0777 & ~umask``)."""
    return 0o777 & ~umask()


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: a temporary file in the same folder, synced, given umask permissions, renamed.

    ``content`` is text (written as UTF-8), bytes, or a function that writes the file at the path it is given
    (e.g. a safetensors writer). Missing parent folders are created. A reader sees the old file or the new one,
    never a partial one; on any error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if not callable(content):
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        if callable(content):
            content(tmp)
        synced = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(synced)
        finally:
            os.close(synced)
        os.chmod(tmp, file_mode())  # mkstemp makes files owner-only; follow the umask like any other file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_path_text(param: str, path: str | os.PathLike) -> Path:
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{param}: the output path is empty; give a file or folder name")
    p = Path(text).expanduser()
    if p.name in ("", ".", ".."):
        raise ValueError(f"{param}: {text!r} names no file or folder of its own (it ends in {p.name or '/'!r})")
    return p


def _check_parent(param: str, p: Path) -> None:
    """The nearest existing ancestor of ``p`` must be a writable folder (missing folders are created later)."""
    parent = p.parent if str(p.parent) else Path(".")
    anc = parent
    while not anc.exists():
        if anc.is_symlink() or anc == anc.parent:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{param}: {p} cannot be created, because {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{param}: {p} cannot be created, because folder {anc} is not writable")


def is_dynslice_record(path: Path) -> bool:
    """True when ``path`` is a JSON file holding a record written by dynslice."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and any(sig <= obj.keys() for sig in _RECORD_SIGNATURES)


def check_json_out(path: str | os.PathLike, *, overwrite: bool = False, param: str = "out") -> Path:
    """Validate a JSON output path before any work; returns it as a ``Path``.

    Refused: an empty path, a folder, a path under a file, an unwritable folder, and an existing file unless it is
    a previous dynslice record and ``overwrite`` is given.
    """
    p = _check_path_text(param, path)
    if p.is_dir():
        raise ValueError(f"{param}: {p} is a folder; give the path of a JSON file")
    if p.exists() or p.is_symlink():
        if not p.is_file():
            raise ValueError(f"{param}: {p} exists and is not a regular file")
        if not is_dynslice_record(p):
            raise ValueError(f"{param}: {p} exists and is not a dynslice record; refusing to replace it "
                             "(choose another path)")
        if not overwrite:
            raise ValueError(f"{param}: {p} already exists; pass --overwrite to replace this dynslice record")
        if not os.access(p.parent if str(p.parent) else Path("."), os.W_OK | os.X_OK):
            raise ValueError(f"{param}: {p} cannot be replaced, because its folder is not writable")
        return p
    _check_parent(param, p)
    return p


def _sliced_meta(folder: Path) -> dict | None:
    try:
        obj = json.loads((folder / SLICED_META).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


#: Files a dynslice model folder may hold when its ``dynslice.json`` lists none (saves before the list existed).
_MODEL_FILES = frozenset({SLICED_META, "model.safetensors", "config.json", "generation_config.json",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                          "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"})


def foreign_files(folder: Path) -> list[str]:
    """Entries of a dynslice model folder that dynslice did not write there (relative names, sorted)."""
    meta = _sliced_meta(folder) or {}
    listed = meta.get("files")
    allowed = set(listed) | {SLICED_META} if isinstance(listed, list) else set(_MODEL_FILES)
    out = []
    for entry in sorted(folder.rglob("*")):
        rel = entry.relative_to(folder).as_posix()
        if entry.is_dir() and not entry.is_symlink():
            if not any(a.startswith(rel + "/") for a in allowed):
                out.append(rel + "/")
        elif rel not in allowed:
            out.append(rel)
    return [r for r in out if not any(r.startswith(o) for o in out if o.endswith("/") and o != r)]


def check_model_out(path: str | os.PathLike, *, overwrite: bool = False, param: str = "out") -> Path:
    """Validate a model-folder output before any work; returns it as a ``Path``.

    Refused: an empty path, a file, a path under a file, an unwritable parent, a non-empty folder that is not a
    dynslice model, a dynslice model without ``overwrite``, and a dynslice model that holds files dynslice did not
    write (they would be lost).
    """
    p = _check_path_text(param, path)
    if p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
        raise ValueError(f"{param}: {p.name!r} is the name dynslice gives its temporary folders; choose another")
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise ValueError(f"{param}: {p} exists and is a file, not a folder; refusing to replace it")
    if p.is_dir():
        if any(p.iterdir()):
            if not (p / SLICED_META).is_file():
                raise ValueError(f"{param}: {p} is a non-empty folder that is not a dynslice model; refusing to "
                                 "write into it (choose a new or empty folder)")
            if not overwrite:
                raise ValueError(f"{param}: {p} already holds a dynslice model; pass --overwrite to replace it")
            extra = foreign_files(p)
            if extra:
                raise ValueError(f"{param}: {p} holds files dynslice did not write ({', '.join(extra[:3])}"
                                 f"{'...' if len(extra) > 3 else ''}); refusing to replace it")
        if not os.access(p.parent if str(p.parent) else Path("."), os.W_OK | os.X_OK):
            raise ValueError(f"{param}: {p} cannot be replaced, because its parent folder is not writable")
        return p
    _check_parent(param, p)
    return p


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, prefix: str) -> int | None:
    tail = name[len(prefix):].rsplit("-", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None


def clean_stale(target: Path) -> list[Path]:
    """Remove the leftovers of killed saves of ``target`` (temporary folders of dead processes).

    If a save died between moving the old folder aside and moving the new one in, the old folder is put back.
    Returns what was removed.
    """
    parent = target.parent if str(target.parent) else Path(".")
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for prefix in (OLD_PREFIX, TMP_PREFIX):
        for entry in sorted(parent.glob(f"{prefix}{target.name}-*")):
            pid = _owner_pid(entry.name, prefix)
            if pid is None or _pid_alive(pid) or not entry.is_dir():
                continue
            if prefix == OLD_PREFIX and not target.exists():
                entry.rename(target)  # restore the previous model: the new one never arrived
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def temp_folder(target: Path) -> Path:
    """A fresh temporary folder beside ``target``, marked incomplete, with umask permissions."""
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    tmp = parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(mode=dir_mode())
    (tmp / INCOMPLETE_MARKER).write_text("dynslice is writing this folder; if no dynslice runs, delete it\n")
    return tmp


def publish_folder(tmp: Path, target: Path) -> None:
    """Complete ``tmp`` and move it to ``target`` atomically (replacing a previous dynslice model there).

    The caller has checked ``target`` with :func:`check_model_out`. An interruption leaves the old model or the
    new one in place (or, between the two renames, the old one aside for :func:`clean_stale` to restore).
    """
    for entry in tmp.rglob("*"):
        if entry.is_dir():
            os.chmod(entry, dir_mode())
        else:
            os.chmod(entry, file_mode())
    os.chmod(tmp, dir_mode())
    (tmp / INCOMPLETE_MARKER).unlink()
    if target.is_dir() and any(target.iterdir()):
        old = target.parent / f"{OLD_PREFIX}{target.name}-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if target.is_dir():
            target.rmdir()  # empty folder given by the user: replaced by the model folder
        tmp.rename(target)


def looks_incomplete(folder: Path) -> bool:
    """True for a temporary or half-written dynslice save."""
    return folder.name.startswith((TMP_PREFIX, OLD_PREFIX)) or (folder / INCOMPLETE_MARKER).exists()
