"""Atomic JSON files: a reader never sees a half-written result."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from dynslice.outputs import atomic_write


def _clean(obj: Any) -> Any:
    """Make ``obj`` JSON-safe: tuples to lists, NaN/inf floats to None, numpy/torch scalars to Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`dynslice.outputs.atomic_write`)."""
    return atomic_write(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with an error that names the file when it is not valid JSON."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a JSON file")
    try:
        return json.loads(path.read_text(), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text (JSON) file ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); was it truncated?") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _reject_constant(name: str) -> Any:
    """``NaN``/``Infinity`` are not JSON; Python's reader accepts them unless told otherwise."""
    raise ValueError(f"{name} is not a JSON number (scores and widths must be finite)")
