"""Shards of a profile: every run in exactly one shard, balanced by cost; sharded runs (separate processes, the
submitit local executor) merge into the same tables as one unsharded run; the cost plan of a profile."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile

import pandas as pd
import pytest

from dynslice.cli import main as cli
from dynslice.experiment import profiles, sweep
from dynslice.publish import report
from dynslice.scale import cost, shard
from dynslice.store.records import load_records


# ------------------------------------------------------------------------------------------- the split itself
@pytest.mark.parametrize("name", ["paper", "cpu", "smoke"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16])
def test_every_run_in_exactly_one_shard(name, n):
    configs = profiles.sweep_configs(profiles.load_profile(name))
    keys = [c.key() for c in configs]
    assert len(set(keys)) == len(keys)
    parts = [shard.shard_configs(configs, k, n) for k in range(n)]
    seen = [c.key() for part in parts for c in part]
    assert sorted(seen) == sorted(keys)  # the union is everything, nothing twice
    # balanced by cost: greedy LPT puts no shard above the mean by more than one run's cost
    costs = [cost.run_cost(c) for c in configs]
    loads = shard.shard_loads(configs, n)
    assert sum(loads) == pytest.approx(sum(costs))
    assert max(loads) <= sum(costs) / n + max(costs) + 1e-6 * sum(costs)


def test_split_is_stable_under_reordering():
    configs = profiles.sweep_configs(profiles.load_profile("paper"))
    ref = {c.key(): s for c, s in zip(configs, shard.assign(configs, 8))}
    shuffled = list(configs)
    random.Random(0).shuffle(shuffled)
    assert {c.key(): s for c, s in zip(shuffled, shard.assign(shuffled, 8))} == ref


def test_balanced_by_cost_not_count():
    configs = profiles.sweep_configs(profiles.load_profile("paper"))
    loads = shard.shard_loads(configs, 4)
    counts = [len(shard.shard_configs(configs, k, 4)) for k in range(4)]
    assert max(loads) / min(loads) < 1.02
    # a split by count (every 4th run) is worse balanced than the cost split on this profile
    by_count = [sum(cost.run_cost(c) for c in configs[k::4]) for k in range(4)]
    assert max(by_count) / min(by_count) > max(loads) / min(loads)
    assert sum(counts) == len(configs)


@pytest.mark.parametrize("text", ["4/4", "a/b", "-1/3", "1/0", "1", ""])
def test_bad_shard_names_the_parameter(text):
    with pytest.raises(ValueError, match="shard"):
        shard.parse_shard(text)


def test_cli_bad_shard_exits_2(tmp_path, capsys):
    assert cli(["sweep", "--profile", "smoke", "--root", str(tmp_path), "--shard", "2/2"]) == 2
    assert "shard" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the plan
def test_plan_profile_paper(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli(["plan", "--profile", "paper", "--shards", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CPU-scaled estimate" in text and "GPU-hours" in text and "sb: auto" in text
    plan = json.loads(out.read_text())
    assert plan["sweep_runs"] == len(profiles.sweep_configs(profiles.load_profile("paper")))
    paper = profiles.load_profile("paper")
    every_sb = sum(len(profiles.dynamic_sbs(sp, paper.sb_step)) for sp in paper.sp)
    assert plan["zero_shot_runs"] == 2 * 4 * every_sb  # models x corpora x every dynamic SB (zero_shot.every_sb)
    assert plan["device_hours"] == pytest.approx(sum(m["hours"] for m in plan["models"]))
    one, eight = plan["wall_hours"]["1"], plan["wall_hours"]["8"]
    assert one / 8 < eight < one / 4  # 8 shards: close to 1/8 of the time, plus one LR per shard
    a = plan["auto_sb"]
    assert a["grid_runs"] > 10 * a["auto_runs"] > 0 and 0 < a["saved_hours"] < a["grid_hours"]


def test_plan_cost_grows_with_model_and_tokens():
    p = profiles.load_profile("paper")
    c = profiles.sweep_configs(p)[1]
    small = c.replace(cal_nsamples=64)
    assert cost.run_cost(small) < cost.run_cost(c)
    flops = cost.run_flops(c)
    # one slicing of an 8B model at 128 x 2048 tokens: ~1.6 x (2 x 7e9 x 262144) FLOPs, give or take attention
    assert 4e15 < flops["slice"] < 1.2e16


def test_plan_bad_input(capsys):
    assert cli(["plan", "--profile", "paper", "--gpu-tflops", "0"]) == 2
    assert "gpu_tflops" in capsys.readouterr().err
    assert cli(["plan", "--profile", "nope"]) == 2


# --------------------------------------------------------------------------------- running shards for real
def tables_of(results) -> dict[str, pd.DataFrame]:
    """The tables of a results folder's records, written into a scratch folder (the shared run is only read)."""
    frame = report.records_frame(load_records(results / "runs"))
    with tempfile.TemporaryDirectory() as scratch:
        tables = report.write_tables(frame, scratch, "wiki")
    return {
        k: t.drop(columns=[c for c in t.columns if c.endswith("time_s")]).reset_index(drop=True)
        for k, t in tables.items()
    }


def assert_same_tables(a, b):
    assert set(a) == set(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-6)


@pytest.fixture
def unsharded(smoke_run):
    """The root of the session's one unsharded smoke run (conftest.smoke_run): every run in one process."""
    root = smoke_run[0].parent
    assert sweep.profile_missing(profiles.load_profile("smoke"), root)[0] == []
    return root


@pytest.mark.slow
def test_two_processes_merge_into_the_same_tables(unsharded, tmp_path):
    from dynslice.scale.launch import launch

    lines = []
    assert launch("smoke", tmp_path, processes=2, log=lines.append) == 0
    logs = sorted(p.name for p in (tmp_path / "smoke" / "logs").glob("*.log"))
    assert logs == ["sweep-shard0of2.log", "sweep-shard1of2.log", "zero-shot-shard0of2.log", "zero-shot-shard1of2.log"]
    profile = profiles.load_profile("smoke")
    assert sweep.profile_missing(profile, tmp_path)[0] == []

    def names(root):
        return sorted(p.name for p in (root / "smoke" / "runs").rglob("*.json"))

    assert names(tmp_path) == names(unsharded)
    assert_same_tables(tables_of(tmp_path / "smoke"), tables_of(unsharded / "smoke"))
    # each shard ran only its own part of the sweep
    ran = [(tmp_path / "smoke" / "logs" / f"sweep-shard{k}of2.log").read_text() for k in range(2)]
    parts = [len(shard.shard_configs(profiles.sweep_configs(profile), k, 2)) for k in range(2)]
    assert sum(parts) == len(profiles.sweep_configs(profile)) and min(parts) > 0
    for k in range(2):
        assert f"shard {k}/2: {parts[k]} of " in ran[k] and f"ran {parts[k]}," in ran[k]


def test_report_says_what_is_missing_and_zero_shot_waits(unsharded, tmp_path):
    shutil.copytree(unsharded / "smoke", tmp_path / "smoke")
    profile = profiles.load_profile("smoke")
    dyn = next(p for p in (tmp_path / "smoke" / "runs").rglob("sp0.30-sb0.10-width-*.json") if "-zs" not in p.name)
    dyn.unlink()
    missing, total = sweep.profile_missing(profile, tmp_path)
    assert [profiles.run_name(c) for c in missing] == ["sp0.30-sb0.10-width-calwiki"]
    assert "1 of" in sweep.missing_text(missing, total) and "sp0.30-sb0.10-width-calwiki" in sweep.missing_text(
        missing, total
    )
    records = load_records(tmp_path / "smoke" / "runs")

    def budgets(configs):
        return sorted(c.budget for c in configs)

    assert budgets(profiles.zero_shot_configs(profile, records)) == ["params", "width"]
    # with the root, the width group waits for its missing sweep run; the params group is complete
    assert budgets(profiles.zero_shot_configs(profile, records, root=tmp_path)) == ["params"]
    assert tables_of(tmp_path / "smoke")["sweep"].shape[0] == tables_of(unsharded / "smoke")["sweep"].shape[0] - 1


def test_cli_sweep_missing_lists_runs(unsharded, capsys):
    assert cli(["sweep", "--profile", "smoke", "--root", str(unsharded), "--missing"]) == 0
    assert "All 12 runs" in capsys.readouterr().out


@pytest.mark.slow
def test_submitit_local_executor_completes_smoke(unsharded, tmp_path):
    pytest.importorskip("submitit")
    from dynslice.scale.cluster import submit

    jobs = submit("smoke", tmp_path, 2, cluster="local", params={"timeout_min": 30}, wait=True, log=lambda s: None)
    results = [j.result() for j in jobs]
    assert sum(r["ran"] for r in results) == 12
    assert sweep.profile_missing(profiles.load_profile("smoke"), tmp_path)[0] == []
    assert_same_tables(tables_of(tmp_path / "smoke"), tables_of(unsharded / "smoke"))
    # resumable: a rerun of the same array does nothing new
    again = submit("smoke", tmp_path, 2, cluster="local", params={"timeout_min": 30}, wait=True, log=lambda s: None)
    assert sum(j.result()["ran"] for j in again) == 0


def test_cli_launch_bad_input(tmp_path, capsys):
    assert cli(["launch", "--profile", "smoke", "--root", str(tmp_path), "--processes", "0"]) == 2
    assert "processes" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


def test_infeasible_runs_are_noted_and_not_retried(tmp_path):
    """An infeasible run leaves a note; a rerun reports it again without loading the model."""
    from dynslice.store.jsonio import write_json

    profile = profiles.load_profile("smoke")
    cfg = next(c for c in profiles.sweep_configs(profile) if not c.dense and not c.auto_sb)
    write_json(profiles.infeasible_path(cfg, tmp_path, "smoke"), {"config": cfg.to_json(), "infeasible": "why"})
    res = sweep.run_sweep([cfg], tmp_path, "smoke", log=lambda s: None)
    assert res.ran == () and res.infeasible == ((str(profiles.result_path(cfg, tmp_path, "smoke")), "why"),)
    assert profiles.missing_runs([cfg], tmp_path, "smoke") == []


def test_run_all_bad_shard_exits_2():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "run_all.sh"
    for argv in (["--shard", "2/2"], ["--shard", "x"], ["--shard", "0/2", "--force"]):
        res = subprocess.run(["bash", str(script), *argv], check=False, capture_output=True, text=True)
        assert res.returncode == 2 and "--shard" in res.stderr
