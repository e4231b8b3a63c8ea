"""Argument checks, one per kind of value: an integer in a range, a finite real in a range, one of some choices.

Each returns the value as a plain Python ``int``/``float``/``str`` or raises a one-line ``ValueError`` that names
the argument and what is allowed: ``"<name>: <value> is outside <range>"`` (``is not an integer``, ``is not a
finite number``, ``is not one of`` for values of the wrong kind). ``allowed`` replaces the generated range text
where a bound is better said in words (``"0 <= sb <= sp (0.3)"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any, cast

#: Largest sizes any input may give (checked before any allocation): a model's width and depth, samples, tokens.
MAX_HIDDEN = 1 << 18
MAX_LAYERS = 4096
MAX_SAMPLES = 1 << 20
MAX_SEQLEN = 1 << 20
#: Largest magnitude of a score read from a file (LR scores are similarities and distances of order 1).
MAX_SCORE = 1e12


def range_text(
    name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> str:
    """``"low <= name < high"``-style text of an interval (either bound may be missing)."""
    lo_op, hi_op = ("<" if low_open else "<="), ("<" if high_open else "<=")
    if low is not None and high is not None:
        return f"{low} {lo_op} {name} {hi_op} {high}"
    if low is not None:
        return f"{name} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{name} {hi_op} {high}"
    return f"any {name}"


def check_int(
    name: str, value: Any, low: int | None = None, high: int | None = None, *, allowed: str | None = None
) -> int:
    """``value`` as an ``int`` when it is an integer (not a bool) with ``low <= value <= high``."""
    allowed = allowed or range_text(name, low, high)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}: {value!r} is not an integer; allowed: {allowed}")
    v = int(value)  # an Integral equals its int
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name}: {v} is outside {allowed}")
    return v


def check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allowed: str | None = None,
) -> float:
    """``value`` as a ``float`` when it is a finite real number (not a bool) in the interval from ``low`` to
    ``high`` (each end closed unless ``low_open``/``high_open``)."""
    allowed = allowed or range_text(name, low, high, low_open=low_open, high_open=high_open)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name}: {value!r} is not a finite number; allowed: {allowed}")
    v = cast(float, value)  # a Real compares with floats as itself; typeshed's numbers.Real does not say so
    below = low is not None and (v <= low if low_open else v < low)
    above = high is not None and (v >= high if high_open else v > high)
    if below or above:
        raise ValueError(f"{name}: {value} is outside {allowed}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value
