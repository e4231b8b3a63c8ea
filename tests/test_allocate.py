"""The LR -> widths allocator: the paper's rule, rounding to equal total width, the params budget, the reference."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dynslice.core.allocate import (
    Allocation,
    allocate,
    allocation_to_json,
    constant_width,
    normalize_lr,
    sb_grid,
    slice_fractions,
)
from dynslice.core.params import ArchDims, sliced_params, sliced_params_continuous
from dynslice.store.jsonio import write_json
from dynslice.store.records import load_lr

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

TINY = ArchDims(
    vocab=96,
    hidden=48,
    layers=4,
    intermediate=104,
    heads=6,
    kv_heads=2,
    head_dim=8,
    qkv_bias=True,
    o_bias=False,
    mlp_bias=False,
    tied=True,
)

scores = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=12)
sp_st = st.floats(0.0, 0.9)


@st.composite
def sp_sb(draw) -> tuple[float, float]:
    sp = draw(sp_st)
    return sp, draw(st.floats(0.0, 1.0)) * sp


def fs_valid(lr, sp, sb) -> bool:
    """Whether the paper's formula keeps every FS_i < 1 (computed independently of the module)."""
    r = np.asarray(lr, float)
    if r.max() == r.min():
        return True
    n = (r - r.min()) / (r.max() - r.min())
    return bool(np.all(sb + (sp - sb) * n / n.mean() < 1))


# ----------------------------------------------------------------------------------------------------------------
# the formula


def test_normalize_lr_minmax() -> None:
    np.testing.assert_allclose(normalize_lr([2.0, 4.0, 3.0, 6.0]), [0.0, 0.5, 0.25, 1.0])
    np.testing.assert_array_equal(normalize_lr([5.0, 5.0, 5.0]), [0.0, 0.0, 0.0])
    assert normalize_lr([1.0, 3.0, 2.0]).tolist() == [0.0, 1.0, 0.5]
    assert not np.isnan(normalize_lr([1.0, 1.0 + 1e-12])).any()


def test_slice_fractions_worked_example() -> None:
    # n = [0, 0.5, 1], mean 0.5 -> FS = 0.1 + 0.2 * n / 0.5 = [0.1, 0.3, 0.5]
    np.testing.assert_allclose(slice_fractions([1.0, 2.0, 3.0], 0.3, 0.1), [0.1, 0.3, 0.5], rtol=0, atol=1e-15)


@SETTINGS
@given(scores, sp_sb())
def test_fractions_mean_is_sp_and_bounded(lr, spsb) -> None:
    sp, sb = spsb
    assume(max(lr) > min(lr))
    if not fs_valid(lr, sp, sb):
        with pytest.raises(ValueError, match=r"^sb: .* gives layer \d+ a slice fraction"):
            slice_fractions(lr, sp, sb)
        return
    fs = slice_fractions(lr, sp, sb)
    assert math.isclose(float(np.mean(fs)), sp, rel_tol=0, abs_tol=1e-12)
    assert np.all(fs >= sb - 1e-12) and np.all(fs < 1)
    # the most redundant layer is sliced most, the least redundant one gets exactly SB
    assert math.isclose(fs[int(np.argmin(lr))], sb, abs_tol=1e-12)
    order = np.argsort(lr, kind="stable")  # more redundant layers are sliced at least as much
    assert np.all(np.diff(fs[order]) >= -1e-12)


def test_constant_lr_is_constant_slicing_with_warning() -> None:
    with pytest.warns(RuntimeWarning, match="constant slicing"):
        fs = slice_fractions([0.7] * 5, 0.3, 0.0)
    np.testing.assert_array_equal(fs, [0.3] * 5)
    with pytest.warns(RuntimeWarning, match="constant slicing"):
        a = allocate([1.0] * 4, 0.3, 0.1, 48)
    assert a.widths == (constant_width(48, 0.3, 8),) * 4 and a.scale == 0.0
    with pytest.warns(RuntimeWarning, match="constant slicing"):
        b = allocate([1.0] * 4, 0.3, 0.1, 48, budget="params", dims=TINY)
    assert b.widths == a.widths and b.params.total == b.target_params


def test_constant_width_is_slicegpt() -> None:
    assert constant_width(4096, 0.25, 8) == 3072
    assert constant_width(576, 0.3, 8) == 400  # int(403.2) = 403 -> 400
    assert constant_width(576, 0.3, 1) == 403
    assert constant_width(100, 0.0, 8) == 96


def test_sb_grid_matches_paper_loop() -> None:
    for sp in (0.2, 0.25, 0.3):
        # the reference: for amount in np.arange(0, sp + 0.01, 0.02): sb = sp - amount
        ref = [sp - a for a in np.arange(0, sp + 0.01, 0.02)]
        grid = sb_grid(sp)
        assert len(grid) == len(ref)
        np.testing.assert_allclose(grid, ref, atol=1e-12)
    assert sb_grid(0.3)[:3] == [0.3, 0.28, 0.26] and sb_grid(0.3)[-1] == 0.0
    assert sb_grid(0.0) == [0.0]
    assert sb_grid(0.3, 0.1) == [0.3, 0.2, 0.1, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# width budget, rounding to the constant total


@SETTINGS
@given(scores, sp_sb(), st.sampled_from([1, 4, 8, 16]), st.integers(32, 300))
def test_width_budget_total_matches_constant(lr, spsb, ri, hidden) -> None:
    sp, sb = spsb
    assume(ri <= hidden and constant_width(hidden, sp, ri) >= 1 and fs_valid(lr, sp, sb))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = allocate(lr, sp, sb, hidden, round_interval=ri)
    w = np.array(a.widths)
    assert w.sum() == len(lr) * constant_width(hidden, sp, ri)
    assert np.all(w % ri == 0) and np.all(w >= ri) and np.all(w <= hidden)
    # away from the bounds, every layer moves by less than two intervals (floor, then at most one
    # largest-remainder step, since the constant total is less than one interval per layer below the raw total)
    raw = (1 - np.array(a.fractions)) * hidden
    if np.all((raw >= 2 * ri) & (raw <= (hidden // ri - 1) * ri)):
        assert np.all(np.abs(w - raw) < 2 * ri)


@SETTINGS
@given(scores, sp_st, st.sampled_from([1, 8]))
def test_sb_equal_sp_is_constant(lr, sp, ri) -> None:
    const = constant_width(96, sp, ri)
    assume(const >= 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = allocate(lr, sp, sp, 96, round_interval=ri)
    assert a.widths == (const,) * len(lr)


def test_width_budget_worked_example() -> None:
    # FS = [0.1, 0.3, 0.5] on D = 80: raw widths 72, 56, 40; constant width int(0.7*80) = 56 -> total 168
    a = allocate([1.0, 2.0, 3.0], 0.3, 0.1, 80, round_interval=8)
    assert a.widths == (72, 56, 40) and math.isclose(a.scale, 0.4)
    # interval 16: units 4.5, 3.5, 2.5 -> floors 4, 3, 2 (sum 9) vs target 3*48/16 = 9 -> unchanged
    assert allocate([1.0, 2.0, 3.0], 0.3, 0.1, 80, round_interval=16).widths == (64, 48, 32)


# ----------------------------------------------------------------------------------------------------------------
# the reference code


def reference_widths(raw: list[float], sp: float, sb: float, hidden: int) -> list[int]:
    """The paper's code path, re-implemented step by step (mean_cut_experiment_accuracy_cov_auto.py -> argparse ->
    rotate.get_slice_dimension_by_cut_vector), with amount = sp - sb and add_to_mean = sb.
    """
    values = list(raw)
    mx = max(values)
    values = [(mx - v) for v in values]  # "invert the graph"
    lo, hi = min(values), max(values)
    values = [(v - lo) / (hi - lo) for v in values]
    amount, add_to_mean = sp - sb, sb
    mean_graph = np.mean(values)
    values = [v * amount / mean_graph + add_to_mean for v in values]
    adjusted = np.append(1 - np.array(values), 1)
    vector_cut = [float(x) for x in " ".join(map(str, adjusted)).split()]  # through the command line
    new_dim = np.round(np.array(vector_cut) * hidden).astype(int)
    assert new_dim[-1] == hidden
    return [int(x) for x in new_dim[:-1]]


@SETTINGS
@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=40),
    sp_sb(),
    st.sampled_from([48, 576, 2048, 4096]),
)
def test_reference_mode_is_exact(raw, spsb, hidden) -> None:
    sp, sb = spsb
    mx = max(raw)
    lr = [mx - v for v in raw]  # our LR is redundancy-oriented: the reference's inversion, done by the caller
    assume(max(lr) > min(lr) and fs_valid(lr, sp, sb))
    ref = reference_widths(raw, sp, sb, hidden)
    assume(min(ref) >= 1)
    a = allocate(lr, sp, sb, hidden, round_interval=1, rounding="reference")
    assert list(a.widths) == ref


def test_reference_mode_interval_and_zero_width() -> None:
    # D = 54, interval 8: the nearest multiple of 54 itself would be 56 > D; it is capped at 48
    a = allocate([0.0, 1.0, 0.5], 0.2, 0.0, 54, round_interval=8, rounding="reference")
    assert all(w % 8 == 0 and 8 <= w <= 48 for w in a.widths) and a.widths[0] == 48
    with pytest.raises(ValueError, match=r"^sb: .* width of 0 after rounding"):
        allocate([0.0, 0.0, 0.0, 1.0], 0.245, 0.0, 10, round_interval=1, rounding="reference")


# ----------------------------------------------------------------------------------------------------------------
# params budget


def one_step(dims: ArchDims, widths: tuple[int, ...], ri: int) -> int:
    """The largest change in the count from moving any one layer's width by one interval."""
    base = sliced_params(dims, widths).total
    steps = []
    for i, w in enumerate(widths):
        other = w + ri if w + ri <= dims.hidden else w - ri
        if 1 <= other <= dims.hidden:
            steps.append(abs(sliced_params(dims, widths[:i] + (other,) + widths[i + 1 :]).total - base))
    return max(steps)


@SETTINGS
@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=4, max_size=4),
    st.floats(0.05, 0.6),
    st.floats(0.3, 1.0),
    st.sampled_from([1, 4, 8]),
)
def test_params_budget_matched_within_one_step(lr, sp, sb_frac, ri) -> None:
    sb = sp * sb_frac
    assume(max(lr) > min(lr) and constant_width(48, sp, ri) >= 1)
    target = sliced_params(TINY, [constant_width(48, sp, ri)] * 4).total
    try:
        a = allocate(lr, sp, sb, 48, round_interval=ri, budget="params", dims=TINY)
    except ValueError as e:
        assert str(e).startswith(f"sb: {sb} cannot reach")
        n = normalize_lr(lr)  # infeasible: even slicing the most redundant layer to ~0 keeps too many params
        assert sliced_params_continuous(TINY, (1 - (sb + (1 - sb) * 0.999999 * n)) * 48) >= target - 1
        return
    assert a.target_params == target and a.count == "total"
    assert a.params == sliced_params(TINY, a.widths)
    assert abs(a.params.total - target) <= one_step(TINY, a.widths, ri)
    assert all(w % ri == 0 and ri <= w <= 48 for w in a.widths)
    fs = np.array(a.fractions)  # the shape is SB + s * n
    np.testing.assert_allclose(fs, sb + a.scale * normalize_lr(lr), atol=1e-12)
    assert np.all(fs < 1)


def test_params_budget_weights_count_and_shape() -> None:
    lr = [0.1, 0.9, 0.4, 0.6]
    a = allocate(lr, 0.3, 0.1, 48, round_interval=1, budget="params", dims=TINY, count="weights")
    target = sliced_params(TINY, [constant_width(48, 0.3, 1)] * 4).weights
    assert a.target_params == target and a.count == "weights"
    assert abs(a.params.weights - target) <= one_step(TINY, a.widths, 1)
    # more redundant layers are narrower
    assert [a.widths[i] for i in np.argsort(lr)] == sorted(a.widths, reverse=True)
    # the params budget differs from the width budget in general, but both use the same SB
    assert min(a.fractions) == pytest.approx(0.1)


def test_params_budget_sb_equal_sp_is_constant() -> None:
    a = allocate([0.3, 0.1, 0.9, 0.5], 0.25, 0.25, 48, budget="params", dims=TINY)
    assert a.widths == (constant_width(48, 0.25, 8),) * 4 and a.params.total == a.target_params


def test_params_budget_infeasible_names_sb_and_range() -> None:
    with pytest.raises(ValueError, match=r"^sb: 0.0 cannot reach the total parameter budget \d+ .* gives counts in"):
        allocate([0.0, 0.0, 0.0, 1.0], 0.5, 0.0, 48, round_interval=1, budget="params", dims=TINY)


# ----------------------------------------------------------------------------------------------------------------
# validation, JSON, determinism


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sp=1.0, sb=0.0), r"^sp: 1.0 is outside 0 <= sp < 1"),
        (dict(sp=-0.1, sb=0.0), r"^sp: -0.1 is outside"),
        (dict(sp=0.3, sb=0.4), r"^sb: 0.4 is outside 0 <= sb <= sp \(0.3\)"),
        (dict(sp=0.3, sb=-0.01), r"^sb: -0.01 is outside"),
        (dict(sp=float("nan"), sb=0.0), r"^sp: nan is not a finite number"),
        (dict(lr=[0.1, float("nan"), 0.3, 0.2]), r"^lr: score of layer 1 is nan"),
        (dict(lr=[0.1, float("inf"), 0.3, 0.2]), r"^lr: score of layer 1 is inf"),
        (dict(lr=[]), r"^lr: expected a non-empty"),
        (dict(num_layers=5), r"^lr: has 4 scores but the model has 5 layers"),
        (dict(hidden=0), r"^hidden: 0 is outside 1 <= hidden <= 262144$"),
        (dict(round_interval=0), r"^round_interval: 0 is outside 1 <= round_interval <= 48$"),
        (dict(round_interval=64), r"^round_interval: 64 is outside 1 <= round_interval <= 48$"),
        (dict(round_interval=2.0), r"^round_interval: 2.0 is not an integer; allowed: 1 <= round_interval <= 48$"),
        (dict(budget="flops"), r"^budget: 'flops' is not one of"),
        (dict(rounding="floor"), r"^rounding: 'floor' is not one of"),
        (dict(count="all"), r"^count: 'all' is not one of"),
        (dict(budget="params"), r"^dims: budget='params' needs"),
        (dict(budget="params", dims=TINY, rounding="reference"), r"^rounding: 'reference' is only"),
        (dict(dims=TINY, hidden=64), r"^hidden: 64 differs from dims.hidden"),
        (dict(lr=[0.1, 0.2, 0.3], dims=TINY), r"^lr: has 3 scores but the model has 4 layers"),
        (dict(final_width=49), r"^final_width: 49 is outside 1 <= final_width <= 48$"),
        (dict(sp=0.9, sb=0.9, hidden=48, round_interval=8), r"^sp: 0.9 leaves"),
        (dict(lr=[0.0, 0.0, 0.0, 1.0], sp=0.3, sb=0.0), r"^sb: 0.0 with sp=0.3 gives layer 3 a slice fraction FS=1.2"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    args = dict(lr=[0.1, 0.4, 0.3, 0.2], sp=0.3, sb=0.1, hidden=48)
    args.update(kwargs)
    lr, sp, sb, hidden = (args.pop(k) for k in ("lr", "sp", "sb", "hidden"))
    with pytest.raises(ValueError, match=match):
        allocate(lr, sp, sb, hidden, **args)


def test_sb_grid_rejects_bad_step() -> None:
    with pytest.raises(ValueError, match="^step: 0 is outside 0.001 <= step < 1$"):
        sb_grid(0.3, 0)
    with pytest.raises(ValueError, match="^step: 1e-07 is outside 0.001 <= step < 1$"):  # 3 million grid points
        sb_grid(0.3, 1e-7)
    with pytest.raises(ValueError, match="^sp: 1.2 is outside"):
        sb_grid(1.2)


def test_json_round_trip_and_determinism(tmp_path) -> None:
    lr = [0.3, 0.9, 0.1, 0.5]
    a = allocate(lr, 0.3, 0.1, 48, budget="params", dims=TINY)
    b = allocate(lr, 0.3, 0.1, 48, budget="params", dims=TINY)
    assert a == b
    obj = allocation_to_json(a)
    assert obj == a.to_json() and json.loads(json.dumps(obj)) == obj
    assert obj["params"]["total"] == a.params.total and obj["budget"] == "params" and obj["count"] == "total"
    assert obj["constant_width"] == 32 and obj["total_width"] == sum(a.widths)
    assert Allocation.from_json(json.loads(json.dumps(obj))) == a
    path = write_json(tmp_path / "alloc.json", obj)
    assert json.loads(path.read_text()) == obj


def test_load_lr(tmp_path) -> None:
    good = write_json(
        tmp_path / "lr.json",
        {"model": "m", "dataset": "d", "metric": "cosine", "lr": [0.5, 0.25, 1.0], "normalized": [0.33, 0.0, 1.0]},
    )
    np.testing.assert_allclose(load_lr(good), [1 / 3, 0.0, 1.0])
    bi = write_json(tmp_path / "bi.json", {"metric": "bi", "lr": [0.5, 0.25, 1.0]})  # a distance: negated
    np.testing.assert_allclose(load_lr(bi), [2 / 3, 1.0, 0.0])
    missing = write_json(tmp_path / "bad.json", {"model": "m"})
    with pytest.raises(ValueError, match="^lr: .* has no 'lr' list"):
        load_lr(missing)
    nan = write_json(tmp_path / "nan.json", {"lr": [0.1, float("nan")], "metric": "cosine"})  # written as null
    with pytest.raises(ValueError, match="^lr: .* not a number"):
        load_lr(nan)
