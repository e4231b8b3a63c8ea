"""Profiles -> run configs and paths, resume checks, and the report's headline tables, on synthetic records."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import pytest

from dynslice.core.params import ArchDims
from dynslice.experiment import profiles, sweep
from dynslice.experiment.config import RunConfig
from dynslice.publish import report
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.paths import PROJECT_ROOT
from dynslice.store.records import load_records

SMOKE = {
    "name": "t",
    "models": [{"spec": "tiny-random"}],
    "base": {"lr_nsamples": 4, "ppl_datasets": ["wiki", "news"]},
    "cal_datasets": ["wiki"],
    "sp": [0.2, 0.3],
    "sb_step": 0.1,
    "budgets": ["width", "params"],
    "auto_sb": {"step": 0.1, "max_evals": 2},
    "zero_shot": {"tasks": ["dynslice_cloze"], "limit": 4},
}


# ------------------------------------------------------------------------------------------------ profiles
@pytest.mark.parametrize("name", ["smoke", "cpu", "paper"])
def test_shipped_profiles_load(name):
    p = profiles.load_profile(name)
    assert p.name == name
    configs = profiles.sweep_configs(p)
    keys = [c.key() for c in configs]
    assert len(set(keys)) == len(keys)  # no run twice
    paths = {profiles.result_path(c, "r", name) for c in configs}
    assert len(paths) == len(configs)


def test_sweep_configs_enumerates_the_grid():
    p = profiles.parse_profile(SMOKE, "t")
    configs = profiles.sweep_configs(p)
    dense = [c for c in configs if c.dense]
    const = [c for c in configs if not c.dense and not c.auto_sb and c.sb == c.sp]
    dyn = [c for c in configs if not c.dense and not c.auto_sb and c.sb < c.sp]
    auto = [c for c in configs if c.auto_sb]
    assert len(dense) == 1 and dense[0].tasks == ("dynslice_cloze",) and dense[0].task_limit == 4
    assert sorted(c.sp for c in const) == [0.2, 0.3] and all(c.tasks for c in const)
    # SP 0.2 -> SB 0.1, 0.0; SP 0.3 -> 0.2, 0.1, 0.0; each under two budgets, without tasks
    assert sorted((c.sp, c.sb, c.budget) for c in dyn) == sorted(
        (sp, sb, b)
        for sp, sbs in ((0.2, [0.1, 0.0]), (0.3, [0.2, 0.1, 0.0]))
        for sb in sbs
        for b in ("width", "params")
    )
    assert not any(c.tasks for c in dyn)
    assert sorted((c.sp, c.budget) for c in auto) == [(0.2, "params"), (0.2, "width"), (0.3, "params"), (0.3, "width")]
    assert all(c.auto_sb_step == 0.1 and c.auto_sb_max_evals == 2 for c in auto)
    assert all(c.lr_nsamples == 4 and c.ppl_datasets == ("wiki", "news") for c in configs)
    assert [c.key() for c in profiles.sweep_configs(profiles.parse_profile(SMOKE, "t"))] == [c.key() for c in configs]


def test_auto_sb_budgets_and_off():
    on = profiles.sweep_configs(profiles.parse_profile({**SMOKE, "auto_sb": {"step": 0.05, "budgets": ["width"]}}, "t"))
    assert [(c.sp, c.budget, c.auto_sb_step) for c in on if c.auto_sb] == [(0.2, "width", 0.05), (0.3, "width", 0.05)]
    off = profiles.sweep_configs(profiles.parse_profile({**SMOKE, "auto_sb": False}, "t"))
    assert not any(c.auto_sb for c in off) and len(off) == len(on) - 2


def test_dynamic_sbs_excludes_constant():
    assert profiles.dynamic_sbs(0.3, 0.1) == [0.2, 0.1, 0.0]
    assert profiles.dynamic_sbs(0.2, 0.02)[0] == 0.18 and profiles.dynamic_sbs(0.2, 0.02)[-1] == 0.0
    assert len(profiles.dynamic_sbs(0.2, 0.02)) == 10


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, "t.bogus: unknown key"),
        ({"base": {"lr_nsample": 4}}, "t.base.lr_nsample: unknown key"),
        ({"base": {"sp": 0.3}}, "t.base.sp: unknown key"),  # swept fields are not set through base
        ({"base": {"lr_seqlen": 1}}, "lr_seqlen"),
        ({"sp": [0.3, 1.2]}, "t.sp: 1.2 is outside"),
        ({"budgets": ["width", "flops"]}, "t.budgets: 'flops'"),
        ({"cal_datasets": ["wikipedia"]}, "t.cal_datasets: 'wikipedia'"),
        ({"auto_sb": {"steps": 0.1}}, "t.auto_sb.steps: unknown key"),
        ({"sb_step": 0}, "t.sb_step: 0 is outside"),
        ({"models": [{"spec": "tiny-random", "gpu": 1}]}, "t.models[0].gpu: unknown key"),
    ],
)
def test_bad_profiles_name_the_key(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        profiles.parse_profile({**SMOKE, **change}, "t")


def test_missing_required_key():
    obj = dict(SMOKE)
    del obj["sp"]
    with pytest.raises(ValueError, match=r"t\.sp: required"):
        profiles.parse_profile(obj, "t")


def test_unknown_profile_name():
    with pytest.raises(ValueError, match="profile: 'nope'"):
        profiles.load_profile("nope")


def test_run_name_and_path():
    cfg = RunConfig(model="meta-llama/Meta-Llama-3-8B", sp=0.3, sb=0.1, budget="params", cal_dataset="ptb")
    path = profiles.result_path(cfg, "res", "paper")
    assert path.parts[:4] == ("res", "paper", "runs", "meta-llama--Meta-Llama-3-8B")
    assert path.name == f"sp0.30-sb0.10-params-calptb-{cfg.key()}.json"
    assert profiles.run_name(cfg.replace(sb="auto")) == "sp0.30-sbauto-params-calptb"
    assert profiles.run_name(cfg.replace(sp=0.0, sb=0.0, tasks=("piqa",))) == "dense-zs"


def test_is_done(tmp_path):
    cfg = RunConfig(sp=0.3, sb=0.2)
    path = tmp_path / "r.json"
    assert not profiles.is_done(cfg, path)
    write_json(path, {"config": cfg.to_json(), "ppl": {}})
    assert profiles.is_done(cfg, path)
    assert not profiles.is_done(cfg.replace(sb=0.1), path)
    path.write_text('{"config": ')  # truncated
    assert not profiles.is_done(cfg, path)


def test_run_sweep_skips_finished_runs_without_loading(tmp_path):
    configs = [RunConfig(model="no-such-model-anywhere", sp=0.3, sb=sb) for sb in (0.3, 0.2)]
    for c in configs:
        write_json(profiles.result_path(c, tmp_path, "p"), {"config": c.to_json(), "ppl": {"wiki": 1.0}})
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}
    logs = []
    result = sweep.run_sweep(configs, tmp_path, "p", log=logs.append)  # would fail if it tried to load the model
    assert result.ran == () and len(result.skipped) == 2
    assert "skipped 2 already finished" in logs[-1]
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}


@dataclass
class _LRBench:
    """Holds a fixed LR score and a real architecture: what :func:`sweep.infeasible_reason` reads."""

    scores: list[float]

    def lr(self, cfg):
        return {"normalized": self.scores}

    def dims(self):
        return ArchDims(
            vocab=100,
            hidden=64,
            layers=len(self.scores),
            intermediate=128,
            heads=4,
            kv_heads=2,
            head_dim=16,
            qkv_bias=False,
            o_bias=False,
            mlp_bias=False,
            tied=True,
        )


def test_infeasible_reason():
    peaked = _LRBench([0.0, 0.0, 0.0, 1.0])  # mean(n) = 0.25: FS of the last layer = sb + (sp - sb)·4
    cfg = RunConfig(model="x", sp=0.3, sb=0.0, round_interval=8)
    assert "FS=1.2" in sweep.infeasible_reason(peaked, cfg)  # 0 + 0.3·4 = 1.2 >= 1
    assert sweep.infeasible_reason(peaked, cfg.replace(sb=0.2)) is None  # 0.2 + 0.1·4 = 0.6
    assert sweep.infeasible_reason(peaked, cfg.replace(sb="auto")) is None


# ------------------------------------------------------------------------------------------ synthetic records
def make_record(sp, sb, ppl, params, *, budget="width", tasks=None, cal="wiki", model="m", auto=None, time_s=10.0):
    cfg = RunConfig(
        model=model,
        sp=sp,
        sb="auto" if auto else sb,
        budget=budget,
        cal_dataset=cal,
        ppl_datasets=tuple(ppl),
        tasks=tuple(t for t in (tasks or {}) if t != "average"),
    )
    rec = {
        "config": cfg.to_json(),
        "sp": sp,
        "sb": sb,
        "budget": budget,
        "params": {
            "dense": 1000,
            "total": params,
            "weights": params,
            "shortcuts": 0,
            "fraction_removed": 1 - params / 1000,
        },
        "ppl": dict(ppl),
        "tasks": tasks or {},
        "timings_s": {"load": 99.0, "slice": time_s, "eval": 100.0 if tasks else 2.0},
    }
    if sp:
        rec["allocation"] = {"mean_effective_fraction": sp}
    if auto:
        rec["auto_sb"] = {"n_evals": auto[0], "grid_size": auto[1], "time_s": time_s}
    return rec


def acc(*values):
    out = {f"t{i}": {"metric": "acc", "value": v, "stderr": None} for i, v in enumerate(values)}
    out["average"] = {"metric": "mean", "value": sum(values) / len(values), "stderr": None}
    return out


@pytest.fixture
def records():
    return [
        make_record(0, 0, {"wiki": 10.0, "news": 20.0}, 1000, tasks=acc(0.8, 0.6)),
        make_record(0.3, 0.3, {"wiki": 20.0, "news": 40.0}, 700, tasks=acc(0.6, 0.4)),
        make_record(0.3, 0.2, {"wiki": 18.0, "news": 41.0}, 690),
        make_record(0.3, 0.1, {"wiki": 16.0, "news": 39.0}, 680),  # best on wiki
        make_record(0.3, 0.0, {"wiki": 17.0, "news": 30.0}, 670),  # best on news
        make_record(0.3, 0.2, {"wiki": 19.0, "news": 50.0}, 700, budget="params"),
        make_record(0.3, 0.1, {"wiki": 19.0, "news": 45.0}, 700, budget="params"),  # tie on wiki with 0.2
        make_record(0.3, 0.1, {"wiki": 16.0, "news": 39.0}, 680, tasks=acc(0.7, 0.4)),  # zero-shot of best
        make_record(0.3, 0.2, {"wiki": 19.0, "news": 50.0}, 700, budget="params", tasks=acc(0.5, 0.5)),
        make_record(0.3, 0.2, {"wiki": 17.5, "news": 35.0}, 690, auto=(3, 16), time_s=30.0),
    ]


def test_records_frame_kinds(records):
    f = report.records_frame(records)
    assert sorted(f["kind"].value_counts().items()) == [("auto", 1), ("constant", 1), ("dense", 1), ("dynamic", 7)]
    assert f.loc[f["kind"] == "dense", "acc_average"].item() == pytest.approx(0.7)
    assert f.loc[f["kind"] == "auto", "time_s"].item() == 32.0  # load time excluded


def test_best_vs_constant(records):
    f = report.records_frame(records)
    head = report.best_vs_constant(f, "wiki").set_index("budget")
    w = head.loc["width"]
    assert w["best_sb"] == 0.1 and w["n_sb"] == 3 and w["comparison"] == "equal mean width (paper)"
    assert w["ppl_wiki_change_pct"] == pytest.approx(100 * (16 - 20) / 20)
    assert w["ppl_news_change_pct"] == pytest.approx(100 * (39 - 40) / 40)
    assert (w["params_constant"], w["params_dynamic"]) == (700, 680)
    p = head.loc["params"]
    assert p["best_sb"] == 0.2  # tie at 19.0: the larger SB
    assert p["comparison"] == "equal parameters" and p["ppl_wiki_change_pct"] == pytest.approx(-5.0)
    news = report.best_vs_constant(f, "news").set_index("budget")
    assert news.loc["width", "best_sb"] == 0.0
    with pytest.raises(ValueError, match="dataset: 'c4'"):
        report.best_vs_constant(f, "c4")


def test_sweep_and_report_choose_the_same_best(records):
    f = report.records_frame(records)
    head = report.best_vs_constant(f, "wiki")
    best = profiles.best_dynamic(records, "wiki")
    assert {(k[2], rec["config"]["sb"]) for k, rec in best.items()} == set(zip(head["budget"], head["best_sb"]))


def test_zero_shot_configs(records):
    p = profiles.parse_profile(
        {**SMOKE, "zero_shot": {"tasks": ["dynslice_cloze"], "limit": 4, "budgets": ["width"]}}, "t"
    )
    out = profiles.zero_shot_configs(p, records)
    assert [(c.sp, c.sb, c.budget, c.tasks, c.task_limit) for c in out] == [(0.3, 0.1, "width", ("dynslice_cloze",), 4)]


def test_zero_shot_table(records):
    f = report.records_frame(records)
    t = report.zero_shot_table(f, "wiki").set_index("method")
    assert list(t.index) == ["dense", "constant", "dynamic (equal mean width (paper))", "dynamic (equal parameters)"]
    assert t.loc["dynamic (equal mean width (paper))", "delta_points"] == pytest.approx(100 * (0.55 - 0.5))
    assert t.loc["dynamic (equal parameters)", "delta_points"] == pytest.approx(0.0)
    assert t.loc["dense", "acc_t0"] == 0.8


def test_auto_vs_sweep(records):
    a = report.auto_vs_sweep(report.records_frame(records), "wiki").iloc[0]
    assert (a["auto_sb"], a["auto_runs"], a["auto_grid"]) == (0.2, 3, 16)
    assert (a["sweep_sb"], a["sweep_ppl"], a["sweep_runs"]) == (0.1, 16.0, 4)  # 3 dynamic + constant
    # 3 grid runs of 10 + 2 s; the constant ran the tasks (eval 100 s): charged 10 + the grid's mean eval 2 s
    assert a["sweep_time_s"] == pytest.approx(3 * 12.0 + 12.0)
    assert a["ppl_gap_pct"] == pytest.approx(100 * (17.5 - 16) / 16)


def test_pct_change():
    assert report.pct_change(9.0, 10.0) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="old"):
        report.pct_change(1.0, 0.0)


def test_markdown_and_latex(tmp_path):
    frame = pd.DataFrame({"name": ["a_b", "c|d"], "n": [1234567, 2], "x": [1.23456, math.nan]})
    md = report.to_markdown(frame, digits={"x": 3})
    assert md.splitlines() == [
        "| name | n | x |",
        "|:---|---:|---:|",
        "| a_b | 1,234,567 | 1.235 |",
        r"| c\|d | 2 | – |",
    ]
    tex = report.to_latex(frame, digits=1, caption="50% of x_y", label="tab:t")
    assert r"\begin{tabular}{lrr}" in tex and r"a\_b & 1,234,567 & 1.2 \\" in tex
    assert r"\caption{50\% of x\_y}" in tex and r"c|d & 2 & -- \\" in tex
    md_path, tex_path = report.write_table(frame, tmp_path / "t" / "tab", caption="Cap")
    assert md_path.read_text().startswith("Cap\n\n| name")
    assert tex_path.read_text() == report.to_latex(frame, 2, "Cap", "tab:tab")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["tab.md", "tab.tex"]  # no temporary left


def test_load_records(tmp_path, records):
    for i, rec in enumerate(records):
        write_json(tmp_path / "m" / f"{i:02d}.json", rec)
    loaded = load_records(tmp_path)
    assert [r["path"] for r in loaded] == sorted(str(p) for p in tmp_path.rglob("*.json"))
    assert loaded[3]["ppl"] == read_json(tmp_path / "m" / "03.json")["ppl"]
    write_json(tmp_path / "m" / "zz.json", {"lr": [1]})
    with pytest.raises(ValueError, match="zz.json is not a run record"):
        load_records(tmp_path)


# ------------------------------------------------------------------ tables, narrative and check on published data
PUBLISHED_CPU = PROJECT_ROOT / "results" / "published" / "cpu"


@pytest.fixture(scope="module")
def published_frame():
    return report.records_frame(load_records(PUBLISHED_CPU / "runs"))


def test_write_tables_reproduces_the_published_tables(tmp_path, published_frame):
    """The tables notebook 05 writes, recomputed from the published records, equal the published files."""
    tables = report.write_tables(published_frame, tmp_path, "wiki")
    assert set(tables) == {"sweep", "headline", "auto_sb", "zero_shot"}
    for name in ("headline", "zero_shot"):
        assert read_json(tmp_path / f"{name}.json") == read_json(PUBLISHED_CPU / f"{name}.json"), name
    for name in ("sweep", "headline", "auto_sb", "zero_shot"):
        for ext in ("md", "tex"):
            assert (tmp_path / "tables" / f"{name}.{ext}").read_text() == (
                PUBLISHED_CPU / "tables" / f"{name}.{ext}"
            ).read_text(), (name, ext)


def test_write_tables_on_a_subset(tmp_path, published_frame):
    """Any subset of runs works: SP 0.3 only, without the zero-shot copies of the best dynamic SB."""
    f = published_frame
    sub = f[f["sp"].isin([0.0, 0.3]) & ~(f["zero_shot"] & (f["kind"] == "dynamic"))]
    tables = report.write_tables(sub, tmp_path, "wiki")
    assert list(tables["headline"]["sp"]) == [0.3, 0.3]
    assert tables["headline"]["acc_delta_points"].isna().all()  # no dynamic run carries the tasks
    assert list(tables["zero_shot"]["method"]) == ["dense", "constant"]
    assert read_json(tmp_path / "headline.json")[0]["acc_dynamic"] is None  # NaN written as null


def test_narrative_states_the_numbers(published_frame):
    from dynslice.publish import narrative

    head = report.headline_table(published_frame, "wiki")
    best = report.best_vs_constant(published_frame, "wiki")
    text = narrative.sweep_text(best, "wiki")
    row = best[(head["sp"] == 0.3) & (head["comparison"] == "equal mean width (paper)")].iloc[0]
    assert f"{row['ppl_wiki_dynamic']:.2f} vs {row['ppl_wiki_constant']:.2f}" in text
    assert f"{-row['ppl_wiki_change_pct']:.1f}% lower perplexity, more than the paper's up to 7%" in text
    zs = narrative.zero_shot_text(head)
    assert "0.390 vs 0.380 (+1.0 points, within the paper's up to 5)" in zs  # SP 0.2
    assert "0.370 vs 0.330 (+4.0 points, within the paper's up to 5)" in zs  # SP 0.3
    worse = head.assign(ppl_wiki_change_pct=lambda f: f["ppl_wiki_change_pct"].abs())
    assert "gains nothing" in narrative.headline_text(worse, "wiki")


def test_noise_text_sets_each_difference_against_both_spreads(published_frame):
    """Each headline difference is printed with its verdict: within noise when no larger than the measured
    numerical spread or two calibration-seed sds; zero-shot differences against their sampling standard error."""
    from dynslice.publish import narrative
    from dynslice.publish.repro import measured_noise

    noise = measured_noise()
    head = report.headline_table(published_frame, "wiki")
    text = narrative.noise_text(head, "wiki", noise, documents=100)
    numerical = noise["tolerances"]["by_quantity"]["ppl_change_pct"]["largest_seen"]
    seed = noise["seed_spread"]["paired_change"]["wiki"]["change_sd_points"]
    assert f"sd {seed:.1f} points" in text
    for _, r in head.iterrows():
        d = r["ppl_wiki_change_pct"]
        verdict = "within noise" if abs(d) <= max(numerical, 2 * seed) else "beyond both spreads"
        assert f"- SP {r['sp']:g}, {r['comparison']}: {d:+.1f}% ({verdict})." in text
    assert "+4.0 points, standard error" in text  # SP 0.3 at 100 documents: inside two standard errors
    assert text.count("(within noise)") >= 2
    small = narrative.noise_text(head.assign(ppl_wiki_change_pct=0.1), "wiki", noise)
    assert "beyond both spreads" not in small and small.count("within noise") >= len(head)


def test_check_tolerances_and_names(tmp_path):
    from dynslice.publish import repro

    numbers = repro.headline_numbers(PUBLISHED_CPU)
    assert numbers["smollm2-135m/dense-zs params"] == ("params", 134515008.0)
    assert numbers["smollm2-135m/dense-zs ppl wiki"][0] == "ppl_dense"
    assert numbers["smollm2-135m/sp0.20-sb0.10-width-calwiki ppl wiki"][0] == "ppl_sliced"
    assert numbers["smollm2-135m/sp0.30-sbauto-width-calwiki chosen SB"][0] == "sb"
    measured, exact = repro.measured_tolerances(), repro.identical_tolerances()
    tol = measured["ppl_sliced"].rel
    changed = dict(numbers)
    name = "smollm2-135m/sp0.20-sb0.10-width-calwiki ppl news"
    q, v = changed[name]
    changed[name] = (q, v * (1 + tol / 2))  # inside the measured tolerance, outside the exact one
    assert all(r.status == "ok" for r in repro.compare(numbers, changed, measured))
    assert {r.name for r in repro.compare(numbers, changed, exact) if r.status != "ok"} == {name}
    changed[name] = (q, v * (1 + 2 * tol))
    changed["smollm2-135m/dense-zs params"] = ("params", 134515009.0)  # params are exact in every regime
    del changed["smollm2-135m/dense-zs acc average"]
    rows = {r.name: r.status for r in repro.compare(numbers, changed, measured)}
    assert rows[name] == "FAIL" and rows["smollm2-135m/dense-zs params"] == "FAIL"
    assert rows["smollm2-135m/dense-zs acc average"] == "MISSING"
    assert sum(s != "ok" for s in rows.values()) == 3
