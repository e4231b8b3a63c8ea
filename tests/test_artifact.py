"""The reproducible artifact end to end: ./run_all.sh on the smoke profile, into temporary roots.

Checks that every notebook executes under papermill, that every run record validates against the JSON schema,
that the tables agree with the records, that a second run skips finished work, and that a failing notebook makes
run_all.sh exit non-zero naming the notebook and the cell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import nbformat
import pytest

from dynslice.jsonio import read_json
from dynslice.paths import PROJECT_ROOT
from dynslice.sweep import load_profile, sweep_configs

NOTEBOOKS = ["01_layer_redundancy", "02_allocation", "03_slicing_sweep", "04_zero_shot", "05_paper_tables"]
FIGURES = ["fig1_allocation", "headline", "lr_per_layer", "ppl_vs_params", "ppl_vs_sb", "zero_shot"]
TABLES = ["auto_sb", "headline", "lr_agreement", "sweep", "zero_shot"]
SCHEMA = PROJECT_ROOT / "dynslice" / "schema" / "run_record.schema.json"

pytestmark = pytest.mark.slow


def run_all(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNSLICE_PYTHON": sys.executable}
    return subprocess.run([str(PROJECT_ROOT / "run_all.sh"), *args], cwd=PROJECT_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("artifact")
    root, figures = base / "results", base / "figures"
    proc = run_all("--profile", "smoke", "--root", str(root), "--figures", str(figures))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "smoke", figures / "smoke", proc


def test_sources_have_parameters_and_no_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(PROJECT_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        for var in ('profile = "cpu"', 'root = "results"', 'figures = "figures"', "force = False"):
            assert var in tagged[0].source, (name, var)
        assert nb.cells[0].cell_type == "markdown"
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, name


def test_every_notebook_executes(smoke):
    results, figures, proc = smoke
    for name in NOTEBOOKS:
        nb = nbformat.read(results / "executed" / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), name
        assert not any(o.get("output_type") == "error" for c in code for o in c.outputs), name
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert 'profile = "smoke"' in injected[0].source
    assert "total time" in proc.stdout
    for name in FIGURES:
        pdf = (figures / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf, name  # TrueType fonts embedded (fonttype 42)
        assert str(figures / f"{name}.pdf") in proc.stdout
    for name in TABLES:
        assert (results / "tables" / f"{name}.md").read_text().count("|") > 10
        assert (results / "tables" / f"{name}.tex").read_text().startswith(r"\begin{table}")
    # the source notebooks were not touched by the run
    assert all(nbformat.read(PROJECT_ROOT / "notebooks" / f"{n}.ipynb", as_version=4).cells[2].outputs == []
               for n in NOTEBOOKS)


def test_records_validate_against_schema(smoke):
    results, _, _ = smoke
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    records = sorted((results / "runs").rglob("*.json"))
    assert len(records) >= 10
    for path in records:
        errors = [e.message for e in validator.iter_errors(read_json(path))]
        assert not errors, (path.name, errors[:3])
    broken = read_json(records[0])
    broken["params"]["total"] = -1
    assert list(validator.iter_errors(broken))


def test_headline_matches_records(smoke):
    """The headline's % change recomputed directly from the run JSON files."""
    results, _, _ = smoke
    recs = [read_json(p) for p in (results / "runs").rglob("*.json")]
    const = next(r for r in recs if r["config"]["sp"] == 0.3 and r["config"]["sb"] == 0.3)
    for row in read_json(results / "headline.json"):
        budget = "width" if row["comparison"].startswith("equal mean width") else "params"
        dyn = [r for r in recs if r["config"]["budget"] == budget and r["config"]["sb"] not in ("auto", 0.3)
               and r["config"]["sp"] == 0.3 and not r["config"]["tasks"]]
        best = min(dyn, key=lambda r: (r["ppl"]["wiki"], -r["config"]["sb"]))
        assert row["best_sb"] == best["config"]["sb"]
        assert row["ppl_wiki_change_pct"] == pytest.approx(100 * (best["ppl"]["wiki"] / const["ppl"]["wiki"] - 1))
        assert row["params_dynamic"] == best["params"]["total"]


def test_rerun_skips_finished_work(smoke):
    results, figures, _ = smoke
    runs = sorted((results / "runs").rglob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in runs}
    proc = run_all("--profile", "smoke", "--root", str(results.parent), "--figures", str(figures.parent),
                   "--only", "03")
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_sweep = len(sweep_configs(load_profile("smoke")))  # the best-SB zero-shot runs are notebook 04's
    assert f"ran 0, skipped {n_sweep} already finished" in proc.stdout
    assert "03_slicing_sweep" in proc.stdout and "01_layer_redundancy" not in proc.stdout
    assert before == {p: p.stat().st_mtime_ns for p in sorted((results / "runs").rglob("*.json"))}


def test_failing_notebook_is_named(tmp_path):
    profile = tmp_path / "broken.yaml"
    profile.write_text("name: broken\nmodels: [{spec: /nonexistent/model/folder}]\ncal_datasets: [wiki]\n"
                       "sp: [0.3]\n")
    proc = run_all("--profile", str(profile), "--root", str(tmp_path / "r"), "--figures", str(tmp_path / "f"),
                   "--only", "01")
    assert proc.returncode != 0
    assert "FAILED in 01_layer_redundancy.ipynb, cell [" in proc.stderr
    assert "compute_lr_for_profile" in proc.stderr  # the failing cell's source
    assert "FileNotFoundError" in proc.stderr
    assert (tmp_path / "r" / "broken" / "executed" / "01_layer_redundancy.ipynb").is_file()


def test_unknown_option_and_profile(tmp_path):
    proc = run_all("--bogus")
    assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr
    proc = run_all("--profile", "nope", "--root", str(tmp_path / "r"), "--figures", str(tmp_path / "f"))
    assert proc.returncode != 0 and "profile: 'nope'" in proc.stderr
