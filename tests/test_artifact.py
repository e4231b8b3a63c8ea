"""The reproducible artifact end to end: ./run_all.sh on the smoke profile, into temporary roots.

Checks that every notebook executes under papermill with inline figures and generated Markdown, that every run
record validates against the JSON schema, that the tables agree with the records, that an interrupted run resumes
and a finished one is not silently reused, that the reproduction check passes on identical numbers and fails
naming a changed one, that --publish makes a run the reference, and that a failing notebook makes run_all.sh exit
non-zero naming the notebook and the cell.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nbformat
import pytest

from dynslice.experiment.profiles import load_profile, sweep_configs
from dynslice.store.jsonio import read_json
from dynslice.store.paths import PROJECT_ROOT

NOTEBOOKS = sorted(p.stem for p in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURES = ["fig1_allocation", "headline", "lr_per_layer", "ppl_vs_params", "ppl_vs_sb", "zero_shot", "ablations"]
TABLES = ["auto_sb", "headline", "lr_agreement", "sweep", "zero_shot", "ablations"]
SCHEMA = PROJECT_ROOT / "dynslice" / "schema" / "run_record.schema.json"
PUBLISHED_CPU = PROJECT_ROOT / "results" / "published" / "cpu"


def run_all(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNSLICE_PYTHON": sys.executable}
    return subprocess.run(
        [str(PROJECT_ROOT / "run_all.sh"), *args],
        cwd=PROJECT_ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke profile through ./run_all.sh (papermill, pinned): the slow tier's tests of the artifact itself."""
    base = tmp_path_factory.mktemp("artifact")
    root, figures = base / "results", base / "figures"
    proc = run_all("--profile", "smoke", "--root", str(root), "--figures", str(figures))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "smoke", figures / "smoke", proc


@pytest.fixture(params=["in_process", pytest.param("run_all", marks=pytest.mark.slow)])
def smoke_results(request) -> Path:
    """The results folder of a smoke run: the session's in-process run (fast tier), or run_all.sh's (slow tier)."""
    if request.param == "in_process":
        return request.getfixturevalue("smoke_run")[0]
    return request.getfixturevalue("smoke")[0]


@pytest.mark.slow
def test_run_all_pins_the_arithmetic_of_a_pinned_profile(smoke):
    """smoke declares ``numerics: pinned``: run_all.sh exports the pins, and every record says it ran pinned."""
    results, _, proc = smoke
    assert "== numerics: pinned (ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT ONEDNN_MAX_CPU_ISA=AVX2)" in proc.stdout
    records = [read_json(p) for p in sorted((results / "runs").rglob("*.json"))]
    assert records and all(r["numerics"]["pinned"] and r["numerics"]["isa"] == "AVX2" for r in records)
    assert len({json.dumps(r["numerics"]["cpu"], sort_keys=True) for r in records}) == 1


def test_sources_have_parameters_and_no_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(PROJECT_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        for var in ('profile = "cpu"', 'root = "results"', 'figures = "figures/runs"', "force = False"):
            assert var in tagged[0].source, (name, var)
        assert nb.cells[0].cell_type == "markdown"
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, name


def _outputs(nb, kind: str) -> list:
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if (o.get("output_type") == "stream" if kind == "stream" else kind in o.get("data", {}))
    ]


@pytest.mark.slow
def test_every_notebook_executes(smoke):
    results, figures, proc = smoke
    for name in NOTEBOOKS:
        nb = nbformat.read(results / "executed" / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), name
        assert not any(o.get("output_type") == "error" for c in code for o in c.outputs), name
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert 'profile = "smoke"' in injected[0].source
        # figures inline as PNG, each followed by a paragraph generated from the results
        assert len(_outputs(nb, "image/png")) >= 1, name
        assert len(_outputs(nb, "text/markdown")) >= len(_outputs(nb, "image/png")), name
        # progress bars folded: no carriage-return redraws, a bounded number of stream lines
        streams = _outputs(nb, "stream")
        assert not any("\r" in o.text for o in streams), name
        assert sum(o.text.count("\n") for o in streams) < 80, name
    sweep_nb = nbformat.read(results / "executed" / "03_slicing_sweep.ipynb", as_version=4)
    n_sweep = len(sweep_configs(load_profile("smoke")))
    log = "".join(o.text for o in _outputs(sweep_nb, "stream"))
    assert all(f"[{k}/{n_sweep}] " in log for k in range(1, n_sweep + 1))  # one line per run
    md = "".join(o.data["text/markdown"] for o in _outputs(sweep_nb, "text/markdown"))
    assert "best SB" in md and "paper's up to 7%" in md
    abl_nb = nbformat.read(results / "executed" / "06_ablations.ipynb", as_version=4)
    md = "".join(o.data["text/markdown"] for o in _outputs(abl_nb, "text/markdown"))
    assert "equal parameters" in md and "calibration set 0" in md and "ShortGPT" in md
    from dynslice.publish.ablations import answer

    assert answer(read_json(results / "ablations.json")) in md
    assert "total time" in proc.stdout
    assert "no published reference for profile smoke" in proc.stdout
    assert json.loads((results / "RUN.json").read_text())["status"] == "finished"
    for name in FIGURES:
        pdf = (figures / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf, name  # TrueType fonts embedded (fonttype 42)
        assert str(figures / f"{name}.pdf") in proc.stdout
    for name in TABLES:
        assert (results / "tables" / f"{name}.md").read_text().count("|") > 10
        assert (results / "tables" / f"{name}.tex").read_text().startswith(r"\begin{table}")
    # the source notebooks were not touched by the run
    assert all(
        nbformat.read(PROJECT_ROOT / "notebooks" / f"{n}.ipynb", as_version=4).cells[2].outputs == [] for n in NOTEBOOKS
    )


def test_records_validate_against_schema(smoke_results):
    results = smoke_results
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    records = sorted((results / "runs").rglob("*.json"))
    assert len(records) >= 10
    for path in records:
        errors = [e.message for e in validator.iter_errors(read_json(path))]
        assert not errors, (path.name, errors[:3])
    broken = read_json(records[0])
    broken["params"]["total"] = -1
    assert list(validator.iter_errors(broken))


def test_headline_matches_records(smoke_results):
    """The headline's % change recomputed directly from the run JSON files."""
    results = smoke_results
    recs = [read_json(p) for p in (results / "runs").rglob("*.json")]
    const = next(r for r in recs if r["config"]["sp"] == 0.3 and r["config"]["sb"] == 0.3)
    for row in read_json(results / "headline.json"):
        budget = "width" if row["comparison"].startswith("equal mean width") else "params"
        dyn = [
            r
            for r in recs
            if r["config"]["budget"] == budget
            and r["config"]["sb"] not in ("auto", 0.3)
            and r["config"]["sp"] == 0.3
            and not r["config"]["tasks"]
        ]
        best = min(dyn, key=lambda r: (r["ppl"]["wiki"], -r["config"]["sb"]))
        assert row["best_sb"] == best["config"]["sb"]
        assert row["ppl_wiki_change_pct"] == pytest.approx(100 * (best["ppl"]["wiki"] / const["ppl"]["wiki"] - 1))
        assert row["params_dynamic"] == best["params"]["total"]


def test_in_process_run_writes_every_table_figure_and_record(smoke_run):
    """The notebooks' code run in process (conftest.smoke_run): every figure as a PDF with TrueType fonts, every
    table as Markdown and LaTeX, the ablation answer, a finished run marker and a ledger listing what it wrote."""
    from dynslice.publish import repro
    from dynslice.publish.ablations import answer
    from dynslice.store import ownership

    results, figures = smoke_run
    for name in FIGURES:
        pdf = (figures / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf, name  # TrueType fonts embedded (fonttype 42)
    for name in TABLES:
        assert (results / "tables" / f"{name}.md").read_text().count("|") > 10, name
        assert (results / "tables" / f"{name}.tex").read_text().startswith(r"\begin{table}"), name
    assert "ShortGPT" in answer(read_json(results / "ablations.json"))
    summary = read_json(results / "summary.json")
    assert summary["profile"] == "smoke" and summary["runs"] == len(list((results / "runs").rglob("*.json")))
    assert json.loads((results / "RUN.json").read_text())["status"] == "finished"
    listed = ownership.Ledger.open(repro.ledger_of(results)).listing()["results"]
    assert "headline.json" in listed and "tables/sweep.md" in listed


def test_publish_and_check_in_process(smoke_run, tmp_path, capsys):
    """What ./run_all.sh --publish and --check-only call (``python -m dynslice.publish.repro``), in process."""
    from dynslice.publish import repro

    results, figures = smoke_run
    pub = tmp_path / "published" / "smoke"
    assert repro.main(["publish", str(results), str(figures), str(pub)]) == 0
    assert sorted(p.name for p in (pub / "figures").glob("*.pdf")) == sorted(p.name for p in figures.glob("*.pdf"))
    assert repro.main(["check", str(results), str(pub)]) == 0
    assert "reproduction check passed" in capsys.readouterr().out
    auto = next((pub / "runs").rglob("sp0.30-sbauto-width-*.json"))
    rec = read_json(auto)
    rec["sb"] = 0.1 if rec["sb"] != 0.1 else 0.2
    auto.write_text(json.dumps(rec))
    assert repro.main(["check", str(results), str(pub)]) == 1
    assert "tiny-random/sp0.30-sbauto-width-calwiki chosen SB: published" in capsys.readouterr().out
    assert repro.main(["check", str(tmp_path / "nothing"), str(pub)]) == 2
    assert "is not a results folder" in capsys.readouterr().err


@pytest.mark.slow
def test_finished_run_is_not_reused_and_interrupted_run_resumes(smoke):
    results, figures, _ = smoke
    roots = ["--profile", "smoke", "--root", str(results.parent), "--figures", str(figures.parent)]
    proc = run_all(*roots)  # a plain rerun must not pass off the old results as a new run
    assert proc.returncode == 2 and "already holds run" in proc.stderr and "--resume" in proc.stderr
    # simulate an interruption: the marker says running and one record is missing
    marker = results / "RUN.json"
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "status": "running"}))
    runs = sorted((results / "runs").rglob("*.json"))
    lost = next(p for p in runs if "sb0.10-width" in p.name)
    kept = {p: p.stat().st_mtime_ns for p in runs if p != lost}
    lost.unlink()
    proc = run_all(*roots, "--resume", "--only", "03")
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_sweep = len(sweep_configs(load_profile("smoke")))  # the best-SB zero-shot runs are notebook 04's
    assert f"ran 1, skipped {n_sweep - 1} already finished" in proc.stdout
    assert f"run {info['run_id']} (resumed)" in proc.stdout
    assert "03_slicing_sweep" in proc.stdout and "01_layer_redundancy" not in proc.stdout
    assert lost.is_file() and kept == {p: p.stat().st_mtime_ns for p in kept}
    marker.write_text(json.dumps({**info, "status": "finished"}))


@pytest.mark.slow
def test_check_publish_and_check_only(smoke, tmp_path):
    results, figures, _ = smoke
    roots = ["--profile", "smoke", "--root", str(results.parent), "--figures", str(figures.parent)]
    pub = tmp_path / "published" / "smoke"
    proc = run_all(*roots, "--publish", "--published", str(pub))
    assert proc.returncode == 0, proc.stderr[-3000:]
    published_pdfs = sorted(p.name for p in (pub / "figures").glob("*.pdf"))
    assert published_pdfs == sorted(p.name for p in figures.glob("*.pdf"))  # every figure of the run, no other
    assert {f"{n}.pdf" for n in FIGURES} <= set(published_pdfs)
    assert (pub / "executed" / "03_slicing_sweep.ipynb").is_file() and (pub / "headline.json").is_file()
    proc = run_all(*roots, "--check-only", "--published", str(pub))
    assert proc.returncode == 0 and "reproduction check passed" in proc.stdout, proc.stdout[-3000:]
    # flip the automatic SB's choice in the reference: the check names it
    auto = next((pub / "runs").rglob("sp0.30-sbauto-width-*.json"))
    rec = read_json(auto)
    rec["sb"] = 0.1 if rec["sb"] != 0.1 else 0.2
    auto.write_text(json.dumps(rec))
    proc = run_all(*roots, "--check-only", "--published", str(pub))
    assert proc.returncode == 1
    assert "tiny-random/sp0.30-sbauto-width-calwiki chosen SB: published" in proc.stdout


@pytest.mark.slow
def test_failing_notebook_is_named(tmp_path):
    profile = tmp_path / "broken.yaml"
    profile.write_text("name: broken\nmodels: [{spec: /nonexistent/model/folder}]\ncal_datasets: [wiki]\nsp: [0.3]\n")
    proc = run_all(
        "--profile", str(profile), "--root", str(tmp_path / "r"), "--figures", str(tmp_path / "f"), "--only", "01"
    )
    assert proc.returncode != 0
    assert "FAILED in 01_layer_redundancy.ipynb, cell [" in proc.stderr
    assert "compute_lr_for_profile" in proc.stderr  # the failing cell's source
    assert "FileNotFoundError" in proc.stderr
    assert (tmp_path / "r" / "broken" / "executed" / "01_layer_redundancy.ipynb").is_file()


@pytest.mark.slow  # run_all.sh and a Python process
def test_unknown_option_and_profile(tmp_path):
    proc = run_all("--bogus")
    assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr
    proc = run_all("--profile", "nope", "--root", str(tmp_path / "r"), "--figures", str(tmp_path / "f"))
    assert proc.returncode != 0 and "profile: 'nope'" in proc.stderr


def _check_published_copy(tmp_path: Path, flip) -> subprocess.CompletedProcess:
    """Copy the published CPU results twice, flip one number in the reference copy, run --check-only."""
    fresh, pub = tmp_path / "fresh" / "cpu", tmp_path / "pub" / "cpu"
    for dest in (fresh, pub):
        shutil.copytree(PUBLISHED_CPU, dest, ignore=shutil.ignore_patterns("executed", "figures"))
    flip(pub)
    return run_all(
        "--profile",
        "cpu",
        "--check-only",
        "--root",
        str(fresh.parent),
        "--figures",
        str(tmp_path / "f"),
        "--published",
        str(pub),
        timeout=120,
    )


@pytest.mark.slow  # run_all.sh and a Python process
def test_check_passes_on_the_published_cpu_results(tmp_path):
    proc = _check_published_copy(tmp_path, lambda pub: None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "smollm2-135m/dense-zs ppl wiki" in proc.stdout
    assert "tolerances for identical arithmetic (both sides ran pinned on" in proc.stdout  # the same records
    assert "reproduction check passed: all" in proc.stdout


@pytest.mark.slow  # run_all.sh and a Python process
def test_check_fails_naming_a_flipped_published_number(tmp_path):
    def flip(pub: Path) -> None:
        path = next((pub / "runs").rglob("sp0.30-sb0.10-width-calwiki-*.json"))
        rec = read_json(path)
        rec["ppl"]["wiki"] *= 1.001  # 0.1%: the same pinned arithmetic on both sides, so the check is exact
        path.write_text(json.dumps(rec))

    proc = _check_published_copy(tmp_path, flip)
    assert proc.returncode == 1
    assert "reproduction check FAILED: 1 of" in proc.stdout
    assert "  smollm2-135m/sp0.30-sb0.10-width-calwiki ppl wiki: published" in proc.stdout


@pytest.mark.slow  # run_all.sh and a Python process
def test_check_fails_naming_a_flipped_headline(tmp_path):
    def flip(pub: Path) -> None:
        rows = read_json(pub / "headline.json")
        rows[0]["acc_delta_points"] += 2.0
        (pub / "headline.json").write_text(json.dumps(rows))

    proc = _check_published_copy(tmp_path, flip)
    assert proc.returncode == 1
    assert "headline smollm2-135m cal wiki SP 0.2 equal mean width (paper) acc points: published" in proc.stdout


@pytest.mark.slow  # run_all.sh and a Python process
def test_check_only_and_root_errors(tmp_path):
    proc = run_all(
        "--profile",
        "cpu",
        "--check-only",
        "--root",
        str(tmp_path / "none"),
        "--figures",
        str(tmp_path / "f"),
        timeout=120,
    )
    assert proc.returncode == 2 and "results:" in proc.stderr and "no runs/" in proc.stderr
    proc = run_all(
        "--profile",
        "smoke",
        "--root",
        str(PROJECT_ROOT / "results" / "published"),
        "--figures",
        str(tmp_path / "f"),
        timeout=120,
    )
    assert proc.returncode == 2 and "inside the published reference" in proc.stderr
    proc = run_all("--force", "--resume")
    assert proc.returncode == 2 and "--force and --resume" in proc.stderr
