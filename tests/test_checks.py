"""The shared argument checks: accepted values come back as plain Python values, bad ones get a one-line error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynslice.core.checks import check_choice, check_int, check_real, range_text


def test_range_text() -> None:
    assert range_text("n", 1) == "n >= 1"
    assert range_text("n", 0, low_open=True) == "n > 0"
    assert range_text("n", high=9) == "n <= 9"
    assert range_text("sp", 0, 1, high_open=True) == "0 <= sp < 1"
    assert range_text("x", 0, 1, low_open=True) == "0 < x <= 1"
    assert range_text("x") == "any x"


def test_check_int_accepts_integers_in_range() -> None:
    assert check_int("n", 3, 1, 3) == 3
    out = check_int("n", np.int64(7), 1)
    assert out == 7 and type(out) is int
    assert check_int("seed", -5) == -5  # no bounds: any integer


@pytest.mark.parametrize(
    "value, low, high, match",
    [
        (0, 1, None, r"^n: 0 is outside n >= 1$"),
        (5, 1, 4, r"^n: 5 is outside 1 <= n <= 4$"),
        (np.int64(9), 1, 4, r"^n: 9 is outside 1 <= n <= 4$"),
        (2.0, 1, None, r"^n: 2.0 is not an integer; allowed: n >= 1$"),
        (True, 0, None, r"^n: True is not an integer; allowed: n >= 0$"),
        ("3", 1, None, r"^n: '3' is not an integer; allowed: n >= 1$"),
        (None, 1, None, r"^n: None is not an integer"),
    ],
)
def test_check_int_rejects(value, low, high, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_int("n", value, low, high)


def test_check_int_allowed_text_replaces_the_range() -> None:
    with pytest.raises(ValueError, match=r"^seed: -1 is outside 0 <= seed < 2\*\*63$"):
        check_int("seed", -1, 0, 2**63 - 1, allowed="0 <= seed < 2**63")


def test_check_real_accepts_finite_numbers_in_range() -> None:
    assert check_real("sp", 0, 0, 1, high_open=True) == 0.0
    out = check_real("sp", np.float32(0.5), 0, 1)
    assert out == 0.5 and type(out) is float
    assert check_real("sb", 0.3, 0, 0.3) == 0.3  # closed ends include the bound


@pytest.mark.parametrize(
    "value, kwargs, match",
    [
        (1.0, dict(low=0, high=1, high_open=True), r"^x: 1.0 is outside 0 <= x < 1$"),
        (-0.1, dict(low=0, high=1), r"^x: -0.1 is outside 0 <= x <= 1$"),
        (0, dict(low=0, low_open=True), r"^x: 0 is outside x > 0$"),
        (math.nan, dict(low=0), r"^x: nan is not a finite number; allowed: x >= 0$"),
        (math.inf, dict(), r"^x: inf is not a finite number"),
        (False, dict(), r"^x: False is not a finite number"),
        ("0.1", dict(), r"^x: '0.1' is not a finite number"),
        (0.4, dict(low=0, high=0.3, allowed="0 <= x <= sp (0.3)"), r"^x: 0.4 is outside 0 <= x <= sp \(0.3\)$"),
    ],
)
def test_check_real_rejects(value, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_real("x", value, **kwargs)


def test_check_choice() -> None:
    assert check_choice("mode", "on", ("on", "off")) == "on"
    assert check_choice("mode", "b", iter(["a", "b"])) == "b"
    with pytest.raises(ValueError, match=r"^mode: 'auto' is not one of on, off$"):
        check_choice("mode", "auto", ("on", "off"))
    with pytest.raises(ValueError, match=r"^mode: None is not one of on, off$"):
        check_choice("mode", None, ("on", "off"))
