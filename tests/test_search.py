"""Budgeted SB search: exact on unimodal objectives when the budget allows, never over budget, deterministic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynslice.core.allocate import sb_grid
from dynslice.core.search import SBSearch, best_sb_key, default_budget, evals_needed, find_best_sb

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)
GRIDS = [(0.3, 0.02), (0.3, 0.01), (0.5, 0.02), (0.5, 0.01), (0.2, 0.02), (0.1, 0.02), (0.04, 0.02)]


class Counting:
    """An objective defined by one value per grid index, which records every call."""

    def __init__(self, grid: list[float], values: list[float]) -> None:
        self.lookup = dict(zip(grid, values, strict=True))
        self.calls: list[float] = []

    def __call__(self, sb: float) -> float:
        self.calls.append(sb)
        return self.lookup[sb]


@st.composite
def unimodal(draw, n: int) -> list[float]:
    """A strictly unimodal sequence of n values with its minimum at a random index."""
    m = draw(st.integers(0, n - 1))
    steps = draw(st.lists(st.floats(0.01, 10), min_size=n, max_size=n))
    base = draw(st.floats(-5, 5))
    return [base + sum(steps[i:m]) if i < m else base + sum(steps[m:i]) for i in range(n)]


def fib_capacity(k: int) -> int:
    """Points whose minimum k evaluations can always find (Kiefer): F(k+2) - 1."""
    a, b = 1, 1  # F(1), F(2)
    for _ in range(k):
        a, b = b, a + b
    return b - 1


def test_evals_needed_is_fibonacci() -> None:
    for n in range(1, 200):
        k = evals_needed(n)
        assert fib_capacity(k) >= n and (k == 1 or fib_capacity(k - 1) < n)
    assert [evals_needed(n) for n in (2, 4, 7, 12, 16, 20, 21, 31, 51)] == [2, 3, 4, 5, 6, 6, 7, 7, 8]


def test_default_budget_is_a_quarter() -> None:
    assert [default_budget(n) for n in (1, 2, 5, 16, 26, 31, 51)] == [1, 2, 2, 4, 7, 8, 13]


@SETTINGS
@given(st.sampled_from(GRIDS), st.data())
def test_exact_on_unimodal_with_enough_budget(grid_spec, data) -> None:
    sp, step = grid_spec
    grid = sb_grid(sp, step)
    values = data.draw(unimodal(len(grid)))
    obj = Counting(grid, values)
    res = find_best_sb(obj, sp, step=step, max_evals=evals_needed(len(grid)))
    assert res.best_sb == grid[int(np.argmin(values))] and res.best_value == min(values)
    assert res.n_evals == len(obj.calls) <= evals_needed(len(grid))


@SETTINGS
@given(st.sampled_from([(0.3, 0.01), (0.5, 0.02), (0.5, 0.01)]), st.data())
def test_exact_on_unimodal_within_default_budget(grid_spec, data) -> None:
    """On these grids a quarter of the points suffices for an exact answer."""
    sp, step = grid_spec
    grid = sb_grid(sp, step)
    assert default_budget(len(grid)) >= evals_needed(len(grid))
    values = data.draw(unimodal(len(grid)))
    obj = Counting(grid, values)
    res = find_best_sb(obj, sp, step=step)
    assert res.best_sb == grid[int(np.argmin(values))]
    assert res.n_evals <= math.ceil(len(grid) / 4)


@SETTINGS
@given(st.data())
def test_paper_grid_default_budget_is_exact_on_subgrid(data) -> None:
    """SP = 0.3, step 0.02: 16 points, budget 4 (exactness would need 6) -> the 7-point sub-grid, ends included."""
    grid = sb_grid(0.3)
    values = data.draw(unimodal(len(grid)))
    obj = Counting(grid, values)
    res = find_best_sb(obj, 0.3)
    assert res.max_evals == 4 and res.n_evals <= 4
    assert len(res.searched) == 7 and res.searched[0] == 0.3 and res.searched[-1] == 0.0
    sub_values = [obj.lookup[sb] for sb in res.searched]
    assert res.best_sb == res.searched[int(np.argmin(sub_values))]


@pytest.mark.parametrize("sp, step", GRIDS)
@pytest.mark.parametrize("direction", [1, -1])
def test_monotone_finds_the_end(sp, step, direction) -> None:
    grid = sb_grid(sp, step)
    res = find_best_sb(lambda sb: direction * (sb + 1.0), sp, step=step)
    assert res.best_sb == (grid[-1] if direction == 1 else grid[0])
    assert res.n_evals <= default_budget(len(grid))


@SETTINGS
@given(st.sampled_from(GRIDS), st.integers(1, 60), st.data())
def test_never_over_budget_and_each_point_once(grid_spec, budget, data) -> None:
    sp, step = grid_spec
    grid = sb_grid(sp, step)
    values = data.draw(
        st.lists(st.floats(-100, 100) | st.just(float("nan")), min_size=len(grid), max_size=len(grid))
    )  # not unimodal, with NaNs
    obj = Counting(grid, values)
    res = find_best_sb(obj, sp, step=step, max_evals=budget)
    assert len(obj.calls) == len(set(obj.calls)) == res.n_evals <= min(budget, len(grid))
    assert [sb for sb, _ in res.tried] == obj.calls
    treated = [v if math.isfinite(v) else math.inf for v in (obj.lookup[sb] for sb in obj.calls)]
    assert [v for _, v in res.tried] == treated
    assert res.best_value == min(treated) and res.best_sb in obj.calls


def test_non_finite_values_are_plus_inf() -> None:
    grid = sb_grid(0.3, 0.01)
    target = grid[20]

    def obj(sb: float) -> float:
        return float("nan") if sb > 0.2 else (sb - target) ** 2

    res = find_best_sb(obj, 0.3, step=0.01)
    assert res.best_sb == target and res.best_value == 0.0
    all_nan = find_best_sb(lambda sb: float("nan"), 0.3)
    assert all_nan.best_value == math.inf and all_nan.best_sb == max(sb for sb, _ in all_nan.tried)


def test_deterministic_and_json() -> None:
    def obj(sb: float) -> float:
        return (sb - 0.17) ** 2 + 0.01 * math.sin(40 * sb)

    a, b = find_best_sb(obj, 0.3), find_best_sb(obj, 0.3)
    assert a == b and isinstance(a, SBSearch)
    j = a.to_json()
    assert json.loads(json.dumps(j)) == j
    assert j["best_sb"] == a.best_sb and len(j["tried"]) == a.n_evals and j["grid_size"] == 16


def test_best_sb_rule_lowest_value_then_larger_sb() -> None:
    """The one best-SB rule (search, sweep and report tables all sort by it)."""
    rows = [(0.3, 20.0), (0.1, 18.0), (0.2, 18.0), (0.0, 19.0)]  # (sb, perplexity)
    assert min(rows, key=lambda r: best_sb_key(r[1], r[0])) == (0.2, 18.0)
    assert best_sb_key(18.0, 0.0) < best_sb_key(18.5, 0.3)  # a lower value beats a larger SB
    assert best_sb_key(math.inf, 0.3) < best_sb_key(math.inf, 0.1)  # infeasible everywhere: closest to constant
    # The search applies it to the points it tried: a flat objective picks SB = SP.
    assert find_best_sb(lambda sb: 1.0, 0.3).best_sb == 0.3


def test_single_point_grid() -> None:
    res = find_best_sb(lambda sb: 3.0, 0.0)
    assert (res.best_sb, res.best_value, res.n_evals, res.grid_size) == (0.0, 3.0, 1, 1)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="^max_evals: 0 is outside max_evals >= 1$"):
        find_best_sb(lambda sb: sb, 0.3, max_evals=0)
    with pytest.raises(ValueError, match="^sp: 1.0 is outside"):
        find_best_sb(lambda sb: sb, 1.0)
    with pytest.raises(ValueError, match=r"^step: -0.02 is outside 0.001 <= step < 1$"):
        find_best_sb(lambda sb: sb, 0.3, step=-0.02)
    with pytest.raises(ValueError, match=r"^step: 1e-07 is outside 0.001 <= step < 1$"):  # a grid of 10^7 SBs
        find_best_sb(lambda sb: sb, 0.3, step=1e-7)
    with pytest.raises(ValueError, match="^objective: "):
        find_best_sb(3.0, 0.3)
