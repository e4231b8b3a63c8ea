"""Atomic JSON files: a reader never sees a half-written result."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from dynslice.store.outputs import atomic_write


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
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`dynslice.store.outputs.atomic_write`)."""
    return atomic_write(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


#: Largest JSON file read by default.
MAX_JSON_BYTES = 256 << 20


def parse_json(text: str, where: str) -> Any:
    """Parse JSON text (NaN/Infinity refused, numbers limited to 100 digits and to the float range); errors name
    ``where``."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); was it truncated?") from None
    except RecursionError:
        raise ValueError(f"{where} nests lists or objects too deeply") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file (a regular file of at most ``max_bytes``), with an error that names the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a JSON file")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file (a device, FIFO or socket); give a JSON file")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{path} is {size} bytes; at most {max_bytes} bytes are allowed")
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text (JSON) file ({e.reason})") from None
    return parse_json(text, str(path))


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 100:
        raise ValueError(f"the number {text[:12]}... has {len(text)} digits; at most 100 are allowed")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 100:
        raise ValueError(f"the number {text[:12]}... has {len(text)} characters; at most 100 are allowed")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is too large for a float")
    return value


def _reject_constant(name: str) -> Any:
    """``NaN``/``Infinity`` are not JSON; Python's reader accepts them unless told otherwise."""
    raise ValueError(f"{name} is not a JSON number (scores and widths must be finite)")
