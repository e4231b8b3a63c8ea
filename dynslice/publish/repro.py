"""The reproduction check: a fresh results folder against the published reference, number by number.

``headline_numbers`` reads every headline number of a results folder (``<root>/<profile>``): per run record its
perplexities, zero-shot accuracies, parameter count and (automatic SB) chosen SB; per row of ``headline.json`` the
best SB, the % perplexity change and the accuracy points. ``compare`` pairs them with the published values,
``regime`` chooses the tolerances, and ``main`` prints the table and exits non-zero naming every number out of
tolerance.

Slicing is chaotic in the last bits (``bench/results/numerics_noise.json``): a sliced model's perplexity moves by
about 1% between thread counts or SIMD levels, a dense model's by 1e-7. So the tolerances depend on whether both
sides ran the same arithmetic (:mod:`dynslice.experiment.numerics`, recorded in every run record):

* **identical arithmetic** (both sides pinned, same CPU kind, SIMD level, BLAS, torch and transformers): every
  number exact. Measured: pinned runs give the same bits at 1, 2 and 4 threads and under a user's own SIMD
  settings, so any difference is a change of method, data or seed.
* **different arithmetic** (unpinned, another CPU, another BLAS, a GPU, other versions): per quantity, twice the
  largest deviation measured across thread counts, SIMD levels and another machine (``dynslice/measured/
  numerics_noise.json``). Parameter counts stay exact (they are functions of the widths).

``publish`` copies a finished results folder over the published reference (``results/published/<profile>/``) and
its figures over the published figures (``figures/<profile>/``), which is how the reference is regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from dynslice.experiment.numerics import arithmetic_key
from dynslice.store import ownership
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.outputs import atomic_write, dir_mode, umask
from dynslice.store.paths import PROJECT_ROOT

#: Where the published reference of each profile lives: ``results/published/<profile>/`` of the checkout (``None``
#: for an installed package, which carries no results).
PUBLISHED_ROOT = None if PROJECT_ROOT is None else PROJECT_ROOT / "results" / "published"
#: Where the published figures of each profile live: ``figures/<profile>/`` of the checkout, tracked in git so that
#: a paper can include them directly; a run of run_all.sh writes its own under ``figures/runs/<profile>/``.
FIGURES_ROOT = None if PROJECT_ROOT is None else PROJECT_ROOT / "figures"
#: The manifest kinds of a published reference and of its published figures folder.
PUBLISHED_KIND = "published"
FIGURES_KIND = "published-figures"
MARKER = "RUN.json"
#: What a results folder holds (everything a run writes there); ``publish`` copies these.
RESULT_ITEMS = (
    "runs",
    "lr",
    "tables",
    "executed",
    "headline.json",
    "zero_shot.json",
    "summary.json",
    "ablations.json",
    "ablations.partial.json",
    "frontier.json",
    MARKER,
)
#: Notebook 06's record: its summary numbers are checked like the run records' (ablations profile).
ABLATIONS = "ablations.json"
#: Notebook 07's record (frontier profile): its summary numbers are checked the same way.
FRONTIER = "frontier.json"
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
        why = (
            f"{noise['margin']:g} x the largest deviation measured ({seen:.2g})"
            if seen
            else "no measured setting changed it"
        )
        out[q] = Tolerance(float(t.get("abs", 0.0)), float(t.get("rel", 0.0)), why)
    return out


def arithmetic_keys(results: str | Path) -> set[str | None]:
    """The arithmetic keys (:func:`dynslice.experiment.numerics.arithmetic_key`) of every record in a results folder."""
    results = Path(results)
    records = sorted((results / "runs").rglob("*.json")) if (results / "runs").is_dir() else []
    records += [results / name for name in (ABLATIONS, FRONTIER) if (results / name).is_file()]
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
        raise ValueError(
            f"results: {results} has no runs/ folder, no {ABLATIONS} and no {FRONTIER} (not a results folder of "
            "run_all.sh)"
        )
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
    out.update(frontier_numbers(results / FRONTIER))
    head = results / "headline.json"
    for row in read_json(head) if head.is_file() else []:
        label = f"headline {row['model']} cal {row['cal_dataset']} SP {row['sp']:g} {row['comparison']}"
        out[f"{label} best SB"] = ("sb", float(row["best_sb"]))
        for key, value in row.items():
            if value is None:
                continue
            if key.endswith("_change_pct"):
                out[f"{label} {key.removeprefix('ppl_').removesuffix('_change_pct')} ppl change %"] = (
                    "ppl_change_pct",
                    float(value),
                )
            elif key == "acc_delta_points":
                out[f"{label} acc points"] = ("acc_points", float(value))
    return out


def is_results_folder(path: str | Path) -> bool:
    """Whether ``path`` holds sweep run records (``runs/``) or notebook 06's or 07's record."""
    return any((Path(path) / name).exists() for name in ("runs", ABLATIONS, FRONTIER))


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


def frontier_numbers(path: str | Path) -> dict[str, tuple[str, float]]:
    """Notebook 07's summary numbers: the dense perplexities and accuracies, and per method and size the mean
    parameter count and the mean perplexity before and after RFT, plus the first seed's accuracies after RFT;
    empty when ``path`` does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    rec = read_json(path)
    out: dict[str, tuple[str, float]] = {}
    for ds, value in rec["dense"]["ppl"].items():
        out[f"frontier dense ppl {ds}"] = ("ppl_dense", float(value))
    for task, res in (rec["dense"].get("tasks") or {}).items():
        out[f"frontier dense acc {task}"] = ("acc", float(res["value"]))
    for row in rec["summary"]:
        label = f"frontier {row['method']} {row['size']} layers"
        out[f"{label} params"] = ("params", float(row["params"]))
        for stage, by_ds in row["ppl"].items():
            for ds, stats in by_ds.items():
                out[f"{label} ppl {ds} {stage} RFT"] = ("ppl_sliced", float(stats["mean"]))
    first = rec["config"]["seeds"][0]
    for p in rec["points"]:
        if p["seed"] == first:
            for task, res in (p["after"].get("tasks") or {}).items():
                out[f"frontier {p['method']} {p['size']} layers acc {task}"] = ("acc", float(res["value"]))
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


def compare(
    published: Mapping[str, tuple[str, float]],
    recomputed: Mapping[str, tuple[str, float]],
    tolerances: Mapping[str, Tolerance],
) -> list[Row]:
    """Pair the numbers by name: published ones first, in order, then numbers only the recomputed folder has."""
    rows = [
        Row(name, q, v, recomputed[name][1] if name in recomputed else None, tolerances[q])
        for name, (q, v) in published.items()
    ]
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
    cells = [header] + [
        (
            r.name,
            _num(r.published, r.quantity),
            _num(r.recomputed, r.quantity),
            "–" if r.diff is None else f"{r.diff:+.3g}",
            str(r.tolerance),
            r.status,
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


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
        print(
            f"note: {len(new)} numbers are not in the published reference (a changed profile?); publish a "
            "finished run to add them",
            file=out,
        )
    if bad:
        print(
            f"reproduction check FAILED: {len(bad)} of {len(pub)} published numbers out of tolerance or missing:",
            file=out,
        )
        for r in bad:
            why = (
                "missing from the recomputed results"
                if r.status == "MISSING"
                else f"published {_num(r.published, r.quantity)}, recomputed {_num(r.recomputed, r.quantity)}, "
                f"difference {r.diff:+.3g}, tolerance {r.tolerance} ({rule.name})"
            )
            print(f"  {r.name}: {why}", file=out)
        return 1
    print(f"reproduction check passed: all {len(pub)} published numbers within tolerance", file=out)
    return 0


# ------------------------------------------------------------------------------------------------ run markers
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_info(results: str | Path) -> dict | None:
    """``<results>/RUN.json`` when it is a run marker of run_all.sh (a regular file with a run id), else ``None``."""
    marker = Path(results) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        info = read_json(marker, max_bytes=1 << 20)
    except ValueError:
        return None
    ok = (
        isinstance(info, dict)
        and isinstance(info.get("run_id"), str)
        and re.fullmatch(r"[0-9A-Za-z_-]{1,80}", info["run_id"]) is not None
    )
    return info if ok else None


def _check_not_published(results: Path) -> None:
    for ref in [PUBLISHED_ROOT] if PUBLISHED_ROOT is not None else []:
        if ownership.inside(results, ref) or ownership.inside(ref, results):
            raise ValueError(
                f"results: {results} is (or holds) the published reference {ref.resolve()} once links "
                "are resolved; runs write elsewhere (default: results/)"
            )


def published_figure_folders() -> list[Path]:
    """The published figures folders of the checkout (``figures/<profile>/`` holding a manifest of kind
    :data:`FIGURES_KIND`)."""
    if FIGURES_ROOT is None or not FIGURES_ROOT.is_dir():
        return []
    return sorted(
        d
        for d in FIGURES_ROOT.iterdir()
        if d.is_dir() and not d.is_symlink() and ownership.read_manifest(d, FIGURES_KIND) is not None
    )


def _check_not_published_figures(figures: Path) -> None:
    for ref in published_figure_folders():
        if ownership.inside(figures, ref) or ownership.inside(ref, figures):
            raise ValueError(
                f"figures: {figures} is (or holds) the published figures {ref.resolve()} once links are resolved; "
                "runs write their figures elsewhere (default: figures/runs/)"
            )


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def ledger_of(results: str | Path) -> Path:
    """The ledger of the run in ``results`` (``ValueError`` when the folder holds no run of run_all.sh)."""
    info = run_info(results)
    if info is None:
        raise ValueError(f"results: {results} holds no run of run_all.sh (no valid {MARKER})")
    return ownership.ledger_path(Path(results), info["run_id"])


def start_run(results: str | Path, profile: str, *, resume: bool, figures: str | Path | None = None) -> dict:
    """Write (or, with ``resume``, reuse) ``<results>/RUN.json`` and the run's ledger of the files it writes.

    A new run needs an empty (or missing) ``results`` folder and ``figures`` folder; ``resume`` continues only a
    folder holding a run of run_all.sh (its ``RUN.json``). Nothing else is ever taken over.
    """
    results = Path(results)
    figures = Path(figures) if figures is not None else None
    _check_not_published(results)
    if figures is not None:
        _check_not_published_figures(figures)
    marker = results / MARKER
    info = run_info(results)
    if info is None and os.path.lexists(marker):
        raise ValueError(
            f"results: {marker} is not a run marker of run_all.sh; refusing to use {results} (choose another --root)"
        )
    if info is not None:
        if not resume:
            raise ValueError(
                f"results: {results} already holds run {info.get('run_id')} ({info.get('status')}); "
                "pass --resume to continue it, --force to delete it and recompute, or --check-only to "
                "check it"
            )
        ledger = ownership.Ledger.create(
            ownership.ledger_path(results, info["run_id"]),
            {"results": results, **({"figures": figures} if figures else {})},
            guard=bool(info.get("ledger")),
        )
        info = {**info, "status": "running", "resumed": _now()}
        write_json(marker, info)
        ledger.record(marker)
        return info
    busy = _entries(results)
    if busy:
        why = "--resume continues only a run of run_all.sh" if resume else "a new run needs an empty folder"
        raise ValueError(
            f"results: {results} holds {ownership.describe(busy)} but no run of run_all.sh (no "
            f"{MARKER}); {why}: choose another --root, or move these away"
        )
    if figures is not None and _entries(figures):
        raise ValueError(
            f"figures: {figures} holds {ownership.describe(_entries(figures))}, which no run in "
            f"{results} wrote; a new run needs an empty figures folder: choose another --figures, or "
            "move these away"
        )
    info = {
        "run_id": time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:12],
        "profile": profile,
        "started": _now(),
        "status": "running",
        "ledger": True,
    }
    results.mkdir(parents=True, exist_ok=True)
    # The marker is written beside the folder and linked in: it appears complete, and only once (a shard started
    # at the same moment finds it and joins the run).
    fd, staged = tempfile.mkstemp(prefix=f".{results.name[:100]}.RUN.", suffix=".tmp", dir=results.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
        os.chmod(staged, 0o666 & ~umask())
        os.link(staged, marker)
    except FileExistsError:
        if resume:
            return start_run(results, profile, resume=True, figures=figures)
        raise ValueError(f"results: another run started in {results} meanwhile; pass --resume to join it") from None
    finally:
        os.unlink(staged)
    ledger = ownership.Ledger.create(
        ownership.ledger_path(results, info["run_id"]),
        {"results": results, **({"figures": figures} if figures else {})},
    )
    ledger.record(marker)
    return info


def finish_run(results: str | Path) -> None:
    """Mark ``<results>/RUN.json`` finished (all notebooks ran)."""
    marker = Path(results) / MARKER
    info = run_info(results)
    if info is None:
        raise ValueError(f"results: {results} holds no run of run_all.sh (no valid {MARKER})")
    write_json(marker, {**info, "status": "finished", "finished": _now()})
    ledger = ownership.ledger_path(Path(results), info["run_id"])
    if ledger.is_file():
        ownership.Ledger.open(ledger).record(marker)


def clear_run(results: str | Path, figures: str | Path) -> None:
    """Delete what the run in ``results`` (a ``<root>/<profile>`` folder) wrote there and in ``figures``.

    Only files the run's ledger lists with matching bytes are deleted (then the folders left empty). If either
    folder holds anything else (a user's file, a file changed since, a link), nothing is deleted and
    ``ValueError`` names it.
    """
    results, figures = Path(results), Path(figures)
    _check_not_published(results)
    _check_not_published_figures(figures)
    if not _entries(results) and not _entries(figures):
        return
    info = run_info(results)
    if info is None:
        raise ValueError(
            f"results: {results} holds no run of run_all.sh (no valid {MARKER}); --force deletes only "
            "what a run wrote: move the folder's contents away yourself or choose another --root"
        )
    ledger_file = ownership.ledger_path(results, info["run_id"])
    if not ledger_file.is_file() or ledger_file.is_symlink():
        raise ValueError(
            f"results: run {info['run_id']} in {results} was made by a dynslice that did not list the "
            "files it wrote; --force cannot prove them its own: delete the folder yourself or choose "
            "another --root"
        )
    listing = ownership.Ledger.open(ledger_file).listing()
    keep = {MARKER, ledger_file.name}
    extra = ownership.foreign(results, listing.get("results", {}), ignore=keep)
    extra_figs = ownership.foreign(figures, listing.get("figures", {})) if figures.is_dir() else []
    if extra or extra_figs:
        where, names = (results, extra) if extra else (figures, extra_figs)
        raise ValueError(
            f"{'results' if extra else 'figures'}: {where} holds files run {info['run_id']} did not "
            f"write or that changed since ({ownership.describe(names)}); --force deleted nothing: move "
            "them away first"
        )
    if figures.is_dir() and not ownership.inside(figures, results):
        ownership.remove_owned(figures, listing.get("figures", {}), keep_top=True)
    ownership.remove_owned(results, listing.get("results", {}), keep_top=True)
    for name in (MARKER, ledger_file.name):  # the run's own marker and ledger go last
        (results / name).unlink(missing_ok=True)


def _published_listing(dest: Path, kind: str = PUBLISHED_KIND) -> dict[str, list[ownership.Entry]] | None:
    """What a published folder at ``dest`` holds, when dynslice can prove it wrote it: its manifest (of ``kind``),
    or (for a reference published before manifests) a finished run's ``RUN.json`` and nothing but result items."""
    listing = ownership.read_manifest(dest, kind)
    if listing is not None:
        return None if ownership.foreign(dest, listing, ignore=(ownership.MANIFEST,)) else listing
    if kind != PUBLISHED_KIND:
        return None
    info = run_info(dest)
    if info is None or info.get("status") != "finished":
        return None
    if any(name not in (*RESULT_ITEMS, "figures") for name in _entries(dest)):
        return None
    files = ownership.walk_files(dest)
    if any((dest / rel).is_symlink() for rel in files):
        return None
    return {rel: [ownership.fingerprint(dest / rel)] for rel in files}


def _replaceable(dest: Path, kind: str, what: str) -> dict[str, list[ownership.Entry]]:
    """The listing that proves ``dest`` dynslice's to replace (empty for a missing or empty folder);
    ``ValueError`` for anything else."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ValueError(f"{what}: {dest} is a file or a link, not a folder; refusing to replace it")
    if not _entries(dest):
        return {}
    listing = _published_listing(dest, kind)
    if listing is None:
        raise ValueError(
            f"{what}: {dest} is not a {'reference' if kind == PUBLISHED_KIND else 'figures folder'} dynslice "
            f"published (it holds {ownership.describe(_entries(dest))}); refusing to replace it: choose another "
            f"--{what}"
        )
    return listing


def _stage(dest: Path, fill, kind: str) -> Path:
    """A private folder beside ``dest``, filled by ``fill(folder)``, with a manifest of ``kind`` listing it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:100]}.new-", dir=dest.parent))
    try:
        fill(tmp)
        atomic_write(tmp / ownership.MANIFEST, ownership.make_manifest(tmp, kind))
        os.chmod(tmp, dir_mode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def publish(results: str | Path, figures: str | Path, dest: str | Path, figures_dest: str | Path | None = None) -> Path:
    """Replace the published reference ``dest`` by a finished run: ``results`` items, and ``figures/*.pdf`` into
    ``figures_dest`` (a folder of its own, e.g. ``figures/<profile>`` of the checkout) or, when it is ``None``, into
    ``dest/figures``.

    Each copy is assembled in a private folder beside its destination (with a manifest of every file) and renamed
    into place. A destination must be missing, empty or a folder dynslice published (its manifest: kind
    ``published`` for ``dest``, ``published-figures`` for ``figures_dest``); both are checked before either is
    replaced, and again after each is moved aside; anything else is refused and left as it is. Of an old folder
    only its listed files are deleted.
    """
    results, figures, dest = Path(results), Path(figures), Path(dest)
    fig_dest = None if figures_dest is None else Path(figures_dest)
    info = run_info(results)
    if info is None or info.get("status") != "finished":
        raise ValueError(f"results: {results} holds no finished run (see {MARKER}); finish it before publishing")
    places = [("published", dest)] + ([("published-figures", fig_dest)] if fig_dest is not None else [])
    for what, place in places:
        for name, folder in (("results", results), ("figures", figures)):
            if ownership.inside(place, folder) or ownership.inside(folder, place):
                raise ValueError(
                    f"{what}: {place} and the {name} folder {folder} contain one another (links "
                    "resolved); publish to a folder of its own"
                )
    if fig_dest is not None and (ownership.inside(fig_dest, dest) or ownership.inside(dest, fig_dest)):
        raise ValueError(f"published-figures: {fig_dest} and the published reference {dest} contain one another")
    listing = _replaceable(dest, PUBLISHED_KIND, "published")
    fig_listing = _replaceable(fig_dest, FIGURES_KIND, "published-figures") if fig_dest is not None else {}

    def copy_pdfs(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        for pdf in sorted(figures.glob("*.pdf")):
            if pdf.is_file() and not pdf.is_symlink():
                shutil.copy2(pdf, folder / pdf.name)

    def fill_results(tmp: Path) -> None:
        for item in RESULT_ITEMS:
            src = results / item
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, tmp / item, symlinks=True)
            elif src.is_file() and not src.is_symlink():
                shutil.copy2(src, tmp / item)
        if fig_dest is None:
            copy_pdfs(tmp / "figures")

    tmp = _stage(dest, fill_results, PUBLISHED_KIND)
    fig_tmp = None
    if fig_dest is not None:
        try:
            fig_tmp = _stage(fig_dest, copy_pdfs, FIGURES_KIND)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _swap_in(tmp, dest, listing)
    if fig_dest is not None and fig_tmp is not None:
        _swap_in(fig_tmp, fig_dest, fig_listing)
    return dest


def _swap_in(tmp: Path, dest: Path, listing: dict[str, list[ownership.Entry]] | None) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is moved aside, checked against ``listing`` again, and its
    listed files deleted. Anything unexpected: both are kept and ``ValueError`` says where."""
    if not _entries(dest):
        try:
            os.rename(tmp, dest)  # onto nothing, or onto an empty folder
            return
        except OSError:
            raise ValueError(
                f"published: {dest} appeared or filled up meanwhile; kept it, the new reference is at {tmp}"
            ) from None
    old = dest.parent / f".{dest.name[:100]}.old-{uuid.uuid4().hex}"
    dest.rename(old)
    if ownership.foreign(old, listing or {}, ignore=(ownership.MANIFEST,)):
        if not os.path.lexists(dest):
            old.rename(dest)
        raise ValueError(f"published: {dest} changed while publishing; kept it, the new reference is at {tmp}")
    try:
        os.rename(tmp, dest)
    except OSError:
        raise ValueError(
            f"published: {dest} appeared meanwhile; kept it, the old reference is at {old} and the new one at {tmp}"
        ) from None
    ownership.remove_owned(old, listing or {}, extra=(ownership.MANIFEST,))


# --------------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dynslice.publish.repro {check,start,ledger,finish,clear,publish} ...`` (what run_all.sh calls)."""
    ap = argparse.ArgumentParser(prog="python -m dynslice.publish.repro", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compare a results folder with the published reference")
    c.add_argument("results", help="a <root>/<profile> folder")
    c.add_argument("published", help="the published <profile> folder, e.g. results/published/cpu")
    s = sub.add_parser("start", help="write or reuse the run marker")
    s.add_argument("results")
    s.add_argument("profile")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--figures", default=None, help="the run's figures folder (<figures>/<profile>)")
    lg = sub.add_parser("ledger", help="print the path of the run's ledger of written files")
    lg.add_argument("results")
    f = sub.add_parser("finish", help="mark the run finished")
    f.add_argument("results")
    d = sub.add_parser("clear", help="delete a run's outputs")
    d.add_argument("results")
    d.add_argument("figures")
    p = sub.add_parser("publish", help="copy a finished run over the published reference")
    p.add_argument("results")
    p.add_argument("figures")
    p.add_argument("published")
    p.add_argument(
        "--published-figures",
        default=None,
        help="the published figures folder (e.g. figures/<profile>); default: <published>/figures",
    )
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check":
            for name in ("results", "published"):
                if not is_results_folder(getattr(args, name)):
                    raise ValueError(
                        f"{name}: {getattr(args, name)} is not a results folder (no runs/, no {ABLATIONS})"
                    )
            return check(args.results, args.published)
        if args.cmd == "start":
            info = start_run(args.results, args.profile, resume=args.resume, figures=args.figures)
            print(f"== run {info['run_id']} ({'resumed' if 'resumed' in info else 'new'}) in {args.results}")
        elif args.cmd == "ledger":
            print(ledger_of(args.results))
        elif args.cmd == "finish":
            finish_run(args.results)
        elif args.cmd == "clear":
            clear_run(args.results, args.figures)
        else:
            dest = publish(args.results, args.figures, args.published, args.published_figures)
            figs = args.published_figures or Path(dest) / "figures"
            print(f"== published {dest} (figures: {figs})")
    except (ValueError, FileNotFoundError) as e:
        print(f"run_all.sh: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder that cannot be written
        where = f" ({e.filename})" if e.filename else ""
        print(f"run_all.sh: {args.cmd}: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
