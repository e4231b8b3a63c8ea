"""The reproduction check: a fresh results folder against the published reference, number by number.

``headline_numbers`` reads every headline number of a results folder (``<root>/<profile>``): per run record its
perplexities, zero-shot accuracies, parameter count and (automatic SB) chosen SB; per row of ``headline.json`` the
best SB, the % perplexity change and the accuracy points. ``compare`` pairs them with the published values,
``regime`` chooses the tolerances, and ``main`` prints the table and exits non-zero naming every number out of
tolerance.

Slicing is chaotic in the last bits (``bench/results/numerics_noise.json``): a sliced model's perplexity moves by
about 1% between thread counts or SIMD levels, a dense model's by 1e-7. So the tolerances depend on whether both
sides ran the same arithmetic (:mod:`dynslice.numerics`, recorded in every run record):

* **identical arithmetic** (both sides pinned, same CPU kind, SIMD level, BLAS, torch and transformers): every
  number exact. Measured: pinned runs give the same bits at 1, 2 and 4 threads and under a user's own SIMD
  settings, so any difference is a change of method, data or seed.
* **different arithmetic** (unpinned, another CPU, another BLAS, a GPU, other versions): per quantity, twice the
  largest deviation measured across thread counts, SIMD levels and another machine (``dynslice/measured/
  numerics_noise.json``). Parameter counts stay exact (they are functions of the widths).

``publish`` copies a finished results folder (and its figures) over the published reference, which is how the
reference is regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from dynslice.jsonio import read_json, write_json
from dynslice.numerics import arithmetic_key
from dynslice.paths import PROJECT_ROOT

#: Where the published reference of each profile lives: ``results/published/<profile>/`` of the checkout (``None``
#: for an installed package, which carries no results).
PUBLISHED_ROOT = None if PROJECT_ROOT is None else PROJECT_ROOT / "results" / "published"
MARKER = "RUN.json"
#: What a results folder holds (everything a run writes there); ``publish`` copies these.
RESULT_ITEMS = ("runs", "lr", "tables", "executed", "headline.json", "zero_shot.json", "summary.json",
                "ablations.json", "ablations.partial.json", MARKER)
#: Notebook 06's record: its summary numbers are checked like the run records' (ablations profile).
ABLATIONS = "ablations.json"
#: The measured noise (a copy of ``bench/results/numerics_noise.json``), read for the different-arithmetic regime.
NOISE = "numerics_noise.json"
#: The quantities of the check.
QUANTITIES = ("ppl_sliced", "ppl_dense", "ppl_change_pct", "acc", "acc_points", "params", "sb")


@dataclass(frozen=True)
class Tolerance:
    """``|recomputed - published| <= abs + rel·|published|``; ``why`` is printed with the check."""

    abs: float
    rel: float
    why: str

    def ok(self, published: float, recomputed: float) -> bool:
        return abs(recomputed - published) <= self.abs + self.rel * abs(published)

    def __str__(self) -> str:
        if self.abs == 0 and self.rel == 0:
            return "exact"
        return f"rel {self.rel:g}" if self.rel else f"abs {self.abs:g}"


@dataclass(frozen=True)
class Regime:
    """The tolerances of one check and the reason they apply."""

    name: str
    why: str
    tolerances: Mapping[str, Tolerance]


@lru_cache(maxsize=1)
def measured_noise() -> dict:
    """The measured noise record shipped with the package (``dynslice/measured/numerics_noise.json``)."""
    return json.loads(resources.files("dynslice.measured").joinpath(NOISE).read_text(encoding="utf-8"))


def identical_tolerances() -> dict[str, Tolerance]:
    """Every number exact: the same pinned arithmetic gives the same bits (measured, see :func:`measured_noise`)."""
    return {q: Tolerance(0.0, 0.0, "same pinned arithmetic: same bits") for q in QUANTITIES}


def measured_tolerances() -> dict[str, Tolerance]:
    """Per quantity, the measured tolerance of ``numerics_noise.json``: its margin x the largest deviation seen."""
    noise = measured_noise()["tolerances"]
    out = {}
    for q in QUANTITIES:
        t = noise["by_quantity"][q]
        seen = t["largest_seen"]
        why = (f"{noise['margin']:g} x the largest deviation measured ({seen:.2g})" if seen else
               "no measured setting changed it")
        out[q] = Tolerance(float(t.get("abs", 0.0)), float(t.get("rel", 0.0)), why)
    return out


def arithmetic_keys(results: str | Path) -> set[str | None]:
    """The arithmetic keys (:func:`dynslice.numerics.arithmetic_key`) of every record in a results folder."""
    results = Path(results)
    records = sorted((results / "runs").rglob("*.json")) if (results / "runs").is_dir() else []
    if (results / ABLATIONS).is_file():
        records.append(results / ABLATIONS)
    keys = set()
    for path in records:
        rec = read_json(path)
        keys.add(arithmetic_key(rec.get("numerics"), rec.get("versions")))
    return keys


def regime(published: str | Path, recomputed: str | Path) -> Regime:
    """Exact where both folders ran one and the same pinned arithmetic; the measured tolerances otherwise."""
    pub, rec = arithmetic_keys(published), arithmetic_keys(recomputed)
    if len(pub) == 1 and pub == rec and None not in pub:
        return Regime("identical arithmetic", f"both sides ran pinned on {next(iter(pub))}", identical_tolerances())

    def say(keys: set[str | None]) -> str:
        named = sorted(k for k in keys if k is not None)
        parts = ([f"pinned on {' | '.join(named)}"] if named else []) + (["not pinned"] if None in keys else [])
        return " and ".join(parts) or "no records"

    return Regime("different arithmetic", f"published: {say(pub)}; recomputed: {say(rec)}", measured_tolerances())


# ------------------------------------------------------------------------------------------------ the numbers
def _run_label(path: Path, runs_dir: Path) -> str:
    """``<model-slug>/<readable run name>``: the record's path without the config hash (stable across versions)."""
    rel = path.relative_to(runs_dir).with_suffix("")
    return str(rel.parent / re.sub(r"-[0-9a-f]{12}$", "", rel.name))


def headline_numbers(results: str | Path) -> dict[str, tuple[str, float]]:
    """Every headline number of ``results`` (a ``<root>/<profile>`` folder): ``name -> (quantity, value)``.

    Works on any subset of runs: it reads whatever records and ``headline.json`` the folder holds.
    """
    results = Path(results)
    runs = results / "runs"
    if not is_results_folder(results):
        raise ValueError(f"results: {results} has no runs/ folder and no {ABLATIONS} (not a results folder of "
                         "run_all.sh)")
    out: dict[str, tuple[str, float]] = {}
    for path in sorted(runs.rglob("*.json")) if runs.is_dir() else []:
        rec = read_json(path)
        label = _run_label(path, runs)
        ppl = "ppl_dense" if not rec.get("config", {}).get("sp") else "ppl_sliced"
        for ds, value in rec.get("ppl", {}).items():
            out[f"{label} ppl {ds}"] = (ppl, float(value))
        for task, res in (rec.get("tasks") or {}).items():
            out[f"{label} acc {task}"] = ("acc", float(res["value"]))
        out[f"{label} params"] = ("params", float(rec["params"]["total"]))
        if rec.get("config", {}).get("sb") == "auto":
            out[f"{label} chosen SB"] = ("sb", float(rec["sb"]))
    out.update(ablation_numbers(results / ABLATIONS))
    head = results / "headline.json"
    for row in read_json(head) if head.is_file() else []:
        label = f"headline {row['model']} cal {row['cal_dataset']} SP {row['sp']:g} {row['comparison']}"
        out[f"{label} best SB"] = ("sb", float(row["best_sb"]))
        for key, value in row.items():
            if value is None:
                continue
            if key.endswith("_change_pct"):
                out[f"{label} {key.removeprefix('ppl_').removesuffix('_change_pct')} ppl change %"] = \
                    ("ppl_change_pct", float(value))
            elif key == "acc_delta_points":
                out[f"{label} acc points"] = ("acc_points", float(value))
    return out


def is_results_folder(path: str | Path) -> bool:
    """Whether ``path`` holds sweep run records (``runs/``) or notebook 06's record."""
    return (Path(path) / "runs").is_dir() or (Path(path) / ABLATIONS).is_file()


def ablation_numbers(path: str | Path) -> dict[str, tuple[str, float]]:
    """Notebook 06's summary numbers (mean perplexity, mean parameter count and accuracy per method row);
    empty when ``path`` does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[str, tuple[str, float]] = {}
    for row in read_json(path)["summary"]:
        label = f"ablations {row['method']}" + ("" if row["sp"] is None else f" SP {row['sp']:g} {row['budget']}")
        ppl = "ppl_dense" if row["method"] == "dense" else "ppl_sliced"
        for ds, stats in row["ppl"].items():
            out[f"{label} ppl {ds}"] = (ppl, float(stats["mean"]))
        out[f"{label} params"] = ("params", float(row["params"]))
        for task, res in (row.get("tasks") or {}).items():
            out[f"{label} acc {task}"] = ("acc", float(res["value"]))
    return out


@dataclass(frozen=True)
class Row:
    """One number of the check."""

    name: str
    quantity: str
    published: float | None
    recomputed: float | None
    tolerance: Tolerance

    @property
    def diff(self) -> float | None:
        if self.published is None or self.recomputed is None:
            return None
        return self.recomputed - self.published

    @property
    def status(self) -> str:
        if self.recomputed is None:
            return "MISSING"
        if self.published is None:
            return "new"
        return "ok" if self.tolerance.ok(self.published, self.recomputed) else "FAIL"


def compare(published: Mapping[str, tuple[str, float]], recomputed: Mapping[str, tuple[str, float]],
            tolerances: Mapping[str, Tolerance]) -> list[Row]:
    """Pair the numbers by name: published ones first, in order, then numbers only the recomputed folder has."""
    rows = [Row(name, q, v, recomputed[name][1] if name in recomputed else None, tolerances[q])
            for name, (q, v) in published.items()]
    rows += [Row(name, q, None, v, tolerances[q]) for name, (q, v) in recomputed.items() if name not in published]
    return rows


def _num(value: float | None, quantity: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if quantity == "params":
        return f"{value:,.0f}"
    return f"{value:.6g}"


def format_rows(rows: Sequence[Row]) -> str:
    """The check as a fixed-width text table."""
    header = ("number", "published", "recomputed", "difference", "tolerance", "")
    cells = [header] + [(r.name, _num(r.published, r.quantity), _num(r.recomputed, r.quantity),
                         "–" if r.diff is None else f"{r.diff:+.3g}", str(r.tolerance), r.status)
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() for row in cells)


def check(results: str | Path, published: str | Path, *, out=None) -> int:
    """Print the check of ``results`` against ``published`` (to ``out``, default: the current ``sys.stdout``); return
    0, or 1 when a number fails or is missing."""
    out = sys.stdout if out is None else out
    pub = headline_numbers(published)
    rule = regime(published, results)
    rows = compare(pub, headline_numbers(results), rule.tolerances)
    print(f"== reproduction check: {results}\n   against the published reference {published}", file=out)
    print(format_rows(rows), file=out)
    print(f"tolerances for {rule.name} ({rule.why}):", file=out)
    for q, t in rule.tolerances.items():
        print(f"  {q}: {t} ({t.why})", file=out)
    bad = [r for r in rows if r.status in ("FAIL", "MISSING")]
    new = [r for r in rows if r.status == "new"]
    if new:
        print(f"note: {len(new)} numbers are not in the published reference (a changed profile?); publish a "
              "finished run to add them", file=out)
    if bad:
        print(f"reproduction check FAILED: {len(bad)} of {len(pub)} published numbers out of tolerance or missing:",
              file=out)
        for r in bad:
            why = "missing from the recomputed results" if r.status == "MISSING" else \
                f"published {_num(r.published, r.quantity)}, recomputed {_num(r.recomputed, r.quantity)}, " \
                f"difference {r.diff:+.3g}, tolerance {r.tolerance} ({rule.name})"
            print(f"  {r.name}: {why}", file=out)
        return 1
    print(f"reproduction check passed: all {len(pub)} published numbers within tolerance", file=out)
    return 0


# ------------------------------------------------------------------------------------------------ run markers
def start_run(results: str | Path, profile: str, *, resume: bool) -> dict:
    """Write (or, with ``resume``, reuse) ``<results>/RUN.json``; refuse to mix a new run into an old folder."""
    results = Path(results)
    marker = results / MARKER
    if marker.is_file():
        old = read_json(marker)
        if resume:
            info = {**old, "status": "running", "resumed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_json(marker, info)
            return info
        raise ValueError(f"results: {results} already holds run {old.get('run_id')} ({old.get('status')}); pass "
                         "--resume to continue it, --force to delete it and recompute, or --check-only to check it")
    if any((results / item).exists() for item in ("runs", "lr")) and not resume:
        raise ValueError(f"results: {results} holds results of no run_all.sh run; pass --resume to reuse them or "
                         "--force to delete them and recompute")
    info = {"run_id": time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], "profile": profile,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running"}
    if any((results / item).exists() for item in ("runs", "lr")):
        info["resumed"] = info["started"]  # --resume over records this run did not compute: say so
        info["note"] = "reused the run records already in the folder"
    write_json(marker, info)
    return info


def finish_run(results: str | Path) -> None:
    """Mark ``<results>/RUN.json`` finished (all notebooks ran)."""
    marker = Path(results) / MARKER
    write_json(marker, {**read_json(marker), "status": "finished",
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def clear_run(results: str | Path, figures: str | Path) -> None:
    """Delete what a run writes in ``results`` (a ``<root>/<profile>`` folder) and its figure PDFs."""
    results = Path(results)
    for item in RESULT_ITEMS:
        p = results / item
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for pdf in Path(figures).glob("*.pdf"):
        pdf.unlink()


def publish(results: str | Path, figures: str | Path, dest: str | Path) -> Path:
    """Replace the published reference ``dest`` by a finished run: ``results`` items plus ``figures/*.pdf``.

    The copy is assembled next to ``dest`` and swapped in with renames, so ``dest`` is never half-written.
    """
    results, figures, dest = Path(results), Path(figures), Path(dest)
    marker = results / MARKER
    if not marker.is_file() or read_json(marker).get("status") != "finished":
        raise ValueError(f"results: {results} holds no finished run (see {MARKER}); finish it before publishing")
    if dest.resolve() == results.resolve():
        raise ValueError(f"dest: {dest} is the results folder itself")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for item in RESULT_ITEMS:
        src = results / item
        if src.is_dir():
            shutil.copytree(src, tmp / item)
        elif src.is_file():
            shutil.copy2(src, tmp / item)
    (tmp / "figures").mkdir()
    for pdf in sorted(figures.glob("*.pdf")):
        shutil.copy2(pdf, tmp / "figures" / pdf.name)
    old = dest.parent / f".{dest.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dynslice.repro {check,start,finish,clear,publish} ...`` (what run_all.sh calls)."""
    ap = argparse.ArgumentParser(prog="python -m dynslice.repro", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compare a results folder with the published reference")
    c.add_argument("results", help="a <root>/<profile> folder")
    c.add_argument("published", help="the published <profile> folder, e.g. results/published/cpu")
    s = sub.add_parser("start", help="write or reuse the run marker")
    s.add_argument("results")
    s.add_argument("profile")
    s.add_argument("--resume", action="store_true")
    f = sub.add_parser("finish", help="mark the run finished")
    f.add_argument("results")
    d = sub.add_parser("clear", help="delete a run's outputs")
    d.add_argument("results")
    d.add_argument("figures")
    p = sub.add_parser("publish", help="copy a finished run over the published reference")
    p.add_argument("results")
    p.add_argument("figures")
    p.add_argument("published")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check":
            for name in ("results", "published"):
                if not is_results_folder(getattr(args, name)):
                    raise ValueError(f"{name}: {getattr(args, name)} is not a results folder (no runs/, no "
                                     f"{ABLATIONS})")
            return check(args.results, args.published)
        if args.cmd == "start":
            info = start_run(args.results, args.profile, resume=args.resume)
            print(f"== run {info['run_id']} ({'resumed' if 'resumed' in info else 'new'}) in {args.results}")
        elif args.cmd == "finish":
            finish_run(args.results)
        elif args.cmd == "clear":
            clear_run(args.results, args.figures)
        else:
            print(f"== published {publish(args.results, args.figures, args.published)}")
    except ValueError as e:
        print(f"run_all.sh: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
