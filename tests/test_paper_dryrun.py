"""The paper profile's dry run: ``./run_all.sh`` on the paper profile at CPU sizes, before anyone pays for a GPU.

``tests/paper_dryrun.py`` writes a small hub mirror in the hub's formats, a random-init Llama-3-8B-shaped model
(depth and width cut) and the shipped ``paper.yaml`` with only the model and the sizes changed. run_all.sh then
runs every phase of the paper profile through papermill: PG-19 sliding-window LR, the documents calibration
sampler, the four perplexity loaders, lm-eval on the six standard tasks, the best SB per calibration set, every
notebook, tables and figures; then the run is published to a temporary reference and checked against it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import nbformat
import pytest
from paper_dryrun import DRYRUN_BASE, LAYERS, write_dryrun

from dynslice.experiment.profiles import (
    best_dynamic,
    is_done,
    load_profile,
    lr_path,
    result_path,
    sweep_configs,
    zero_shot_configs,
)
from dynslice.experiment.protocol import best_sb_dataset
from dynslice.measure.evaluate import STANDARD_TASKS
from dynslice.measure.mirror import MIRROR_ENV
from dynslice.store.jsonio import read_json
from dynslice.store.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _run_all(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PROJECT_ROOT / "run_all.sh"), *args],
        cwd=PROJECT_ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=1500,
    )


@pytest.fixture(scope="module")
def dryrun(tmp_path_factory):
    """The dry run's files, its environment (the mirror, the hub offline, caches in the temporary folder) and
    run_all.sh's finished run."""
    base = tmp_path_factory.mktemp("paper_dryrun")
    files = write_dryrun(base)
    cache = base / "cache"
    env = {
        **os.environ,
        "DYNSLICE_PYTHON": sys.executable,
        MIRROR_ENV: str(files["mirror"]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DYNSLICE_CACHE": str(cache),
        "HF_HOME": str(cache / "huggingface"),
        "HF_DATASETS_CACHE": str(cache / "huggingface" / "datasets"),
    }
    roots = ["--root", str(base / "results"), "--figures", str(base / "figures")]
    proc = _run_all(env, "--profile", str(files["profile"]), *roots)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    profile = load_profile(files["profile"])
    return {
        "env": env,
        "roots": roots,
        "proc": proc,
        "profile": profile,
        "profile_path": files["profile"],
        "root": base / "results",
    }


def test_the_dry_run_is_the_paper_profile_at_cpu_sizes(dryrun):
    """Everything but the model and the sizes is paper.yaml's."""
    paper, dry = load_profile("paper"), dryrun["profile"]
    for key in ("cal_datasets", "lr_datasets", "budgets", "tasks", "zero_shot_budgets", "auto_sb", "auto_sb_budgets"):
        assert getattr(dry, key) == getattr(paper, key), key
    assert dry.sp == paper.sp[:1] and dry.ppl_datasets == paper.ppl_datasets
    changed = {k for k, v in dict(paper.base).items() if dict(dry.base).get(k) != v}
    assert changed <= set(DRYRUN_BASE), changed
    assert set(STANDARD_TASKS) == set(dry.tasks)


def test_every_phase_of_the_paper_profile_ran(dryrun):
    prof, root = dryrun["profile"], dryrun["root"]
    model = prof.models[0].spec
    # LR on every LR corpus; PG-19's over all its sliding windows, as the authors compute it
    for corpus in prof.lr_datasets:
        lr = read_json(lr_path(root, prof.name, model, corpus))
        assert len(lr["lr"]) == LAYERS and all(math.isfinite(v) for v in lr["lr"]), corpus
    pg19 = read_json(lr_path(root, prof.name, model, dict(prof.base)["lr_dataset"]))
    assert (pg19["dataset"], pg19["split"], pg19["sampler"], pg19["nsamples"]) == (
        "pg19",
        "validation",
        "sliding",
        None,
    )
    assert pg19["stride"] == DRYRUN_BASE["lr_stride"] and pg19["windows"] > 1
    # every run of the sweep and every zero-shot run the profile asks for (the best SB's, or every SB's)
    records = [read_json(p) for p in sorted((root / prof.name / "runs").rglob("*.json"))]
    sweep, zs = sweep_configs(prof), zero_shot_configs(prof, records)
    for cfg in sweep + zs:
        assert is_done(cfg, result_path(cfg, root, prof.name)), cfg
    assert {c.cal_dataset for c in zs} == set(prof.cal_datasets) and all(c.tasks == prof.tasks for c in zs)
    # the best SB per calibration set, on the perplexity the protocol chooses on, is the headline's
    best = best_dynamic(records)
    assert sorted(key[1] for key in best) == sorted(prof.cal_datasets)
    headline = read_json(root / prof.name / "headline.json")
    for key, rec in best.items():
        chosen_on = best_sb_dataset("reference", key[1], prof.ppl_datasets[0])
        group = [
            r["ppl"][chosen_on]
            for r in records
            for c in [r["config"]]
            if c["cal_dataset"] == key[1] and c["sp"] > 0 and c["sb"] != "auto" and c["sb"] < c["sp"]
        ]
        assert len(group) > 1 and rec["ppl"][chosen_on] == min(group)
        rows = [h for h in headline if h["cal_dataset"] == key[1] and h["sp"] == key[3]]  # one budget: width
        assert [h["best_sb"] for h in rows] == [rec["config"]["sb"]], rows
    for rec in records:
        cfg = rec["config"]
        assert cfg["cal_sampler"] == "documents" and cfg["ppl_protocol"] == "documents", cfg
        assert cfg["protocol"] == "reference" and rec["protocol"]["overrides"]["dtype"]["value"] == "fp32"
        # the four perplexity loaders
        assert sorted(rec["ppl"]) == sorted(prof.ppl_datasets) and all(map(math.isfinite, rec["ppl"].values()))
        if cfg["tasks"]:  # lm-eval on the six standard task names
            assert set(rec["tasks"]) == {*STANDARD_TASKS, "average"}
            assert all(0 <= rec["tasks"][t]["value"] <= 1 for t in STANDARD_TASKS)
    assert {r["config"]["cal_dataset"] for r in records if r["sp"] > 0} == set(prof.cal_datasets)


def test_every_notebook_executed_and_wrote_its_tables(dryrun):
    results = dryrun["root"] / dryrun["profile"].name
    executed = sorted(p.stem for p in (results / "executed").glob("*.ipynb"))
    expected = [p.stem for p in sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    assert executed == [n for n in expected if dryrun["profile"].runs_notebook(n)] and len(executed) >= 5
    for name in executed:
        nb = nbformat.read(results / "executed" / f"{name}.ipynb", as_version=4)
        assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", [])), name
    for table in ("headline", "sweep", "zero_shot", "lr_agreement"):
        assert (results / "tables" / f"{table}.md").read_text().count("|") > 10, table
    assert "total time" in dryrun["proc"].stdout


def test_the_check_passes_against_the_runs_own_published_copy(dryrun, tmp_path):
    """--publish into a temporary reference, then --check-only against it: the reproduction check's code path on
    the paper profile's records and tables."""
    env, roots, profile = dryrun["env"], dryrun["roots"], str(dryrun["profile_path"])
    published = ["--published", str(tmp_path / "published"), "--published-figures", str(tmp_path / "figures")]
    proc = _run_all(env, "--profile", profile, *roots, "--publish", *published)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "published" / "runs").is_dir()
    proc = _run_all(env, "--profile", profile, *roots, "--check-only", *published)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
