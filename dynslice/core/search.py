"""Choosing the slicing base SB: a budgeted search over the paper's SB grid, model-free.

The paper sweeps SB over ``sb_grid(SP)`` (``SP, SP-0.02, ..., 0``) and keeps the best. :func:`find_best_sb`
assumes the objective (e.g. perplexity of the sliced model) is roughly unimodal along the grid and runs a discrete
Fibonacci search (the optimal bracketing search for unimodal sequences: ``k`` evaluations find the minimum of
``F(k+2) - 1`` points exactly). When the budget is too small for the whole grid, the search runs over the finest
evenly spaced sub-grid it can resolve exactly, which always contains both ends (``SB = SP`` and the smallest SB).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dynslice.core.allocate import sb_grid
from dynslice.core.checks import check_int


@dataclass(frozen=True)
class SBSearch:
    """The outcome of :func:`find_best_sb`: every ``(sb, value)`` evaluated, in order, and the best one.

    Non-finite objective values are recorded as ``inf``.
    """

    tried: tuple[tuple[float, float], ...]
    best_sb: float
    best_value: float
    n_evals: int
    grid_size: int
    sp: float
    step: float
    max_evals: int
    searched: tuple[float, ...]  # the (sub-)grid the search ran over

    def to_json(self) -> dict:
        return {
            "sp": self.sp,
            "step": self.step,
            "grid_size": self.grid_size,
            "max_evals": self.max_evals,
            "n_evals": self.n_evals,
            "best_sb": self.best_sb,
            "best_value": self.best_value,
            "tried": [{"sb": sb, "value": v} for sb, v in self.tried],
            "searched": list(self.searched),
        }


def best_sb_key(value: float, sb: float) -> tuple[float, float]:
    """Sort key of the best-SB rule, shared by the search, the sweep and the report tables: the lowest value
    (perplexity) wins, and a tie goes to the larger SB (closer to constant slicing)."""
    return (value, -sb)


def _fib(limit: int) -> list[int]:
    """Fibonacci numbers ``F(1)=1, F(2)=1, ...`` (index 0 holds a placeholder) up to the first one >= limit."""
    fib = [0, 1, 1]
    while fib[-1] < limit:
        fib.append(fib[-1] + fib[-2])
    return fib


def evals_needed(n: int) -> int:
    """Evaluations that Fibonacci search needs to find the exact minimum of any unimodal sequence of ``n`` points."""
    check_int("n", n, 1)
    if n == 1:
        return 1
    fib = _fib(n + 1)
    j = next(i for i, f in enumerate(fib) if i >= 3 and f >= n + 1)
    return j - 2


def default_budget(grid_size: int) -> int:
    """A quarter of the grid, rounded up, but at least 2 evaluations when the grid has 2 or more points."""
    return max(math.ceil(grid_size / 4), min(grid_size, 2))


def _subgrid(n: int, budget: int) -> list[int]:
    """Indices of the finest evenly spaced sub-grid (both ends included) that ``budget`` evaluations solve."""
    if budget >= evals_needed(n):
        return list(range(n))
    if budget == 1:
        return [0]
    fib = [0, 1, 1]
    while len(fib) <= budget + 2:
        fib.append(fib[-1] + fib[-2])
    capacity = fib[budget + 2] - 1  # < n, since budget < evals_needed(n)
    return [int(math.floor(j * (n - 1) / (capacity - 1) + 0.5)) for j in range(capacity)]


def _fibonacci_argmin(f: Callable[[int], float], m: int) -> int:
    """Index in ``range(m)`` of the minimum of a unimodal ``f`` by Fibonacci search (ties move left)."""
    if m == 1:
        f(0)
        return 0
    fib = _fib(m + 1)
    j = next(i for i, v in enumerate(fib) if i >= 3 and v >= m + 1)

    def value(i: int) -> float:
        return f(i) if i < m else math.inf  # padding beyond the end is never evaluated

    a = -1  # the open interval (a, a + F(j)) holds the minimum
    while j > 3:
        x1, x2 = a + fib[j - 2], a + fib[j - 1]
        if value(x1) <= value(x2):
            j -= 1  # keep (a, x2)
        else:
            a, j = x1, j - 1  # keep (x1, b)
    return a + 1


def find_best_sb(
    objective: Callable[[float], float], sp: float, *, step: float = 0.02, max_evals: int | None = None
) -> SBSearch:
    """Minimise ``objective(sb)`` over ``sb_grid(sp, step)`` with at most ``max_evals`` evaluations.

    Args:
        objective: the value to minimise at a given SB (e.g. calibration perplexity); NaN or inf count as +inf.
            Each grid point is evaluated at most once.
        sp: the mean slice fraction; the grid runs from ``sp`` down to 0 in steps of ``step``.
        max_evals: the evaluation budget; default :func:`default_budget` (a quarter of the grid, at least 2).

    The minimum is exact for unimodal objectives when ``max_evals >= evals_needed(grid_size)``; otherwise it is
    the exact minimum over an evenly spaced sub-grid that includes both ends. The reported best is the smallest
    value among all points tried (ties: the larger SB).
    """
    grid = sb_grid(sp, step)
    n = len(grid)
    budget = default_budget(n) if max_evals is None else max_evals
    budget = check_int("max_evals", budget, 1)
    if not callable(objective):
        raise ValueError(f"objective: {objective!r} is not callable")
    sub = _subgrid(n, min(budget, evals_needed(n)))
    cache: dict[int, float] = {}
    tried: list[tuple[float, float]] = []

    def f(k: int) -> float:
        i = sub[k]
        if i not in cache:
            if len(cache) >= budget:  # cannot happen by construction; guards the promise
                raise RuntimeError("find_best_sb exceeded its evaluation budget")
            raw = float(objective(grid[i]))
            cache[i] = raw if math.isfinite(raw) else math.inf
            tried.append((grid[i], cache[i]))
        return cache[i]

    _fibonacci_argmin(f, len(sub))
    best_i = min(cache, key=lambda i: best_sb_key(cache[i], grid[i]))
    return SBSearch(
        tried=tuple(tried),
        best_sb=grid[best_i],
        best_value=cache[best_i],
        n_evals=len(cache),
        grid_size=n,
        sp=float(sp),
        step=float(step),
        max_evals=budget,
        searched=tuple(grid[i] for i in sub),
    )
