"""Per-layer widths from Layer Redundancy (LR) scores: the paper's allocation rule and two budget modes.

Notation (Dumitru et al., 2024): ``SP`` is the target mean slice fraction, ``SB`` the slicing base,
``0 <= SB <= SP < 1``. LR scores ``r_i`` (higher = more redundant) are min-max normalised to ``n_i`` in [0, 1] and

    FS_i = SB + (SP - SB) · n_i / mean(n)          so that mean(FS) = SP,

``SB = SP`` being SliceGPT's constant slicing. Layer ``i`` then reads a residual stream ``(1 - FS_i)·D`` wide.

Budget modes (``budget=``):

* ``"width"`` (the paper's): the mean slice fraction is ``SP``.
* ``"params"``: keep the shape ``FS_i = SB + s·n_i`` and solve for ``s`` so that the sliced model has as many
  parameters as the constant-``SP`` model (same ``round_interval``), counting ``"total"`` (weights plus shortcut
  matrices) or ``"weights"`` only (``count=``). Needs the architecture (``dims=``).

Rounding modes (``rounding=``, width budget):

* ``"total"`` (default): widths are multiples of ``round_interval`` between ``round_interval`` and the largest
  multiple ``<= D`` (clipped there, never 0), and their sum equals
  ``L · constant_width(D, SP, round_interval)`` (largest-remainder rounding in units of ``round_interval``), so
  constant and dynamic slicing are compared at equal total width.
* ``"reference"``: the paper's code (``get_slice_dimension_by_cut_vector`` in ``src/slicegpt/rotate.py`` of
  RazvanDu/DynamicSlicing, fed by ``experiments/mean_cut_experiment_accuracy_cov_auto.py``), which rounds each
  ``(1 - FS_i)·D`` to the nearest integer with ``np.round`` (half to even), with no total matching. With
  ``round_interval > 1`` each width is rounded to the nearest multiple instead. ``round_interval=1`` reproduces
  the reference exactly (same floating-point operations, in the same order). The reference first turns its raw
  per-layer vector ``v`` into redundancy scores ``max(v) - v``; here ``lr`` must already be redundancy-oriented,
  and ``sb`` plays the role of its ``add_to_mean`` with ``amount = sp - sb``.

The last layer's output and the LM head keep ``D`` unless ``final_width`` says otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict, cast

import numpy as np

from dynslice.core.checks import MAX_HIDDEN, MAX_LAYERS, MAX_SCORE, check_choice, check_int, check_real
from dynslice.core.params import COUNTS, ArchDims, ParamCount, sliced_params, sliced_params_continuous

BUDGETS = ("width", "params")
ROUNDINGS = ("total", "reference")
_BISECT_ITERS = 200


# ----------------------------------------------------------------------------------------------------------------
# validation helpers


def _as_lr(lr: Sequence[float] | np.ndarray, num_layers: int | None = None) -> np.ndarray:
    arr = np.asarray(lr, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lr: expected a non-empty 1-D sequence of scores, got shape {arr.shape}")
    if arr.size > MAX_LAYERS:
        raise ValueError(f"lr: {arr.size} scores; at most {MAX_LAYERS} layers are allowed")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"lr: score of layer {int(bad[0])} is {arr[bad[0]]}; all scores must be finite")
    big = np.flatnonzero(np.abs(arr) > MAX_SCORE)
    if big.size:
        raise ValueError(
            f"lr: score of layer {int(big[0])} is {arr[big[0]]:g}; allowed -{MAX_SCORE:g} <= lr <= {MAX_SCORE:g}"
        )
    if num_layers is not None and arr.size != num_layers:
        raise ValueError(f"lr: has {arr.size} scores but the model has {num_layers} layers")
    return arr


def _check_sp_sb(sp: float, sb: float) -> tuple[float, float]:
    """``sp`` and ``sb`` as floats when ``0 <= sb <= sp < 1``."""
    sp = check_real("sp", sp, 0, 1, high_open=True)
    return sp, check_real("sb", sb, 0, sp, allowed=f"0 <= sb <= sp ({sp})")


# ----------------------------------------------------------------------------------------------------------------
# the allocation rule


def normalize_lr(lr: Sequence[float] | np.ndarray) -> np.ndarray:
    """Min-max normalise LR scores to [0, 1]: ``(r - min) / (max - min)``.

    Constant scores (``max == min``) have no shape: the result is all zeros, which :func:`slice_fractions` and
    :func:`allocate` turn into constant slicing.
    """
    arr = _as_lr(lr)
    lo, hi = arr.min(), arr.max()
    if hi == lo:
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


def _is_flat(n: np.ndarray) -> bool:
    return not np.any(n > 0)


def _warn_flat() -> None:
    warnings.warn(
        "lr: all scores are equal, so there is no redundancy profile; using constant slicing (every FS_i = sp)",
        RuntimeWarning,
        stacklevel=3,
    )


def slice_fractions(lr: Sequence[float] | np.ndarray, sp: float, sb: float) -> np.ndarray:
    """``FS_i = SB + (SP - SB)·n_i / mean(n)`` with ``n`` the min-max normalised LR; ``mean(FS) = SP``.

    Computed as ``n·(SP - SB) / mean(n) + SB``, the reference code's order of operations.

    Constant LR is *not* an error: it gives constant slicing (every ``FS_i = SP``) with a ``RuntimeWarning``.

    Raises:
        ValueError: ``sp``/``sb`` outside ``0 <= SB <= SP < 1``; non-finite scores; some ``FS_i >= 1`` (a peaked
            LR with a small ``SB`` can ask a layer to drop everything) -- the message names the layer.
    """
    sp, sb = _check_sp_sb(sp, sb)
    n = normalize_lr(lr)
    if _is_flat(n):
        _warn_flat()
        return np.full_like(n, sp)
    fs = n * (sp - sb) / np.mean(n) + sb
    worst = int(np.argmax(fs))
    if fs[worst] >= 1:
        raise ValueError(
            f"sb: {sb} with sp={sp} gives layer {worst} a slice fraction FS={fs[worst]:.4f} >= 1 "
            f"(allowed 0 <= FS_i < 1); raise sb towards sp"
        )
    return fs


def constant_width(hidden: int, sp: float, round_interval: int) -> int:
    """SliceGPT's width at slice fraction ``sp``: ``int((1-sp)·D)`` rounded down to a multiple of ``round_interval``."""
    hidden = check_int("hidden", hidden, 1, MAX_HIDDEN)
    round_interval = check_int("round_interval", round_interval, 1, hidden)
    sp, _ = _check_sp_sb(sp, 0.0)
    width = int((1 - sp) * hidden)
    return width - width % round_interval


def sb_grid(sp: float, step: float = 0.02) -> list[float]:
    """The paper's SB grid: ``SP, SP - step, ...`` down to 0, kept while ``>= 0`` (0 included when on the grid).

    Values are rounded to 10 decimals so that e.g. ``sb_grid(0.3)`` holds 0.28, not 0.27999999999999997.
    """
    sp, _ = _check_sp_sb(sp, 0.0)
    step = check_real("step", step, 1e-3, 1, high_open=True)  # at most 1000 grid points
    count = int(math.floor(sp / step + 1e-9)) + 1
    return [max(0.0, round(sp - k * step, 10)) for k in range(count)]


# ----------------------------------------------------------------------------------------------------------------
# rounding


def _round_to_total(units: np.ndarray, target: int, high: int) -> np.ndarray:
    """Integers ``k_i`` in ``[1, high]`` with ``sum(k) = target``, nearest to ``units`` by largest remainder."""
    k = np.clip(np.floor(units), 1, high).astype(np.int64)
    while k.sum() < target:
        gain = np.where(k < high, units - k, -np.inf)
        k[int(np.argmax(gain))] += 1
    while k.sum() > target:
        loss = np.where(k > 1, units - k, np.inf)
        k[int(np.argmin(loss))] -= 1
    return k


def _round_reference(keep: np.ndarray, hidden: int, round_interval: int) -> np.ndarray:
    """The reference rounding: ``np.round(keep·D)`` (``round_interval`` 1), else to the nearest multiple."""
    if round_interval == 1:
        return np.round(keep * hidden).astype(int)
    top = hidden // round_interval  # a multiple above D (e.g. D=54, interval 8 -> 56) is not a width
    return (np.minimum(np.round(keep * hidden / round_interval), top) * round_interval).astype(int)


def _round_to_params(units: np.ndarray, high: int, ri: int, cost, target: float) -> np.ndarray:
    """Integer units whose parameter count ``cost(k·ri)`` is within one layer's rounding step of ``target``.

    Start from the floors (clipped to ``[1, high]``) and drop units while over the target. Then add units in order
    of largest remainder while the count stays at or below the target; a layer whose next unit would overshoot is
    set aside and the next one tried. Finally the smallest overshoot replaces the result if it lands closer.
    """
    k = np.clip(np.floor(units), 1, high).astype(np.int64)
    while cost(k * ri) > target:
        loss = np.where(k > 1, units - k, np.inf)
        if not np.isfinite(loss).any():
            return k
        k[int(np.argmin(loss))] -= 1
    below = cost(k * ri)
    open_ = k < high
    best_over: tuple[float, int] | None = None  # (count, layer) of the smallest overshoot seen
    while open_.any():
        i = int(np.argmax(np.where(open_, units - k, -np.inf)))
        k[i] += 1
        above = cost(k * ri)
        if above <= target:
            below = above
            open_[i] = k[i] < high
            continue
        k[i] -= 1
        open_[i] = False
        if best_over is None or above < best_over[0]:
            best_over = (above, i)
    if best_over is not None and best_over[0] - target < target - below:
        k[best_over[1]] += 1
    return k


# ----------------------------------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class Allocation:
    """Per-layer widths and how they were chosen.

    ``fractions`` are the slice fractions ``FS_i`` before rounding; ``scale`` is the ``s`` in
    ``FS_i = SB + s·n_i`` (``(SP-SB)/mean(n)`` for the width budget, solved for the params budget, 0 when
    slicing is constant). ``params`` is the sliced model's count when the architecture was given;
    ``target_params`` is the constant-``SP`` count that the params budget matched.
    """

    widths: tuple[int, ...]
    fractions: tuple[float, ...]
    sp: float
    sb: float
    hidden: int
    budget: str
    round_interval: int
    rounding: str
    scale: float
    final_width: int
    count: str | None = None
    params: ParamCount | None = None
    target_params: int | None = None

    @property
    def effective_fractions(self) -> tuple[float, ...]:
        """Slice fractions after rounding: ``1 - width_i / D``."""
        return tuple(1 - w / self.hidden for w in self.widths)

    @property
    def total_width(self) -> int:
        return sum(self.widths)

    def to_json(self) -> dict:
        return {
            "widths": list(self.widths),
            "final_width": self.final_width,
            "hidden": self.hidden,
            "sp": self.sp,
            "sb": self.sb,
            "budget": self.budget,
            "count": self.count,
            "round_interval": self.round_interval,
            "rounding": self.rounding,
            "scale": self.scale,
            "fractions": list(self.fractions),
            "effective_fractions": list(self.effective_fractions),
            "mean_effective_fraction": float(np.mean(self.effective_fractions)),
            "total_width": self.total_width,
            "constant_width": constant_width(self.hidden, self.sp, self.round_interval),
            "params": None if self.params is None else self.params.to_json(),
            "target_params": self.target_params,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Allocation:
        """Inverse of :meth:`to_json` (derived fields are ignored)."""
        params = obj.get("params")
        return cls(
            widths=tuple(int(w) for w in obj["widths"]),
            fractions=tuple(float(f) for f in obj["fractions"]),
            sp=float(obj["sp"]),
            sb=float(obj["sb"]),
            hidden=int(obj["hidden"]),
            budget=obj["budget"],
            round_interval=int(obj["round_interval"]),
            rounding=obj["rounding"],
            scale=float(obj["scale"]),
            final_width=int(obj["final_width"]),
            count=obj.get("count"),
            params=None if params is None else ParamCount(int(params["weights"]), int(params["shortcuts"])),
            target_params=obj.get("target_params"),
        )


def allocation_to_json(allocation: Allocation) -> dict:
    """JSON-ready dict of an :class:`Allocation` (same as ``allocation.to_json()``)."""
    return allocation.to_json()


#: Sign that turns each metric's raw score into redundancy (high = redundant = sliced more). ``redundancy`` labels
#: a vector that is already oriented (a hand-written file, or the ``normalized`` vector of an LR record).
ORIENTATION: dict[str, float] = {"cosine": 1.0, "redundancy": 1.0, "bi": -1.0, "angular": -1.0}


def redundancy_scores(scores: Sequence[float] | np.ndarray, metric: str) -> np.ndarray:
    """The one orientation function: raw scores of ``metric`` to min-max normalised redundancy in [0, 1].

    ``cosine`` is redundancy already; ``bi`` (1 - cos) and ``angular`` are distances, so they are negated. The
    allocator is only ever given this function's output.
    """
    check_choice("metric", metric, tuple(ORIENTATION))
    return normalize_lr(ORIENTATION[metric] * _as_lr(scores))


# ----------------------------------------------------------------------------------------------------------------
# allocate


def allocate(
    lr: Sequence[float],
    sp: float,
    sb: float,
    hidden: int,
    *,
    round_interval: int = 8,
    budget: str = "width",
    dims: ArchDims | None = None,
    count: str = "total",
    rounding: str = "total",
    num_layers: int | None = None,
    final_width: int | None = None,
) -> Allocation:
    """Per-layer input widths for LR scores ``lr`` at mean slice fraction ``sp`` and slicing base ``sb``.

    Args:
        lr: one LR score per decoder layer (higher = more redundant = sliced more).
        sp, sb: ``0 <= sb <= sp < 1``.
        hidden: the dense width ``D``.
        round_interval: widths are multiples of it (``rounding="total"``, or ``"reference"`` with values > 1).
        budget: ``"width"`` (mean FS = SP, the paper) or ``"params"`` (match the constant-SP parameter count).
        dims: the architecture; needed for ``budget="params"``, and fills ``Allocation.params`` when given.
        count: what the params budget matches: ``"total"`` (weights plus shortcuts) or ``"weights"``.
        rounding: ``"total"`` (equal total width to constant slicing) or ``"reference"`` (the paper's code).
        num_layers: checked against ``len(lr)`` (``dims.layers`` is used when ``dims`` is given).
        final_width: width of the last layer's output and LM head input (default ``D``), for parameter counts.

    Constant LR is not an error: every layer gets the constant width (a ``RuntimeWarning`` says so).

    Raises:
        ValueError: every bad argument, with its name and the allowed range; an ``sb`` that would slice a
            layer entirely; a params budget that no ``s`` with all ``FS_i`` in [0, 1) reaches.
    """
    a = _checked_allocate_args(
        lr, sp, sb, hidden, round_interval, budget, dims, count, rounding, num_layers, final_width
    )
    # The paper's rule: FS_i = SB + (SP - SB)·n_i / mean(n), with n the min-max normalised LR, so mean(FS) = SP.
    # The params budget keeps the shape FS_i = SB + s·n_i and solves s for constant SP's parameter count instead.
    if a.budget == "params":
        return _allocate_params(a.scores, a.const, cast(ArchDims, a.dims), a.count, a.common)
    fs = slice_fractions(a.scores, a.sp, a.sb)
    n = normalize_lr(a.scores)
    scale = 0.0 if _is_flat(n) else (a.sp - a.sb) / float(np.mean(n))
    # Layer i keeps (1 - FS_i)·D, rounded as ``rounding`` says.
    if a.rounding == "reference":
        widths = _round_reference(1.0 - fs, a.hidden, a.round_interval)
        thin = np.flatnonzero(widths < 1)
        if thin.size:
            raise ValueError(
                f"sb: {a.sb} gives layer {int(thin[0])} a width of {int(widths[thin[0]])} after rounding "
                f"(allowed 1 <= width <= {a.hidden}); raise sb towards sp"
            )
    else:
        units = (1.0 - fs) * a.hidden / a.round_interval
        widths = _round_to_total(units, a.scores.size * a.const // a.round_interval, a.hidden // a.round_interval)
        widths = widths * a.round_interval
    widths_t = tuple(int(w) for w in widths)
    params = None if a.dims is None else sliced_params(a.dims, widths_t, a.final_width)
    return Allocation(
        widths=widths_t,
        fractions=tuple(float(f) for f in fs),
        scale=float(scale),
        count=None,
        params=params,
        **a.common,
    )


class _Common(TypedDict):
    """The :class:`Allocation` fields that every budget fills the same way."""

    sp: float
    sb: float
    hidden: int
    budget: str
    round_interval: int
    rounding: str
    final_width: int


@dataclass(frozen=True)
class _AllocateArgs:
    """:func:`allocate`'s arguments once checked: LR scores as an array, ``const`` the constant-SP width."""

    scores: np.ndarray
    sp: float
    sb: float
    hidden: int
    round_interval: int
    budget: str
    rounding: str
    count: str
    dims: ArchDims | None
    final_width: int
    const: int

    @property
    def common(self) -> _Common:
        return _Common(
            sp=self.sp,
            sb=self.sb,
            hidden=self.hidden,
            budget=self.budget,
            round_interval=self.round_interval,
            rounding=self.rounding,
            final_width=self.final_width,
        )


def _checked_allocate_args(
    lr: Sequence[float],
    sp: float,
    sb: float,
    hidden: int,
    round_interval: int,
    budget: str,
    dims: ArchDims | None,
    count: str,
    rounding: str,
    num_layers: int | None,
    final_width: int | None,
) -> _AllocateArgs:
    """Check every argument of :func:`allocate` (see its ``Raises``), in the order the errors are reported."""
    hidden = check_int("hidden", hidden, 1, MAX_HIDDEN)
    round_interval = check_int("round_interval", round_interval, 1, hidden)
    check_choice("budget", budget, BUDGETS)
    check_choice("count", count, COUNTS)
    check_choice("rounding", rounding, ROUNDINGS)
    sp, sb = _check_sp_sb(sp, sb)
    if dims is not None:
        if not isinstance(dims, ArchDims):
            raise ValueError(f"dims: expected an ArchDims, got {type(dims).__name__}")
        if dims.hidden != hidden:
            raise ValueError(f"hidden: {hidden} differs from dims.hidden ({dims.hidden})")
        if num_layers is not None and num_layers != dims.layers:
            raise ValueError(f"num_layers: {num_layers} differs from dims.layers ({dims.layers})")
        num_layers = dims.layers
    if num_layers is not None:
        num_layers = check_int("num_layers", num_layers, 1)
    final = hidden if final_width is None else check_int("final_width", final_width, 1, hidden)
    scores = _as_lr(lr, num_layers)
    const = constant_width(hidden, sp, round_interval)
    if const < 1:
        raise ValueError(
            f"sp: {sp} leaves int((1-sp)*{hidden}) < round_interval ({round_interval}) dims; lower sp or round_interval"
        )
    if budget == "params":
        if dims is None:
            raise ValueError("dims: budget='params' needs the architecture (dims=ArchDims.from_config(config))")
        if rounding != "total":
            raise ValueError("rounding: 'reference' is only defined for budget='width'")
    return _AllocateArgs(scores, sp, sb, hidden, round_interval, budget, rounding, count, dims, final, const)


def _allocate_params(scores: np.ndarray, const: int, dims: ArchDims, count: str, common: _Common) -> Allocation:
    """The params budget: ``FS_i = SB + s·n_i`` with ``s`` solved so the count matches the constant-SP model."""
    sp, sb, hidden, ri, final = (
        common["sp"],
        common["sb"],
        common["hidden"],
        common["round_interval"],
        common["final_width"],
    )
    n_layers = scores.size
    target_pc = sliced_params(dims, [const] * n_layers, final)
    target = target_pc.total if count == "total" else target_pc.weights
    n = normalize_lr(scores)

    def pick(pc: ParamCount) -> int:
        return pc.total if count == "total" else pc.weights

    if _is_flat(n) or sb == sp:
        if _is_flat(n):
            _warn_flat()
        widths = (const,) * n_layers
        return Allocation(
            widths=widths,
            fractions=(sp,) * n_layers,
            scale=0.0,
            count=count,
            params=sliced_params(dims, widths, final),
            target_params=target,
            **common,
        )

    def cont(s: float) -> float:
        return sliced_params_continuous(dims, (1.0 - (sb + s * n)) * hidden, final, count)

    s_hi = (1.0 - sb) / float(n.max())  # FS_i < 1 for every layer iff s < s_hi
    p_lo, p_hi = cont(s_hi), cont(0.0)
    if not p_lo < target <= p_hi:
        raise ValueError(
            f"sb: {sb} cannot reach the {count} parameter budget {target} of constant sp={sp}: "
            f"FS_i = sb + s*n_i with all FS_i in [0, 1) gives counts in ({p_lo:.0f}, {p_hi:.0f}]; "
            f"raise sb towards sp"
        )
    lo, hi = 0.0, s_hi  # cont is decreasing in s: cont(lo) >= target > cont(hi)
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if cont(mid) >= target:
            lo = mid
        else:
            hi = mid
    s = lo
    fs = sb + s * n
    units = (1.0 - fs) * hidden / ri
    k = _round_to_params(units, hidden // ri, ri, lambda w: pick(sliced_params(dims, w.tolist(), final)), target)
    widths = tuple(int(w) for w in k * ri)
    return Allocation(
        widths=widths,
        fractions=tuple(float(f) for f in fs),
        scale=float(s),
        count=count,
        params=sliced_params(dims, widths, final),
        target_params=target,
        **common,
    )
