"""Output safety: check every output path before any work, and never replace a file dynslice did not write.

Rules (the same for the CLI and the library):

- A JSON output may replace only a previous dynslice record, and only with ``overwrite``. What the check saw is
  remembered (:func:`claim`): at publish time the file must still be absent (it is then created exclusively) or
  hold the same bytes; a file that appeared or changed meanwhile is kept and the command refuses.
- A model folder may be written into a missing path or an empty folder; with ``overwrite`` it may also replace a
  previous dynslice model folder whose ``dynslice.json`` lists every file in it with its hash (a save id and
  ``file_hashes``; see :mod:`dynslice.store.ownership`) and whose files still match.
- Saves assemble in a private temporary folder ``.dynslice-tmp-<id>`` whose ``DYNSLICE_INCOMPLETE`` marker names
  the target, the process and the id; the previous model is moved aside to ``.dynslice-old-<id>`` with the same
  id. Leftovers are matched by exact id and target, never by a name prefix.
- Files and folders get the permissions the user's umask gives (``0666``/``0777`` masked), like any other file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from dynslice.store import ownership

TMP_PREFIX = ".dynslice-tmp-"
OLD_PREFIX = ".dynslice-old-"
INIT_PREFIX = ".dynslice-init-"
INCOMPLETE_MARKER = "DYNSLICE_INCOMPLETE"
OLD_MARKER = "DYNSLICE_OLD"
SLICED_META = "dynslice.json"
#: Longest file name (bytes) an output may have: the file system's limit less room for the temporary name.
NAME_SLACK = 16
PATH_MAX = 4000

#: Keys by which a JSON object is recognised as a record written by dynslice (run, eval, LR, allocation).
_RECORD_SIGNATURES: tuple[frozenset[str], ...] = (
    frozenset({"record_version", "config"}),
    frozenset({"config", "versions"}),
    frozenset({"metric", "lr", "normalized"}),
    frozenset({"widths", "sp", "sb", "budget"}),
    frozenset({"mode", "peak_host_bytes", "peak_gpu_bytes"}),  # dynslice plan
)
#: What each checked JSON output held when it was checked: ``None`` (absent) or ``(bytes, sha256)``.
_CLAIMS: dict[str, ownership.Entry | None] = {}


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


def _key(path: Path) -> str:
    return os.path.join(os.path.realpath(path.parent), path.name)


def claim(path: str | os.PathLike) -> None:
    """Remember what ``path`` holds now; :func:`atomic_write` replaces it only if it still holds that."""
    path = Path(path)
    _CLAIMS[_key(path)] = ownership.fingerprint(path) if path.is_file() else None


def release_claims() -> None:
    """Forget every :func:`claim` (the end of a command)."""
    _CLAIMS.clear()


def _guard(path: Path, tmp: Path) -> str:
    """How to put ``tmp`` at ``path``: ``"create"`` (exclusively) or ``"replace"``; refuses a file that is not
    what the output check saw, or (during a run_all.sh run) a file under the run's folders the run did not write."""
    key = _key(path)
    if key in _CLAIMS:
        expected = _CLAIMS[key]
        if expected is None:
            return "create"
        if not path.is_file() or path.is_symlink() or ownership.fingerprint(path) != expected:
            raise ValueError(
                f"out: {path} changed while dynslice was working (another process wrote it?); kept "
                "it, and refusing to replace it"
            )
        return "replace"
    ledger = ownership.active_ledger()
    if ledger is not None and ledger.guard and os.path.lexists(path):
        where = ledger.locate(path)
        if where is not None and not ownership.is_ours(
            ledger.roots[where[0]], where[1], ledger.listing()[where[0]].get(where[1], ())
        ):
            raise ValueError(
                f"{where[0]}: {path} exists and was not written by this run; refusing to replace it (move it away)"
            )
    return "replace"


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: a temporary file in the same folder, synced, given umask permissions, renamed.

    ``content`` is text (written as UTF-8), bytes, or a function that writes the file at the path it is given
    (e.g. a safetensors writer). Missing parent folders are created. A reader sees the old file or the new one,
    never a partial one; on any error the temporary file is removed. A path checked by :func:`check_json_out` is
    created exclusively (or replaced only while it holds what the check saw); inside a run_all.sh run the file is
    listed in the run's ledger (:mod:`dynslice.store.ownership`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    fd, name = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
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
        if _guard(path, tmp) == "create":
            try:
                os.link(tmp, path)  # fails if anything appeared at path meanwhile
            except FileExistsError:
                raise ValueError(
                    f"out: {path} appeared while dynslice was working (another process wrote it?); "
                    "kept it, and refusing to replace it"
                ) from None
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if _key(path) in _CLAIMS:
        claim(path)  # what is there now is ours: a second write of the same output replaces it
    ledger = ownership.active_ledger()
    if ledger is not None:
        ledger.record(path)
    return path


def _name_max(folder: Path) -> int:
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        return os.pathconf(anc, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_path_text(param: str, path: str | os.PathLike) -> Path:
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{param}: the output path is empty; give a file or folder name")
    if text == "-":
        raise ValueError(f"{param}: '-' (standard output) is not supported; give a file or folder name")
    if "\x00" in text:
        raise ValueError(f"{param}: the output path holds a NUL character")
    p = Path(text).expanduser()
    if p.name in ("", ".", ".."):
        raise ValueError(f"{param}: {text!r} names no file or folder of its own (it ends in {p.name or '/'!r})")
    limit = _name_max(p.parent if str(p.parent) else Path(".")) - NAME_SLACK
    for part in p.parts:
        if len(part.encode()) > limit:
            raise ValueError(
                f"{param}: a name in the path is {len(part.encode())} bytes long; at most {limit} bytes are allowed"
            )
    if len(os.fsencode(os.path.abspath(p))) > PATH_MAX:
        raise ValueError(f"{param}: the path is longer than {PATH_MAX} bytes")
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
    """True when ``path`` is a regular JSON file (at most 64 MiB) holding a record written by dynslice."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > (64 << 20):
            return False
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and any(sig <= obj.keys() for sig in _RECORD_SIGNATURES)


def holds_record(path: str | os.PathLike | None, config: dict) -> bool:
    """True when ``path`` is a dynslice record whose ``config`` equals ``config`` (that run is done)."""
    if path is None or not str(path).strip():
        return False
    path = Path(path)
    if not is_dynslice_record(path):
        return False
    return json.loads(path.read_text()).get("config") == config


def _link_text(p: Path) -> str:
    try:
        return f"{p} is a symbolic link (to {os.readlink(p)})"
    except OSError:
        return f"{p} is a symbolic link"


def check_json_out(path: str | os.PathLike, *, overwrite: bool = False, param: str = "out") -> Path:
    """Validate a JSON output path before any work; returns it as a ``Path`` (and :func:`claim` s it).

    Refused: an empty path or ``-``, a name too long for the file system, a folder, a symbolic link, a path under
    a file, an unwritable folder, and an existing file unless it is a previous dynslice record and ``overwrite``
    is given.
    """
    p = _check_path_text(param, path)
    if p.is_symlink():
        raise ValueError(f"{param}: {_link_text(p)}; refusing to replace it (give the file's own path)")
    if p.is_dir():
        raise ValueError(f"{param}: {p} is a folder; give the path of a JSON file")
    if p.exists():
        if not p.is_file():
            raise ValueError(f"{param}: {p} exists and is not a regular file")
        if not is_dynslice_record(p):
            raise ValueError(
                f"{param}: {p} exists and is not a dynslice record; refusing to replace it (choose another path)"
            )
        if not overwrite:
            raise ValueError(f"{param}: {p} already exists; pass --overwrite to replace this dynslice record")
        if not os.access(p.parent if str(p.parent) else Path("."), os.W_OK | os.X_OK):
            raise ValueError(f"{param}: {p} cannot be replaced, because its folder is not writable")
        claim(p)
        return p
    _check_parent(param, p)
    claim(p)
    return p


# ------------------------------------------------------------------------------------------------ model folders
def _sliced_meta(folder: Path) -> dict | None:
    meta_path = folder / SLICED_META
    try:
        if meta_path.is_symlink() or not meta_path.is_file() or meta_path.stat().st_size > (16 << 20):
            return None
        obj = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def model_listing(folder: Path) -> dict[str, list[ownership.Entry]] | None:
    """The files a dynslice save wrote in ``folder`` (``dynslice.json``'s ``file_hashes``), or ``None`` when its
    ``dynslice.json`` is not a save record with a save id and a hash of every file."""
    meta = _sliced_meta(folder)
    if meta is None or not isinstance(meta.get("save_id"), str) or not isinstance(meta.get("file_hashes"), dict):
        return None
    out: dict[str, list[ownership.Entry]] = {}
    for rel, e in meta["file_hashes"].items():
        if not isinstance(e, dict) or not isinstance(e.get("bytes"), int) or not isinstance(e.get("sha256"), str):
            return None
        out[rel] = [(e["bytes"], e["sha256"])]
    return out


def foreign_files(folder: Path) -> list[str]:
    """Entries of a model folder that dynslice cannot prove it wrote there: not listed with a matching hash in
    ``dynslice.json`` (every entry, when ``dynslice.json`` lists none)."""
    listing = model_listing(folder)
    if listing is None:
        return ownership.walk_files(folder)
    return ownership.foreign(folder, listing, ignore=(SLICED_META,))


def _model_refusal(param: str, p: Path, overwrite: bool) -> str | None:
    """Why the non-empty folder ``p`` may not be replaced by a model (``None``: it may)."""
    meta = _sliced_meta(p)
    if meta is None or "widths" not in meta:
        return (
            f"{param}: {p} is a non-empty folder that is not a dynslice model; refusing to write into it "
            "(choose a new or empty folder)"
        )
    if model_listing(p) is None:
        return (
            f"{param}: {p} was saved by an older dynslice that did not record its files' hashes, so it cannot "
            "prove what it wrote there; delete it yourself or choose another folder"
        )
    if not overwrite:
        return f"{param}: {p} already holds a dynslice model; pass --overwrite to replace it"
    extra = foreign_files(p)
    if extra:
        return (
            f"{param}: {p} holds files dynslice did not write or that changed since ({ownership.describe(extra)});"
            " refusing to replace it"
        )
    return None


def check_model_out(path: str | os.PathLike, *, overwrite: bool = False, param: str = "out") -> Path:
    """Validate a model-folder output before any work; returns it as a ``Path``.

    Refused: an empty path, a file, a symbolic link, a path under a file, an unwritable parent, a non-empty folder
    that is not a dynslice model, a dynslice model without ``overwrite``, a model saved without file hashes, and
    a model holding files dynslice did not write or that changed (they would be lost).
    """
    p = _check_path_text(param, path)
    if p.name.startswith((TMP_PREFIX, OLD_PREFIX, INIT_PREFIX)):
        raise ValueError(f"{param}: {p.name!r} is the name dynslice gives its temporary folders; choose another")
    if p.is_symlink():
        raise ValueError(f"{param}: {_link_text(p)}; give the folder's own path")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{param}: {p} exists and is a file, not a folder; refusing to replace it")
    if p.is_dir():
        if any(p.iterdir()):
            why = _model_refusal(param, p, overwrite)
            if why:
                raise ValueError(why)
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


_ID = re.compile(r"[0-9a-f]{32}")


def _marker(folder: Path, name: str, prefix: str) -> dict | None:
    """The marker ``name`` in ``folder`` when it is one dynslice wrote for this folder (its id is the folder's)."""
    ident = folder.name[len(prefix) :]
    if not folder.name.startswith(prefix) or not _ID.fullmatch(ident) or folder.is_symlink():
        return None
    try:
        obj = json.loads((folder / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if (
        not isinstance(obj, dict)
        or obj.get("id") != ident
        or not isinstance(obj.get("target"), str)
        or not isinstance(obj.get("pid"), int)
    ):
        return None
    return obj


def clean_stale(target: Path) -> list[Path]:
    """Remove the leftovers of killed saves of ``target``: its temporary folders of dead processes, matched by
    the exact target name and id in their markers. If a save died after moving the old model aside and before
    moving the new one in, the old one is put back. Returns what was removed."""
    parent = target.parent if str(target.parent) else Path(".")
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        for prefix, name in (
            (INIT_PREFIX, INCOMPLETE_MARKER),
            (TMP_PREFIX, INCOMPLETE_MARKER),
            (OLD_PREFIX, OLD_MARKER),
        ):
            mark = _marker(entry, name, prefix)
            if mark is None or mark["target"] != target.name or _pid_alive(mark["pid"]):
                continue
            if prefix == OLD_PREFIX:
                if not os.path.lexists(target):
                    (entry / OLD_MARKER).unlink()
                    entry.rename(target)  # the new model never arrived: the previous one comes back
                else:
                    ownership.remove_owned(entry, model_listing(entry) or {}, extra=(SLICED_META, OLD_MARKER))
                continue
            if prefix == TMP_PREFIX:
                old = parent / f"{OLD_PREFIX}{mark['id']}"
                if old.is_dir() and not os.path.lexists(target) and model_listing(old) is not None:
                    (old / OLD_MARKER).unlink(missing_ok=True)
                    old.rename(target)
            shutil.rmtree(entry, ignore_errors=True)  # a folder of ours, named by its unique id
            removed.append(entry)
    return removed


def temp_folder(target: Path) -> Path:
    """A fresh private folder beside ``target`` (``.dynslice-tmp-<id>``), marked incomplete with the target's name,
    this process and the id, with umask permissions. It appears under its name only once the marker is in it."""
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    ident = ownership.new_id()
    init = parent / f"{INIT_PREFIX}{ident}"
    init.mkdir(mode=dir_mode())
    mark = json.dumps({"target": target.name, "pid": os.getpid(), "id": ident})
    (init / INCOMPLETE_MARKER).write_text(mark + "\n")
    tmp = parent / f"{TMP_PREFIX}{ident}"
    init.rename(tmp)
    return tmp


def _keep_new(tmp: Path, target: Path) -> Path:
    """Give a finished model that could not be moved into place a visible name beside ``target``."""
    kept = target.parent / f"{target.name[:200]}.new-{tmp.name[-8:]}"
    tmp.rename(kept)
    return kept


def _refuse_race(tmp: Path, target: Path, what: str) -> None:
    kept = _keep_new(tmp, target)
    raise ValueError(f"out: {target} {what} while dynslice was working; kept it, and the new model is at {kept}")


def publish_folder(tmp: Path, target: Path) -> None:
    """Complete ``tmp`` and move it to ``target`` (replacing a previous dynslice model there).

    ``target`` must still be absent, empty, or a model dynslice can prove it wrote (:func:`model_listing`), checked
    again after it was moved aside; otherwise it is left (or put back) in place, the new model is kept beside it,
    and ``ValueError`` says where. Of the previous model only the files it listed are deleted.
    """
    for entry in tmp.rglob("*"):
        os.chmod(entry, dir_mode() if entry.is_dir() else file_mode())
    os.chmod(tmp, dir_mode())
    ident = tmp.name[len(TMP_PREFIX) :]
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        (tmp / INCOMPLETE_MARKER).unlink()
        _refuse_race(tmp, target, "appeared as a file or link")
    if target.is_dir() and any(target.iterdir()):
        if _model_refusal("out", target, True):
            (tmp / INCOMPLETE_MARKER).unlink()
            _refuse_race(tmp, target, "holds files dynslice did not write (they appeared)")
        old = target.parent / f"{OLD_PREFIX}{ident}"
        target.rename(old)
        (old / OLD_MARKER).write_text(json.dumps({"target": target.name, "pid": os.getpid(), "id": ident}) + "\n")
        listing = model_listing(old)
        if listing is None or ownership.foreign(old, listing, ignore=(SLICED_META, OLD_MARKER)):
            (old / OLD_MARKER).unlink()
            if not os.path.lexists(target):
                old.rename(target)
            (tmp / INCOMPLETE_MARKER).unlink()
            _refuse_race(tmp, target, "changed")
        (tmp / INCOMPLETE_MARKER).unlink()
        try:
            os.rename(tmp, target)
        except OSError:  # something new at target: put nothing back over it
            (old / OLD_MARKER).unlink()
            kept = _keep_new(tmp, target)
            raise ValueError(
                f"out: {target} appeared while dynslice was working; kept it, the previous model is "
                f"at {old} and the new one at {kept}"
            ) from None
        ownership.remove_owned(old, listing, extra=(SLICED_META, OLD_MARKER))
        return
    (tmp / INCOMPLETE_MARKER).unlink()
    try:
        os.rename(tmp, target)  # onto nothing, or onto an empty folder (replaced atomically)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            _refuse_race(tmp, target, "filled up")
        raise


def looks_incomplete(folder: Path) -> bool:
    """True for a temporary or half-written dynslice save."""
    return folder.name.startswith((TMP_PREFIX, OLD_PREFIX, INIT_PREFIX)) or (folder / INCOMPLETE_MARKER).exists()


def regular_file(param: str, path: str | os.PathLike, max_bytes: int) -> Path:
    """``path`` when it is a regular file of at most ``max_bytes``; refuses devices, FIFOs, folders, huge files."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{param}: {p} does not exist") from None
    except OSError as e:
        raise ValueError(f"{param}: {p} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{param}: {p} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{param}: {p} is not a regular file (a device, FIFO or socket); give a file")
    if st.st_size > max_bytes:
        raise ValueError(f"{param}: {p} is {st.st_size} bytes; at most {max_bytes} bytes are allowed")
    return p
