"""Reading what runs wrote: LR records (``dynslice lr``'s JSON, or a hand-written list of scores), widths files
(``dynslice allocate``'s JSON, or a list) and folders of run records. Validation happens here, once, so that the
allocator and the tables receive clean values."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, cast

from dynslice.core.allocate import ORIENTATION, redundancy_scores
from dynslice.core.checks import MAX_HIDDEN, MAX_LAYERS, MAX_SCORE, check_choice
from dynslice.store.jsonio import read_json

#: Largest LR or widths file read (4096 layers of scores take well under 1 MiB).
MAX_LR_BYTES = 4 << 20


@dataclass(frozen=True)
class LRInput:
    """An LR input made ready for :func:`~dynslice.core.allocate.allocate`: redundancy-oriented scores plus what
    the file says."""

    redundancy: tuple[float, ...]
    metric: str
    hidden: int | None = None
    model: str | None = None


def lr_input(obj: Any, metric: str | None = None, *, source: str = "lr") -> LRInput:
    """Validate a parsed LR record (``dynslice lr``'s JSON, ``{"lr": [...], "metric": ...}`` or a bare list).

    ``metric`` states the metric of a file that does not; a file that states one must agree with it. ``source``
    names the file in errors.
    """
    if metric is not None:
        check_choice("metric", metric, tuple(ORIENTATION))
    if isinstance(obj, list):
        obj = {"lr": obj}
    if isinstance(obj, dict) and "lr" not in obj and "normalized" in obj and "metric" not in obj:
        obj = {**obj, "lr": obj["normalized"], "metric": "redundancy"}  # an LR record's normalized vector
    if not isinstance(obj, dict):
        raise ValueError(f"lr: {source} must hold a list of scores or an object with an 'lr' list")
    if "lr" not in obj:
        if "widths" in obj:
            raise ValueError(f"lr: {source} holds widths (an allocation), not LR scores; pass it as --widths")
        raise ValueError(f"lr: {source} has no 'lr' list of scores")
    scores = obj["lr"]
    if not isinstance(scores, list) or not scores:
        raise ValueError(f"lr: {source} field 'lr' must be a non-empty list of numbers")
    if len(scores) > MAX_LAYERS:
        raise ValueError(f"lr: {source} has {len(scores)} scores; at most {MAX_LAYERS} layers are allowed")
    for i, v in enumerate(scores):
        if v is None or isinstance(v, bool) or not isinstance(v, Real):
            raise ValueError(f"lr: {source} entry lr[{i}] = {v!r} is not a number (NaN is written as null)")
        if not math.isfinite(v):
            raise ValueError(f"lr: {source} entry lr[{i}] = {v!r} is not finite")
        if abs(cast(float, v)) > MAX_SCORE:  # a Real compares with floats; typeshed's numbers.Real does not say so
            raise ValueError(f"lr: {source} entry lr[{i}] = {v!r} is outside -{MAX_SCORE:g} <= lr <= {MAX_SCORE:g}")
    stated = obj.get("metric")
    if stated is not None and (not isinstance(stated, str) or stated not in ORIENTATION):
        raise ValueError(f"lr: {source} field metric = {stated!r} is not one of {', '.join(ORIENTATION)}")
    if stated is None and metric is None:
        raise ValueError(
            f'lr: {source} states no metric; add "metric" ({", ".join(ORIENTATION)}) to the file or pass --lr-metric'
        )
    if stated is not None and metric is not None and stated != metric:
        raise ValueError(f"lr: {source} states metric {stated!r} but --lr-metric says {metric!r}")
    hidden = obj.get("hidden")
    if hidden is not None and (
        isinstance(hidden, bool) or not isinstance(hidden, Integral) or not 1 <= int(hidden) <= MAX_HIDDEN
    ):
        raise ValueError(f"lr: {source} field hidden = {hidden!r} must be an integer in 1..{MAX_HIDDEN}")
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"lr: {source} field model = {model!r} must be a string")
    chosen = cast(str, stated or metric)  # one of them is given (checked above)
    hidden_int = None if hidden is None else int(hidden)
    return LRInput(tuple(redundancy_scores(scores, chosen).tolist()), chosen, hidden_int, model)


def read_lr(path: str | os.PathLike, metric: str | None = None) -> LRInput:
    """:func:`lr_input` of an LR JSON file."""
    return lr_input(read_json(path, max_bytes=MAX_LR_BYTES), metric, source=str(path))


def load_lr(path: str | os.PathLike, metric: str | None = None) -> list[float]:
    """Redundancy-oriented, normalised scores (high = redundant) of an LR JSON file, ready for ``allocate``."""
    return list(read_lr(path, metric).redundancy)


def load_records(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run record (``*.json``) under ``runs_dir``, sorted by path; each gets its ``"path"``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ValueError(f"runs_dir: {runs_dir} is not a folder of run records")
    out = []
    for path in sorted(runs_dir.rglob("*.json")):
        rec = read_json(path)
        if not isinstance(rec, dict) or "config" not in rec or "ppl" not in rec:
            raise ValueError(f"runs_dir: {path} is not a run record (no 'config'/'ppl')")
        out.append({**rec, "path": str(path)})
    return out


def read_widths(spec: str) -> list[int]:
    """Widths given as a JSON list, or a file holding one (bare, or under ``"widths"`` as ``dynslice allocate``
    writes it); each an integer in 1..MAX_HIDDEN. Only their count and range are checked here, not the model."""

    text = spec.strip()
    if text.startswith("["):
        if len(text) > 1 << 20:
            raise ValueError(f"widths: the --widths list is {len(text)} characters; at most {1 << 20} are allowed")
        try:
            obj = json.loads(text, parse_constant=lambda c: float(c))
        except RecursionError:
            raise ValueError("widths: the --widths list nests too deeply") from None
        except ValueError as e:
            raise ValueError(f"widths: {text[:60]!r} is not a JSON list of integers ({e})") from None
        where = "the --widths list"
    else:
        obj = read_json(spec, max_bytes=MAX_LR_BYTES)
        where = spec
    if isinstance(obj, dict) and "widths" not in obj and "lr" in obj:
        raise ValueError(f"widths: {where} holds LR scores, not widths; pass it as --lr")
    widths = obj.get("widths") if isinstance(obj, dict) else obj
    if not isinstance(widths, list) or not widths:
        raise ValueError(f"widths: {where} holds no non-empty 'widths' list")
    if len(widths) > MAX_LAYERS:
        raise ValueError(f"widths: {where} has {len(widths)} widths; at most {MAX_LAYERS} layers are allowed")
    for i, w in enumerate(widths):
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_HIDDEN:
            raise ValueError(f"widths[{i}]: {w!r} in {where} is not an integer in 1..{MAX_HIDDEN}")
    return widths
