"""The ablation experiment (notebook 06): allocations at equal parameters, disjoint calibration, statistics, and
a full tiny run through the module and through run_all.sh."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.core.allocate import allocate, constant_width
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, sliced_params
from dynslice.experiment import ablations as A
from dynslice.experiment import statistics as ST
from dynslice.experiment.profiles import ablation as AB
from dynslice.measure import data
from dynslice.measure.evaluate import perplexity
from dynslice.publish import ablations as PA
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.paths import PROJECT_ROOT

LR = [0.0, 0.9, 0.8, 1.0, 0.85, 0.95, 0.7, 0.5]  # normalised, layer 0 least redundant (as on SmolLM2)


@pytest.fixture(scope="module")
def dims() -> ArchDims:
    """An 8-layer, D=128 Llama with a small vocabulary: every method is feasible at the params budget."""
    return ArchDims(
        vocab=96,
        hidden=128,
        layers=8,
        intermediate=264,
        heads=8,
        kv_heads=2,
        head_dim=16,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        tied=True,
    )


@pytest.fixture(scope="module")
def allocs(dims):
    vecs = A.score_vectors({"cosine": LR}, permutations=5, seed=0)
    return A.allocations(vecs, AB.AblationConfig(sp=(0.3,), round_interval=8).run_config(0.3), 0.0, dims, AB.BUDGETS)


def _one_step(dims, widths, ri=8) -> int:
    """The largest change in the total count that moving one layer's width by one rounding unit makes."""
    base = sliced_params(dims, widths).total
    steps = []
    for i, w in enumerate(widths):
        for dw in (-ri, ri):
            if ri <= w + dw <= dims.hidden:
                moved = list(widths)
                moved[i] = w + dw
                steps.append(abs(sliced_params(dims, moved).total - base))
    return max(steps)


def test_params_budget_matches_constant_within_one_rounding_step(dims, allocs):
    target = sliced_params(dims, list(allocs[("constant", "params")].widths)).total
    keys = [k for k in allocs if k[1] == "params" and k[0] != "constant"]
    assert {A.method_of(k[0]) for k in keys} == {"lr", "first_layer", "shuffled", "inverted"}
    for key in keys:
        alloc = allocs[key]
        assert not isinstance(alloc, str), (key, alloc)
        assert abs(alloc.params.total - target) <= _one_step(dims, list(alloc.widths)), key
        assert len(set(alloc.widths)) > 1, key  # really dynamic


def test_width_budget_keeps_the_mean_width(dims, allocs):
    const = constant_width(dims.hidden, 0.3, 8)
    for key, alloc in allocs.items():
        if key[1] == "width":
            assert sum(alloc.widths) == dims.layers * const, key


def test_first_layer_only_slices_layer0_at_sb_and_the_rest_equally(dims, allocs):
    for budget in AB.BUDGETS:
        alloc = allocs[("first_layer", budget)]
        assert alloc.fractions[0] == pytest.approx(0.0)
        assert alloc.widths[0] == dims.hidden
        assert np.ptp(alloc.fractions[1:]) == pytest.approx(0.0)
        assert alloc.fractions[1] > 0.3
        assert max(alloc.widths[1:]) - min(alloc.widths[1:]) <= 8  # one rounding unit at most


def test_inverted_slices_the_least_redundant_most(dims, allocs):
    lr_alloc, inv = allocs[("lr", "params")], allocs[("inverted", "params")]
    least, most = int(np.argmin(LR)), int(np.argmax(LR))
    assert inv.widths[least] == min(inv.widths) and inv.widths[most] == max(inv.widths)
    assert lr_alloc.widths[least] == max(lr_alloc.widths) and lr_alloc.widths[most] == min(lr_alloc.widths)
    # one peaked layer cannot absorb the whole budget at SB 0: the lowest feasible SB on the 0.02 grid is used
    assert lr_alloc.sb == 0.0 and 0.0 < inv.sb < 0.3
    with pytest.raises(ValueError, match="sb"):
        allocate(
            np.asarray(1.0 - np.asarray(LR)), 0.3, round(inv.sb - 0.02, 10), dims.hidden, budget="params", dims=dims
        )


def test_shuffled_vectors_are_seeded_permutations():
    a = A.score_vectors({"cosine": LR}, permutations=5, seed=3)
    b = A.score_vectors({"cosine": LR}, permutations=5, seed=3)
    shuffled = [a[f"shuffled/{k}"] for k in range(5)]
    for k, v in enumerate(shuffled):
        np.testing.assert_array_equal(v, b[f"shuffled/{k}"])
        np.testing.assert_array_equal(np.sort(v), np.sort(LR))
    assert len({tuple(v) for v in shuffled}) == 5
    c = A.score_vectors({"cosine": LR}, permutations=5, seed=4)
    assert any(not np.array_equal(c[f"shuffled/{k}"], shuffled[k]) for k in range(5))


def test_bi_normalises_to_lr_and_angular_does_not():
    model = make_tiny_model("llama", layers=4)
    batch = make_batch()
    n = {m: layer_redundancy(model, batch, metric=m, progress=False).normalized for m in ("cosine", "bi", "angular")}
    np.testing.assert_allclose(n["bi"], n["cosine"], atol=1e-9)
    sim = A.score_similarity({m: {"normalized": v} for m, v in n.items()})
    assert sim["bi"]["max_abs_diff"] < 1e-9 and sim["angular"]["pearson"] > 0.5


def test_disjoint_calibration_windows(smol_tokenizer):
    sets = A.disjoint_calibration("wiki", smol_tokenizer, nsamples=8, seqlen=64, n_sets=3, seed=42)
    stream = data.token_stream("wiki", "train", smol_tokenizer)
    chunks = stream[: stream.numel() // 64 * 64].reshape(-1, 64)
    used = []
    for s in sets:
        assert s["input_ids"].shape == (8, 64) and bool(s["attention_mask"].all())
        for row in s["input_ids"]:
            hits = torch.nonzero((chunks == row).all(1)).flatten().tolist()
            assert hits, "every window is an aligned chunk of the train stream"
            used.append(hits[0])
    assert len(set(used)) == len(used) == 24  # no chunk is in two windows
    again = A.disjoint_calibration("wiki", smol_tokenizer, nsamples=8, seqlen=64, n_sets=3, seed=42)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(sets, again, strict=True))
    with pytest.raises(ValueError, match="seeds"):
        A.disjoint_calibration("wiki", smol_tokenizer, nsamples=10**6, seqlen=64, n_sets=3)


def test_chunk_nll_gives_the_evaluate_perplexity():
    model = make_tiny_model("llama", layers=2)
    chunks = make_batch(n=5, seqlen=20, padded=False)["input_ids"]
    nll = A.chunk_nll(model, chunks, batch_size=2)
    assert nll.shape == (5,)
    assert A.ppl_from_nll(nll, 19) == pytest.approx(perplexity(model, chunks, batch_size=3), rel=1e-6)


def test_statistics():
    from scipy import stats

    a, b = [3.0, 3.2, 3.1, 3.4], [3.3, 3.4, 3.3, 3.9]
    t = ST.paired_t(a, b)
    ref = stats.ttest_rel(a, b)
    assert t["t"] == pytest.approx(ref.statistic) and t["p"] == pytest.approx(ref.pvalue)
    assert ST.paired_t([1.0], [2.0])["p"] is None
    rng = np.random.default_rng(0)
    base = rng.uniform(500, 700, size=(3, 16))
    same = ST.bootstrap_gap(base, base, 255, 500, 0)
    assert same["change"] == 0 and same["ci95"] == [0.0, 0.0]
    better = ST.bootstrap_gap(base - 20, base, 255, 500, 0)  # lower NLL on every chunk
    assert better["ci95"][1] < 0 and better["p_no_gain"] == 0
    assert better["change"] == pytest.approx(math.expm1(-20 * 16 / (16 * 255)))


def test_config_validation():
    with pytest.raises(ValueError, match="sb"):
        AB.AblationConfig(sp=(0.3,), sb=0.3)
    with pytest.raises(ValueError, match="unknown"):
        AB.AblationConfig.from_dict({"spp": [0.3]})
    with pytest.raises(ValueError, match="permutations"):
        AB.AblationConfig(permutations=0)
    cfg = AB.load_config(AB.settings_path(), "ablations")
    assert cfg.seeds >= 3 and cfg.permutations >= 5 and set(cfg.budgets) == set(AB.BUDGETS)
    assert AB.load_config(AB.settings_path(), "no-such-profile") is None


TINY = {
    "model": "tiny-random",
    "cal_nsamples": 4,
    "cal_seqlen": 64,
    "ppl_seqlen": 64,
    "ppl_max_chunks": 4,
    "batch_size": 4,
    "bootstrap": 200,
    "sp": (0.3,),
    "sb": 0.2,
    "seeds": 3,
    "permutations": 5,
}


def test_full_tiny_run_writes_a_valid_record(tmp_path):
    cfg = AB.AblationConfig(**TINY)
    out = tmp_path / "ablations.json"
    rec = A.run(cfg, out, progress=False)
    disk = read_json(out)
    assert disk["config"] == cfg.to_json() and PA.answer(disk) == PA.answer(rec) and PA.answer(rec)
    rows = [r for r in disk["rows"] if not r.get("infeasible")]
    methods = {r["method"] for r in rows}
    assert {"dense", "constant", "lr", "bi", "angular", "shuffled", "shortgpt"} <= methods
    assert all(r["infeasible"].startswith("sb:") for r in disk["rows"] if r.get("infeasible"))
    seeds = {r["seed"] for r in rows if r["method"] == "constant" and r["budget"] == "params"}
    assert seeds == {0, 1, 2}
    for r in rows:
        assert all(math.isfinite(v) and v > 1 for v in r["ppl"].values())
        assert len(r["chunk_nll"]["wiki"]) == 4
    # BI has LR's widths, hence LR's numbers (same seed, same widths: one slicing)
    lr0 = next(r for r in rows if r["key"] == "lr" and r["budget"] == "width" and r["seed"] == 0)
    bi0 = next(r for r in rows if r["key"] == "bi" and r["budget"] == "width")
    assert bi0["widths"] == lr0["widths"] and bi0["ppl"] == lr0["ppl"]
    short = next(r for r in rows if r["method"] == "shortgpt")
    assert short["params"] <= short["target_params"]
    tests = disk["gap_tests"]
    assert {t["dataset"] for t in tests} == {"wiki", "news"} and all(t["seeds"] == 3 for t in tests)
    assert {s["method"] for s in disk["summary"]} == methods
    # a second call with the same config returns the record on disk without recomputing
    mtime = out.stat().st_mtime_ns
    assert A.run(cfg, out, progress=False)["rows"] == disk["rows"] and out.stat().st_mtime_ns == mtime
    md, tex = PA.write_tables(disk, tmp_path / "tables" / "ablations")
    assert "shuffled LR" in md.read_text() and r"\begin{tabular}" in tex.read_text()
    PA.figure(disk).savefig(tmp_path / "ablations.pdf")
    assert (tmp_path / "ablations.pdf").stat().st_size > 1000


def test_notebook_06_is_parameterised_and_clean():
    import nbformat

    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "06_ablations.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for var in ('profile = "cpu"', 'root = "results"', 'figures = "figures/runs"', "force = False"):
        assert var in tagged[0].source
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_run_all_only_06_on_smoke(tmp_path):
    env = {**os.environ, "DYNSLICE_PYTHON": sys.executable}
    proc = subprocess.run(
        [
            str(PROJECT_ROOT / "run_all.sh"),
            "--profile",
            "smoke",
            "--only",
            "06",
            "--root",
            str(tmp_path / "r"),
            "--figures",
            str(tmp_path / "f"),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = read_json(tmp_path / "r" / "smoke" / "ablations.json")
    assert PA.answer(rec) and rec["summary"]
    assert (tmp_path / "r" / "smoke" / "tables" / "ablations.md").is_file()
    assert (tmp_path / "f" / "smoke" / "ablations.pdf").is_file()


def test_a_stopped_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    cfg = AB.AblationConfig(**{**TINY, "permutations": 1, "seeds": 2, "budgets": ("params",)})
    out = tmp_path / "ablations.json"
    real = A._Context.sliced_eval
    calls = {"n": 0}

    def stop_after_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("stopped")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(A._Context, "sliced_eval", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        A.run(cfg, out, progress=False)
    partial = read_json(tmp_path / "ablations.partial.json")
    assert set(partial["rows"]) == {"dense", "0.3|constant|params|0", "0.3|lr|params|0"}
    assert not out.exists()
    monkeypatch.setattr(A._Context, "sliced_eval", real)
    resumed = A.run(cfg, out, progress=False)
    assert not (tmp_path / "ablations.partial.json").exists()
    assert resumed["rows"][:3] == [partial["rows"][k] for k in ("dense", "0.3|constant|params|0", "0.3|lr|params|0")]
    fresh = A.run(cfg, tmp_path / "fresh.json", progress=False)
    assert read_json(out)["rows"] == fresh["rows"]  # same config -> same numbers, resumed or not


# ------------------------------------------------------------------------------- the ablations profile, run_all.sh
REDUCED = PROJECT_ROOT / "bench" / "results" / "ablations_reduced_smollm2.json"


def test_profiles_choose_their_notebooks(tmp_path):
    from dynslice.experiment.profiles import load_profile

    assert load_profile("ablations").notebooks == ("06",)
    assert not load_profile("cpu").runs_notebook("06_ablations") and load_profile("cpu").runs_notebook("05_x")
    assert load_profile("smoke").runs_notebook("06_ablations")  # no notebooks key: every notebook
    assert AB.load_config(AB.settings_path(), "cpu") is None  # the full run lives in the ablations profile only
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodels: [tiny-random]\ncal_datasets: [wiki]\nsp: [0.3]\nnotebooks: ['6a']\n")
    with pytest.raises(ValueError, match=r"bad\.notebooks: '6a'"):
        load_profile(bad)


def test_answer_compares_single_seed_methods_with_seed_0():
    record = read_json(REDUCED)
    text = PA.answer(record)
    seed0 = {
        r["method"]: r["ppl"]["wiki"]
        for r in record["rows"]
        if r["sp"] == 0.3 and r["budget"] == "params" and r.get("seed") == 0
    }
    assert f"constant gives {seed0['constant']:.2f} and LR {seed0['lr']:.2f}" in text
    share = (seed0["constant"] - seed0["first_layer"]) / (seed0["constant"] - seed0["lr"])
    assert f"about {100 * share:.0f}% of LR's gain" in text
    means = {s["method"]: s["ppl"]["wiki"]["mean"] for s in record["summary"] if s["budget"] == "params"}
    assert f"{means['lr']:.2f} against constant slicing's {means['constant']:.2f}" in text
    assert "  " not in text


def test_repro_checks_an_ablations_record(tmp_path, capsys):
    from dynslice.publish import repro

    pub, res = tmp_path / "pub", tmp_path / "res"
    for folder in (pub, res):
        folder.mkdir()
        shutil.copy(REDUCED, folder / "ablations.json")
    assert repro.main(["check", str(res), str(pub)]) == 0
    rec = read_json(res / "ablations.json")
    lr = next(s for s in rec["summary"] if s["method"] == "lr" and s["budget"] == "params")
    # the reduced record ran unpinned, so the check applies the measured tolerance; move it by twice that
    assert repro.regime(pub, res).name == "different arithmetic"
    lr["ppl"]["wiki"]["mean"] *= 1 + 2 * repro.measured_tolerances()["ppl_sliced"].rel
    write_json(res / "ablations.json", rec)
    assert repro.main(["check", str(res), str(pub)]) == 1
    assert "ablations lr SP 0.3 params ppl wiki" in capsys.readouterr().out


@pytest.mark.slow
def test_run_all_runs_only_the_profiles_notebooks(tmp_path):
    """A profile with `notebooks: ["06"]` (smoke's tiny settings) runs notebook 06 alone, then skips the check."""
    env = {**os.environ, "DYNSLICE_PYTHON": sys.executable}
    prof = tmp_path / "smoke06.yaml"
    smoke = PROJECT_ROOT / "dynslice" / "experiment" / "profiles" / "smoke.yaml"
    prof.write_text(smoke.read_text() + '\nnotebooks: ["06"]\n')
    args = [
        str(PROJECT_ROOT / "run_all.sh"),
        "--profile",
        str(prof),
        "--root",
        str(tmp_path / "r"),
        "--figures",
        str(tmp_path / "f"),
    ]
    proc = subprocess.run(args, cwd=PROJECT_ROOT, env=env, text=True, capture_output=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== 06_ablations.ipynb" in proc.stdout and "01_layer_redundancy" not in proc.stdout
    assert (tmp_path / "r" / "smoke" / "ablations.json").is_file()
    assert not (tmp_path / "r" / "smoke" / "runs").exists()
    assert read_json(tmp_path / "r" / "smoke" / "RUN.json")["status"] == "finished"
    bad = subprocess.run(
        [
            str(PROJECT_ROOT / "run_all.sh"),
            "--profile",
            "cpu",
            "--only",
            "06",
            "--root",
            str(tmp_path / "r2"),
            "--figures",
            str(tmp_path / "f2"),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and "--only 06: profile cpu runs no notebook" in bad.stderr
