"""The documentation states what the measured JSON says, links what exists, and installs what pyproject pins.

Numbers in README.md and docs/*.md that come from a measured JSON carry their source in an HTML comment right after
them (GitHub does not render it)::

    took 69 min<!-- from: results/published/ablations/ablations.json#time_s /60 -->

- The source is a path (a glob is allowed; several files give a list) or ``plan:PROFILE[:SHARDS]``, the output of
  ``dynslice plan --profile PROFILE --shards SHARDS``. ``$name`` expands an alias declared in the same file with
  ``<!-- from-alias: $name = path -->``.
- After ``#`` comes the key path, separated by dots: a dict key, a list index, a slice (``1:``) or a selector
  ``[key=value,...]`` that picks the one list item whose fields match.
- Then any operations, applied in order: ``/X``, ``*X``, ``abs``, ``values`` (a dict's values), ``sum``, ``min``,
  ``max``, ``div:KEYPATH`` (divide by another value of the same file), ``avg_se`` (the standard error of the mean
  of a ``tasks`` dict's accuracies).
- The number before the comment (only units between them, no digits) must equal the value rounded to as many
  decimals as the text shows.

``<!-- quote: SOURCE#KEY -->`` requires the blockquote after it to be that string, and ``<!-- table:
deviations_markdown(SOURCE#KEY) -->`` requires the table after it to be what ``deviations_markdown`` renders from it.
A runtime written in minutes or hours without a source must be on the short list of estimates below.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 160

MARKER = re.compile(r"<!--\s*from:\s*(.+?)\s*-->", re.S)
ALIAS = re.compile(r"<!--\s*from-alias:\s*(\$\w+)\s*=\s*(\S+)\s*-->")
QUOTE = re.compile(r"<!--\s*quote:\s*(\S+)\s*-->\n((?:>.*\n?)+)")
TABLE = re.compile(r"<!--\s*table:\s*deviations_markdown\((\S+)\)\s*-->\n\n?((?:\|.*\n?)+)")
# The number a marker refers to: the last one before it, with at most a unit (no digits) in between.
NUMBER_BEFORE = re.compile(r"([−-]?)(\d+(?:\.\d+)?)([^\d<>]{0,16})$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
RUNTIME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?(?:[–-]\d+(?:\.\d+)?)?)\s?(min|h)\b(?!-)")
# Runtimes stated without a JSON behind them, on purpose: estimates that say so where they stand.
UNMEASURED_RUNTIMES = {
    "1-2 min",  # the smoke profile: an estimate (README and docs/reproducing.md say so)
    "20 min",  # quoted from the profile YAMLs' comments, named there as an older estimate (docs/reproducing.md)
}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _aliases(text: str) -> dict[str, str]:
    return dict(ALIAS.findall(text))


def _split_spec(spec: str) -> list[str]:
    """Split on whitespace outside brackets (a selector's values may hold spaces)."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch.isspace() and depth == 0:
            if cur:
                parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + ([cur] if cur else [])


def _split_keys(key: str) -> list[str]:
    return [k for k in re.split(r"\.(?![^\[]*\])", key) if k != ""]


def _same(field: Any, wanted: str) -> bool:
    if str(field) == wanted or (field is None and wanted in ("None", "null")):
        return True
    try:
        return float(field) == float(wanted)
    except (TypeError, ValueError):
        return False


def _walk(value: Any, key: str) -> Any:
    parts = _split_keys(key)
    while parts:
        part = parts.pop(0)
        while isinstance(value, dict) and part not in value and parts:  # a key holding dots: constant_sp0.3
            part += "." + parts.pop(0)
        if part.startswith("[") and part.endswith("]"):
            conds = [c.split("=", 1) for c in part[1:-1].split(",")]
            hits = [x for x in value if all(_same(x.get(k), v) for k, v in conds)]
            assert len(hits) == 1, f"selector {part} matches {len(hits)} items"
            value = hits[0]
        elif re.fullmatch(r"-?\d*:-?\d*", part):
            lo, hi = (int(x) if x else None for x in part.split(":"))
            value = value[lo:hi]
        elif isinstance(value, list):
            value = value[int(part)]
        else:
            value = value[part]
    return value


@functools.cache
def _plan(profile: str, shards: int) -> dict[str, Any]:
    from dynslice.scale.cost import profile_plan

    return profile_plan(profile, shards=shards)


def _load(source: str) -> list[Any]:
    """The JSON documents of a source: one per file its glob matches, or a profile's plan."""
    if source.startswith("plan:"):
        _, profile, *shards = source.split(":")
        return [_plan(profile, int(shards[0]) if shards else 1)]
    files = sorted(glob.glob(str(ROOT / source)))
    assert files, f"{source}: no such file"
    return [json.loads(Path(f).read_text(encoding="utf-8")) for f in files]


def _resolve(spec: str, aliases: dict[str, str]) -> float | str:
    for name, path in aliases.items():
        spec = spec.replace(name, path)
    head, *ops = _split_spec(spec)
    source, _, key = head.partition("#")
    docs = _load(source)
    doc = docs[0]
    value = [_walk(d, key) for d in docs] if len(docs) > 1 else _walk(doc, key)
    for op in ops:
        if op == "values":  # a dict's values, or every value of a list of dicts, as one list
            value = [v for d in (value if isinstance(value, list) else [value]) for v in d.values()]
        elif op in ("sum", "min", "max"):
            value = {"sum": sum, "min": min, "max": max}[op](value)
        elif op == "abs":
            value = abs(value)
        elif op == "avg_se":
            ses = [t["stderr"] for name, t in value.items() if name != "average"]
            value = math.sqrt(sum(s * s for s in ses)) / len(ses)
        elif op.startswith("div:"):
            value = value / _walk(doc, op[4:])
        elif op[0] in "*/":
            factor = float(op[1:])
            value = value * factor if op[0] == "*" else value / factor
        else:
            raise AssertionError(f"unknown operation {op!r} in {spec!r}")
    return value


def _markers() -> list[tuple[str, int, str, str, dict[str, str]]]:
    """(page, line, stated number, spec, aliases) for every marker."""
    out = []
    for page in PAGES:
        text = _text(page)
        aliases = _aliases(text)
        for m in MARKER.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = NUMBER_BEFORE.search(text[max(0, m.start() - 40) : m.start()])
            stated = (before.group(1) + before.group(2)).replace("−", "-") if before else ""
            out.append((_rel(page), line, stated, m.group(1), aliases))
    return out


MARKERS = _markers()


def test_the_pages_carry_their_sources():
    """Guards the test itself: the markers are there, in the README and in each page that states numbers."""
    pages = {page for page, *_ in MARKERS}
    assert len(MARKERS) >= 150, len(MARKERS)
    for page in ("README.md", "docs/reproducing.md", "docs/results-cpu.md", "docs/memory-and-scale.md"):
        assert page in pages, page


@pytest.mark.parametrize(
    ("page", "line", "stated", "spec", "aliases"), MARKERS, ids=[f"{p}:{n}" for p, n, *_ in MARKERS]
)
def test_stated_number_matches_its_json(page, line, stated, spec, aliases):
    assert stated, f"{page}:{line}: no number right before the marker {spec!r}"
    value = _resolve(spec, aliases)
    assert isinstance(value, int | float), f"{page}:{line}: {spec!r} is {value!r}, not a number"
    decimals = len(stated.partition(".")[2])
    tolerance = 0.5 * 10**-decimals * (1 + 1e-9) + 1e-12
    assert abs(float(stated) - value) <= tolerance, (
        f"{page}:{line}: the text says {stated} but {spec} is {value:.{decimals + 3}f} "
        f"(rounded: {value:.{decimals}f}); update the text"
    )


def test_quoted_text_is_the_records_own():
    quotes = [(page, m) for page in PAGES for m in QUOTE.finditer(_text(page))]
    assert quotes, "no <!-- quote: --> block found"
    for page, m in quotes:
        quoted = " ".join(line.lstrip(">").strip() for line in m.group(2).splitlines())
        source = _resolve(m.group(1), _aliases(_text(page)))
        assert " ".join(quoted.split()) == " ".join(str(source).split()), f"{_rel(page)}: the quote of {m.group(1)}"


def test_deviations_table_is_rendered_from_its_json():
    from dynslice.experiment.protocol import deviations_markdown

    tables = [(page, m) for page in PAGES for m in TABLE.finditer(_text(page))]
    assert tables, "no <!-- table: deviations_markdown(...) --> block found"
    for page, m in tables:
        effects = _resolve(m.group(1), _aliases(_text(page)))
        assert m.group(2).strip() == deviations_markdown(effects).strip(), f"{_rel(page)}: the deviations table"


def test_every_runtime_has_a_source():
    """A runtime in minutes or hours is either followed by its marker or is a named estimate."""
    loose = []
    for page in PAGES:
        text = _text(page)
        for m in RUNTIME.finditer(text):
            phrase = f"{m.group(1)} {m.group(2)}"
            if text[m.end() : m.end() + 4] == "<!--" or phrase in UNMEASURED_RUNTIMES:
                continue
            loose.append(f"{_rel(page)}:{text.count(chr(10), 0, m.start()) + 1}: {phrase}")
    assert not loose, "runtimes without a measured source: " + "; ".join(loose)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_relative_links_point_at_files():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_text(page)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target}")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+\s+(.*)$", _text(dest), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{_rel(page)}: {target} (no such heading)")
    assert not broken, broken


def test_readme_is_short_and_links_every_page():
    text = _text(README)
    assert len(text.splitlines()) <= README_MAX_LINES
    for page in DOCS:
        assert f"({_rel(page)})" in text, f"README does not link {_rel(page)}"
    for folder in sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder in ("build", "dist") or folder.endswith(".egg-info"):
            continue
        assert f"`{folder}/`" in text, f"README does not explain the top-level folder {folder}/"


def test_paper_profile_comment_matches_the_plan():
    comment = (ROOT / "dynslice/experiment/profiles/paper.yaml").read_text(encoding="utf-8")
    stated = re.search(r"about (\d+) GPU-hours", comment)
    assert stated, "paper.yaml no longer states its predicted GPU-hours"
    assert int(stated.group(1)) == round(_plan("paper", 1)["device_hours"])


# ------------------------------------------------------------------------------------------------- the install
def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _env_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1
    return [str(p) for p in pips[0]]


def test_environment_yml_names_the_pyproject_pins():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = _pyproject()["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    python = [str(d) for d in env["dependencies"] if isinstance(d, str) and re.match(r"python\b", str(d))]
    assert len(python) == 1, python
    assert Version(python[0].split("=")[-1]) in SpecifierSet(project["requires-python"])

    torch_pins = [Requirement(p) for p in _env_pip() if p.startswith("torch")]
    assert len(torch_pins) == 1 and str(torch_pins[0].specifier).startswith("=="), torch_pins
    pinned = Version(str(torch_pins[0].specifier)[2:])
    declared = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch")
    assert pinned in declared.specifier, (pinned, declared)
    run_all = re.search(r'TORCH_CPU_PIN="torch==([\d.]+)"', (ROOT / "run_all.sh").read_text(encoding="utf-8"))
    assert run_all and Version(run_all.group(1)) == pinned, "run_all.sh pins another torch"
    assert f"torch=={pinned}" in _text(README), "the README installs another torch"

    editable = [p for p in _env_pip() if p.startswith("-e")]
    assert editable == ["-e .[dev]"], editable
    assert "dev" in project["optional-dependencies"]
    assert any(p.startswith("--extra-index-url https://download.pytorch.org/whl/cpu") for p in _env_pip())
