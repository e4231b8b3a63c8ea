"""In-process stand-ins for the slow tier's process boundaries, so that the fast tier runs every module itself:
``python -m dynslice``, the one-node launcher and the submitit arrays, on the session's shared smoke run.

The slow tier still runs the real thing (``tests/test_cli.py::test_module_entry_point``,
``tests/test_shard.py::test_two_processes_merge_into_the_same_tables``,
``tests/test_shard.py::test_submitit_local_executor_completes_smoke``).
"""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import pytest

from dynslice.cli import main
from dynslice.experiment import profiles, sweep


def _copy_of(smoke_run, tmp_path: Path) -> Path:
    """A root holding a copy of the session's finished smoke run."""
    root = tmp_path / "root"
    shutil.copytree(smoke_run[0], root / "smoke")
    return root


def test_python_dash_m_dynslice_runs_the_cli(monkeypatch, capsys):
    """``python -m dynslice --help``: the module entry point prints the commands and exits 0."""
    monkeypatch.setattr(sys, "argv", ["dynslice", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("dynslice", run_name="__main__", alter_sys=True)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("allocate", "sweep", "launch", "submit"))


class _Shard:
    """What launch() needs of a Popen: the shard's ``dynslice sweep`` run in this process, its exit code."""

    def __init__(self, argv, stdout, stderr, env, fail_shards=()):
        assert argv[1:3] == ["-m", "dynslice"] and env["CUDA_VISIBLE_DEVICES"] == ""
        self.argv = argv
        self.pid = 0
        shard = argv[argv.index("--shard") + 1]
        self.code = 1 if shard in fail_shards else main(argv[3:])
        stdout.write(f"shard {shard} exited {self.code}\n")

    def wait(self) -> int:
        return self.code


def test_launch_runs_each_phase_in_shards_and_stops_at_a_failed_one(smoke_run, tmp_path, monkeypatch):
    """launch(): N shard commands per phase, sweep before zero-shot, one log each; a failed shard stops it."""
    from dynslice.scale import launch

    root = _copy_of(smoke_run, tmp_path)
    started: list[list[str]] = []

    def popen(argv, **kw):
        started.append(argv)
        return _Shard(argv, **kw)

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    lines: list[str] = []
    assert launch.launch("smoke", root, processes=2, log=lines.append) == 0
    assert [(a[a.index("--phase") + 1], a[a.index("--shard") + 1]) for a in started] == [
        ("sweep", "0/2"),
        ("sweep", "1/2"),
        ("zero-shot", "0/2"),
        ("zero-shot", "1/2"),
    ]
    logs = sorted(p.name for p in (root / "smoke" / "logs").glob("*.log"))
    assert logs == ["sweep-shard0of2.log", "sweep-shard1of2.log", "zero-shot-shard0of2.log", "zero-shot-shard1of2.log"]
    assert "sweep: 2/2 shards finished" in "\n".join(lines)

    started.clear()
    monkeypatch.setattr(launch.subprocess, "Popen", lambda argv, **kw: _Shard(argv, fail_shards=("1/2",), **kw))
    lines.clear()
    assert launch.launch("smoke", root, processes=2, log=lines.append) == 1
    assert any("sweep: shard 1/2 exited 1" in line for line in lines)
    assert not any(line.startswith("zero-shot") for line in lines)  # the next phase never started
    with pytest.raises(ValueError, match="either gpus or processes"):
        launch.launch("smoke", root, log=lines.append)
    with pytest.raises(ValueError, match="names a GPU twice"):
        launch.parse_gpus("0,0")


def test_submit_debug_executor_runs_the_tasks_in_process(smoke_run, tmp_path):
    """submit() through submitit's in-process executor on a finished run: every task skips every run."""
    pytest.importorskip("submitit")
    from dynslice.scale.cluster import submit

    root = _copy_of(smoke_run, tmp_path)
    lines: list[str] = []
    jobs = submit("smoke", root, 2, cluster="debug", params={"timeout_min": 5}, wait=True, log=lines.append)
    results = [j.result() for j in jobs]
    n_runs = len(profiles.sweep_configs(profiles.load_profile("smoke")))
    assert len(jobs) == 4 and sum(r["ran"] for r in results) == 0
    assert sum(r["skipped"] for r in results[:2]) == n_runs  # the sweep array's two tasks split the sweep
    assert [line.split(":")[0] for line in lines] == ["sweep", "zero-shot"]
    assert sweep.profile_missing(profiles.load_profile("smoke"), root)[0] == []
    with pytest.raises(ValueError, match="shards"):
        submit("smoke", root, 0, cluster="debug")


def test_check_of_the_published_cpu_results_in_process(tmp_path, capsys):
    """What ``./run_all.sh --profile cpu --check-only`` calls, in process: a copy of the published CPU results
    passes against itself; a number changed by 0.1% in the reference is named (both sides ran pinned: exact)."""
    from dynslice.publish import repro
    from dynslice.store.jsonio import read_json, write_json
    from dynslice.store.paths import PROJECT_ROOT

    fresh, pub = tmp_path / "fresh" / "cpu", tmp_path / "pub" / "cpu"
    for dest in (fresh, pub):
        shutil.copytree(
            PROJECT_ROOT / "results" / "published" / "cpu", dest, ignore=shutil.ignore_patterns("executed", "figures")
        )
    assert repro.main(["check", str(fresh), str(pub)]) == 0
    assert "reproduction check passed: all" in capsys.readouterr().out
    path = next((pub / "runs").rglob("sp0.30-sb0.10-width-calwiki-*.json"))
    rec = read_json(path)
    rec["ppl"]["wiki"] *= 1.001
    write_json(path, rec)
    assert repro.main(["check", str(fresh), str(pub)]) == 1
    out = capsys.readouterr().out
    assert "reproduction check FAILED: 1 of" in out and "smollm2-135m/sp0.30-sb0.10-width-calwiki ppl wiki" in out


def test_eval_of_a_sliced_folder(tmp_path):
    """``dynslice slice`` then ``dynslice eval`` of the saved folder (no tokenizer of its own: its base model's)."""
    import json

    model = tmp_path / "m"
    cal = ["--cal-nsamples", "2", "--cal-seqlen", "16"]
    assert main(["slice", "--model", "tiny-random", "--sp", "0.3", *cal, "--out", str(model)]) == 0
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(model), "--ppl", "wiki", "--ppl-seqlen", "32", "--ppl-max-chunks", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["model"] == str(model) and rec["ppl"]["wiki"] > 1 and rec["tasks"] == {}
    assert rec["widths"] == json.loads((model / "dynslice.json").read_text())["widths"]
    assert 0 < rec["params"]["total"]


def test_tidy_streams_folds_progress_bars(tmp_path):
    """run_all.sh's clean-up of an executed notebook: consecutive stream outputs merged, each line redrawn with
    carriage returns kept in its final state, other outputs untouched."""
    import nbformat

    from dynslice.publish.notebook import tidy_streams

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("run()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="bar  10%\rbar  50%"),
        nbformat.v4.new_output("stream", name="stderr", text="\rbar 100%\ndone\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "x"}),
        nbformat.v4.new_output("stream", name="stdout", text="after\n"),
    ]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert tidy_streams(path) == 1
    outs = nbformat.read(path, as_version=4).cells[1].outputs
    assert [o.output_type for o in outs] == ["stream", "display_data", "stream"]
    assert outs[0].text == "bar 100%\ndone\n" and outs[2].text == "after\n"
