"""The reproduction check: exact where both sides ran the same pinned arithmetic, measured tolerances elsewhere, and
every regression planted in the method (``bench/plants.py``) caught.

The planted runs are real recomputations of smoke-profile runs in a subprocess with the pins of
``dynslice.experiment.numerics.PINNED_ENV`` (they act only when set before torch starts), once more at one thread.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynslice.experiment.numerics import PINNED_ENV, arithmetic_key
from dynslice.publish import repro
from dynslice.store.jsonio import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
PLANTS = ("width", "sb", "lr", "seed")
RUNS = ("sp0.30-sb0.30-width-calwiki-zs", "sp0.30-sb0.10-width-calwiki", "sp0.30-sb0.10-params-calwiki")


def _plants(root: Path, plants: tuple[str, ...], threads: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV}
    env.update(
        PINNED_ENV,
        OMP_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TQDM_DISABLE="1",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plants.py"), "smoke", str(root), "--runs", *RUNS, "--plants", *plants],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    """``(root, again)``: every plant at two threads under ``root``, the honest run again at one thread."""
    root, again = tmp_path_factory.mktemp("plants"), tmp_path_factory.mktemp("again")
    _plants(root, ("none", *PLANTS), threads=2)
    _plants(again, ("none",), threads=1)
    return root, again


def _check(results: Path, published: Path) -> tuple[int, str]:
    out = io.StringIO()
    return repro.check(results, published, out=out), out.getvalue()


def _records(folder: Path) -> dict[str, dict]:
    return {p.name: read_json(p) for p in sorted((folder / "runs").rglob("*.json"))}


@pytest.mark.slow  # the planted runs: bench/plants.py in two subprocesses
def test_pinned_runs_are_bit_identical_across_thread_counts_and_checked_exactly(planted):
    root, again = planted
    ref, rerun = root / "none" / "smoke", again / "none" / "smoke"
    a, b = _records(ref), _records(rerun)
    assert a.keys() == b.keys() and len(a) == len(RUNS)
    for name in a:
        assert a[name]["numerics"]["pinned"] and a[name]["numerics"]["isa"] == "AVX2"
        assert (a[name]["numerics"]["threads"], b[name]["numerics"]["threads"]) == (2, 1)
        assert a[name]["ppl"] == b[name]["ppl"] and a[name]["widths"] == b[name]["widths"]  # the same bits
    code, text = _check(rerun, ref)
    assert code == 0, text
    assert "tolerances for identical arithmetic (both sides ran pinned on" in text
    assert "ppl_sliced: exact" in text and "reproduction check passed" in text


@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.slow  # the planted runs: bench/plants.py in two subprocesses
def test_every_planted_regression_fails_the_exact_check(planted, plant):
    root, _ = planted
    ref, bad = root / "none" / "smoke", root / plant / "smoke"
    a, b = _records(ref), _records(bad)
    assert a.keys() == b.keys()  # the same run names and configs: only the method changed
    changed = [n for n in a if a[n]["ppl"] != b[n]["ppl"]]
    assert changed, f"plant {plant} changed no perplexity"
    code, text = _check(bad, ref)
    assert code == 1 and "reproduction check FAILED" in text
    failed = [line.split(":")[0].strip() for line in text.split("FAILED")[1].splitlines()[1:]]
    # every run whose perplexity moved is named with its perplexity
    for name in changed:
        stem = name.rsplit("-", 1)[0]
        assert any(stem in f and " ppl " in f for f in failed), (plant, name, failed)
    if plant in ("width", "lr"):  # the widths moved, so the parameter count (exact in every regime) moved
        assert any(f.endswith(" params") for f in failed), failed


def _unpinned_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    for path in (dest / "runs").rglob("*.json"):
        rec = read_json(path)
        rec["numerics"] = {**rec["numerics"], "pinned": False, "env": {}}
        write_json(path, rec)
    return dest


@pytest.mark.slow  # the planted runs: bench/plants.py in two subprocesses
def test_different_arithmetic_uses_the_measured_tolerances(planted, tmp_path):
    root, _ = planted
    ref = root / "none" / "smoke"
    other = _unpinned_copy(ref, tmp_path / "other")
    assert repro.arithmetic_keys(other) == {None} and None not in repro.arithmetic_keys(ref)
    rule = repro.regime(ref, other)
    assert rule.name == "different arithmetic" and "recomputed: not pinned" in rule.why
    assert rule.tolerances == repro.measured_tolerances()
    assert str(rule.tolerances["params"]) == "exact"
    # a sliced perplexity moved by half its measured tolerance passes; by twice, fails, naming the tolerance
    tol = rule.tolerances["ppl_sliced"].rel
    assert 0 < tol < 0.1
    path = next((other / "runs").rglob("sp0.30-sb0.10-width-*.json"))
    rec = read_json(path)
    for factor, expected in ((1 + tol / 2, 0), (1 + 2 * tol, 1)):
        write_json(path, {**rec, "ppl": {k: v * factor for k, v in rec["ppl"].items()}})
        code, text = _check(other, ref)
        assert code == expected, text
    assert f"tolerance rel {tol:g} (different arithmetic)" in text


def test_the_measured_noise_record_derives_every_tolerance():
    """The shipped tolerances are the bench's: margin x largest deviation, rounded up; the copy equals the bench's."""
    bench = read_json(ROOT / "bench" / "results" / "numerics_noise.json")
    assert repro.measured_noise() == bench
    tol = bench["tolerances"]
    for q in repro.QUANTITIES:
        t = tol["by_quantity"][q]
        bound = t.get("rel", t.get("abs"))
        need = tol["margin"] * t["largest_seen"]
        assert need * (1 - 1e-9) <= bound <= 10 * need  # rounded up to one digit (float fuzz of 4.0000000000000036)
    # pinned settings gave the same bits for every number; the seed spread is reported beside the noise
    assert all(c["max_deviation_pinned"] == 0 for c in bench["classes"].values())
    assert bench["seed_spread"]["median_rel_sd"] > bench["tolerances"]["by_quantity"]["ppl_sliced"]["largest_seen"]


def test_arithmetic_key_ignores_threads_only_when_pinned():
    base = {
        "pinned": True,
        "isa": "AVX2",
        "threads": 2,
        "blas": "mkl",
        "cpu": {"vendor": "AuthenticAMD", "family": "25", "model": "17"},
    }
    versions = {"torch": "2.13.0", "transformers": "5.25.0"}
    assert arithmetic_key(base, versions) == arithmetic_key({**base, "threads": 1}, versions)
    assert arithmetic_key(base, versions) != arithmetic_key(
        {**base, "cpu": {**base["cpu"], "vendor": "GenuineIntel"}}, versions
    )
    assert arithmetic_key(base, versions) != arithmetic_key(base, {**versions, "torch": "2.14.0"})
    assert arithmetic_key({**base, "pinned": False}, versions) is None
    assert arithmetic_key(None) is None
