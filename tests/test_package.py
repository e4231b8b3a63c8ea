"""The real package: a non-editable install into a fresh virtual environment runs a shipped profile from a folder
that is not the repository, reading its profiles and measured figures from the package, not the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynslice.experiment.numerics import is_pinned
from dynslice.experiment.profiles import load_profile, sweep_configs
from dynslice.store.paths import PROJECT_ROOT, cache_dir

pytestmark = pytest.mark.slow  # a venv, a pip install and the installed command in subprocesses

#: What a wheel is built from: the package and the files pyproject.toml names.
SOURCES = ("dynslice", "pyproject.toml", "README.md", "LICENSE")


def _source_files() -> list[str]:
    """The files of :data:`SOURCES` that git tracks or would track (no caches, no build outputs)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", *SOURCES],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line and (PROJECT_ROOT / line).is_file()]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv that reuses this machine's packages (nothing is downloaded) with dynslice installed from a copy."""
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list the package's files")
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / rel, src / rel)
    env = _clean_env(tmp)
    v = tmp / "venv"
    # --without-pip: the machine's pip and setuptools (reached through --system-site-packages) do the build
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(v)], check=True)
    res = subprocess.run(
        [
            str(v / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            str(src),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    shutil.rmtree(src)  # nothing may be read from the copy either
    return v


def _clean_env(cwd: Path) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, offline hub, caches where the tests keep them."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DYNSLICE_SHARD", "VIRTUAL_ENV")}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "DYNSLICE_CACHE": str(cache_dir()),
        "HF_HOME": str(cache_dir() / "huggingface"),
    }


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "dynslice"), *args],
        cwd=cwd,
        env=_clean_env(cwd),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_installed_package_is_the_one_imported_and_carries_its_data(venv, tmp_path):
    code = (
        "import dynslice, dynslice.store.paths as p; from importlib import resources as r; "
        "print(dynslice.__file__); print(p.PROJECT_ROOT); "
        "print(sorted(f.name for f in r.files('dynslice.experiment.profiles').iterdir() if f.name.endswith('.yaml'))); "
        "print(r.files('dynslice.experiment.profiles').joinpath('ablations', '06_ablations.yaml').is_file()); "
        "print(r.files('dynslice').joinpath('schema', 'run_record.schema.json').is_file())"
    )
    res = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    where, root, names, ablations, schema = res.stdout.splitlines()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert root == "None"  # an installed package knows it has no checkout
    assert names == str(["ablations.yaml", "colab.yaml", "cpu.yaml", "frontier.yaml", "paper.yaml", "smoke.yaml"])
    assert ablations == schema == "True"


def test_installed_package_plans_a_profile_and_reads_a_users_yaml(venv, tmp_path):
    res = _run(venv, tmp_path, "plan", "--profile", "paper", "--shards", "4")
    assert res.returncode == 0, res.stderr
    assert "slicing_cpu.json" in res.stdout  # the measured CPU throughput, read from the package
    smoke = PROJECT_ROOT / "dynslice" / "experiment" / "profiles" / "smoke.yaml"
    (tmp_path / "mine.yaml").write_text(smoke.read_text().replace("name: smoke", "name: mine"))
    res = _run(venv, tmp_path, "plan", "--profile", "mine.yaml")
    assert res.returncode == 0 and "profile mine:" in res.stdout, res.stderr


def test_installed_package_runs_the_smoke_profile(venv, tmp_path):
    """``dynslice run --profile smoke`` (the tiny random model; sweep, then zero-shot) writes every record; a
    second ``dynslice sweep`` of the same profile finds them all finished."""
    res = _run(venv, tmp_path, "run", "--profile", "smoke", "--root", "out")
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "smoke" / "runs").rglob("*.json"))]
    expected = sweep_configs(load_profile("smoke"))
    written = {json.dumps(r["config"], sort_keys=True) for r in records}
    assert {json.dumps(c.to_json(), sort_keys=True) for c in expected} <= written
    assert any(r["config"]["tasks"] for r in records), "the zero-shot phase wrote nothing"
    # smoke is published pinned; outside run_all.sh the CLI says that this process is not, and the records agree
    assert ("this process is not pinned" in res.stderr) == (not is_pinned()), res.stderr[-2000:]
    assert all(r["numerics"]["pinned"] == is_pinned() for r in records)
    assert not (tmp_path / "results").exists() and not (PROJECT_ROOT / "out").exists()
    res = _run(venv, tmp_path, "sweep", "--profile", "smoke", "--root", "out", "--phase", "sweep")
    assert res.returncode == 0 and f"skipped {len(expected)} already finished" in res.stdout, res.stderr[-3000:]


def test_the_measured_copy_matches_the_benchmark():
    """The package's copy of the CPU benchmark is the benchmark's latest result (copy it after a rerun)."""
    shipped = PROJECT_ROOT / "dynslice" / "measured" / "slicing_cpu.json"
    assert json.loads(shipped.read_text()) == json.loads(
        (PROJECT_ROOT / "bench" / "results" / "slicing_cpu.json").read_text()
    )
