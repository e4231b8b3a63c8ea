"""The compression frontier (notebook 07): matched sizes, LR-guided deletion + slicing, the winner table's
"within noise" rule, the profile's frontier:/rft: sections, and a tiny frontier end to end through run_all.sh."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from dynslice.core.adapters import count_parameters
from dynslice.core.params import ArchDims, dense_params, sliced_params
from dynslice.core.shortgpt import delete_layers, params_after_deletion
from dynslice.experiment import frontier as FR
from dynslice.experiment import pipeline
from dynslice.experiment.profiles import load_profile, parse_profile
from dynslice.experiment.profiles.frontier import FrontierConfig
from dynslice.publish import frontier as PF
from dynslice.publish import repro
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.paths import PROJECT_ROOT

#: SmolLM2-135M's shapes (read from its config by ArchDims.from_config; written out so no model is loaded).
SMOL = ArchDims(
    vocab=49152,
    hidden=576,
    layers=30,
    intermediate=1536,
    heads=9,
    kv_heads=3,
    head_dim=64,
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    tied=True,
)
#: An LR curve shaped like SmolLM2's: layer 0 far below the rest.
LR = {"lr": [0.002] + [0.77 + 0.2 * ((7 * i) % 29) / 28 for i in range(1, 30)], "metric": "cosine"}


def _run_cfg(**kw):
    return FrontierConfig(**kw).run_config(0)


# ------------------------------------------------------------------------------------------------ matched sizes
@pytest.mark.parametrize("size", [1, 4, 8, 11])
def test_constant_slicing_takes_the_sp_closest_to_each_target(size):
    run = _run_cfg()
    target = FR.target_params(SMOL, size)
    assert target == params_after_deletion(SMOL, size)
    sp, alloc = FR.sp_for_target(run, SMOL, target)
    total = sliced_params(SMOL, alloc.widths).total
    assert len(set(alloc.widths)) == 1 and alloc.widths[0] == int((1 - sp) * SMOL.hidden)
    # no other constant width of the grid is closer to the target
    for w in range(8, SMOL.hidden, 8):
        assert abs(sliced_params(SMOL, [w] * SMOL.layers).total - target) >= abs(total - target)
    # one width step of 8 moves SmolLM2 by about 1.65% of its parameters: closest means within half of it
    assert abs(total - target) / dense_params(SMOL) < 0.0085


@pytest.mark.parametrize("size", [4, 11])
def test_lr_dynamic_slicing_at_that_sp_has_constant_slicings_size(size):
    run = _run_cfg()
    sp, const = FR.sp_for_target(run, SMOL, FR.target_params(SMOL, size))
    alloc = FR.lr_allocation(run.replace(sp=sp, sb=sp), SMOL, LR, 0.0)
    assert alloc.widths[0] == max(alloc.widths) > min(alloc.widths)  # layer 0 (least redundant) kept widest
    const_total = sliced_params(SMOL, const.widths).total
    assert abs(sliced_params(SMOL, alloc.widths).total - const_total) / const_total < 0.005


def test_lr_allocation_raises_sb_until_the_budget_is_feasible():
    run = _run_cfg(sb_step=0.1).replace(sp=0.5, sb=0.5)
    spiky = {"lr": [1.0] + [0.0] * 29, "metric": "cosine"}  # one layer would have to be sliced entirely at SB 0
    alloc = FR.lr_allocation(run, SMOL, spiky, 0.0)
    assert alloc.sb > 0.0 and alloc.sb <= 0.5


def test_lr_guided_deletion_picks_the_most_redundant_layers():
    assert FR.most_redundant({"lr": [0.1, 0.9, 0.5, 0.95, 0.2], "metric": "cosine"}, 2) == [1, 3]
    # BI (1 - cos) is oriented the other way: its most redundant layers are the lowest
    assert FR.most_redundant({"lr": [0.9, 0.1, 0.5, 0.05, 0.8], "metric": "bi"}, 2) == [1, 3]


@pytest.mark.parametrize("size", [1, 4, 8, 11])
def test_deletion_plus_slicing_hits_the_target(size):
    cfg = FrontierConfig()
    drop = FR.most_redundant(LR, cfg.delete_count(size))
    assert 0 not in drop and len(drop) == cfg.delete_count(size) <= max(1, size - 1)
    dims = FR.shortened(SMOL, drop)
    sp, alloc = FR.sp_for_target(cfg.run_config(0), dims, FR.target_params(SMOL, size))
    total = sliced_params(dims, alloc.widths).total
    assert abs(total - FR.target_params(SMOL, size)) / dense_params(SMOL) < 0.0085


def test_delete_count():
    cfg = FrontierConfig(delete_share=0.5)
    assert [cfg.delete_count(k) for k in (1, 2, 4, 8, 11)] == [1, 1, 2, 4, 6]
    assert FrontierConfig(delete_share=0.99).delete_count(4) == 3  # slicing always does part of the work


@pytest.fixture(scope="module")
def tiny_bench():
    return pipeline.Workbench("tiny-random")


def test_deleted_and_sliced_model_has_the_counted_parameters_and_the_dense_logits(tiny_bench):
    """Deleting the highest-LR layers and slicing the rest at full width (a rotation only) gives a model whose
    parameter count is the formula's and whose logits are those of the shortened dense model."""
    cfg = FrontierConfig(model="tiny-random", cal_nsamples=4, cal_seqlen=32, round_interval=8)
    dims = tiny_bench.dims()
    lr = tiny_bench.lr(cfg.run_config(0))
    drop = tuple(FR.most_redundant(lr, 1))
    full = tuple([dims.hidden] * (dims.layers - 1))
    expected = sliced_params(FR.shortened(dims, drop), full).total
    plan = FR.Plan("delete_slice", 1, 0, 0, drop, full, 0.01, 0.01, expected)
    model = FR.build(cfg, tiny_bench, plan)
    assert count_parameters(model) == expected
    short = delete_layers(tiny_bench.load(), drop)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, short(input_ids=ids).logits, atol=2e-4, rtol=1e-4)
    # and a sliced plan whose expected count is wrong is refused
    with pytest.raises(RuntimeError, match="parameter accounting"):
        FR.build(cfg, tiny_bench, dataclasses.replace(plan, expected_params=expected + 1))


def test_plans_share_a_model_only_when_it_is_the_same(tiny_bench):
    cfg = FrontierConfig(model="tiny-random", cal_nsamples=4, cal_seqlen=32, sizes=(1,))
    a = FR.plan_point(cfg, tiny_bench, "shortgpt", 1, 0)
    b = FR.plan_point(cfg, tiny_bench, "shortgpt", 1, 1)
    assert a.widths is None and a.expected_params == params_after_deletion(tiny_bench.dims(), 1)
    assert (a.identity == b.identity) == (a.deleted == b.deleted)  # no calibration in a deletion
    c0 = FR.plan_point(cfg, tiny_bench, "constant", 1, 0)
    c1 = FR.plan_point(cfg, tiny_bench, "constant", 1, 1)
    assert c0.widths == c1.widths and c0.identity != c1.identity  # same widths, other calibration windows
    with pytest.raises(ValueError, match="method"):
        FR.plan_point(cfg, tiny_bench, "magic", 1, 0)


# ------------------------------------------------------------------------------------------- the winner table
def _record(means: dict[str, dict[int, tuple[float, float]]], sizes=(1, 4)) -> dict:
    """A frontier record with the given after-RFT (mean, sd) per method and size; before RFT = 2x after."""
    cfg = FrontierConfig(sizes=sizes, seeds=(0, 1), ppl_datasets=("wiki",), methods=tuple(means))
    summary = []
    for size in sizes:
        for m, by_size in means.items():
            mean, sd = by_size[size]
            summary.append(
                {
                    "method": m,
                    "size": size,
                    "n": 2,
                    "params": 1e8,
                    "fraction_removed": 0.026 * size + 0.001,
                    "target_fraction": 0.026 * size,
                    "ppl": {
                        "before": {"wiki": {"mean": 2 * mean, "sd": sd, "n": 2}},
                        "after": {"wiki": {"mean": mean, "sd": sd, "n": 2}},
                    },
                }
            )
    return {
        "config": cfg.to_json(),
        "rft": {"steps": 8, "batch_size": 4, "grad_accum": 1, "seqlen": 128, "dataset": "wiki"},
        "dense": {"ppl": {"wiki": 20.0}, "params": 134_515_008},
        "dense_params": 134_515_008,
        "dims": SMOL.to_json(),
        "summary": summary,
        "points": [],
    }


def test_within_noise_rule():
    assert PF.within_noise({"mean": 100.0, "sd": 0.0}, {"mean": 101.0, "sd": 0.0}, 0.02)  # 1% < 2% noise
    assert not PF.within_noise({"mean": 100.0, "sd": 1.0}, {"mean": 110.0, "sd": 1.0}, 0.02)  # 10%, no overlap
    assert PF.within_noise({"mean": 100.0, "sd": 6.0}, {"mean": 110.0, "sd": 5.0}, 0.02)  # spreads overlap
    assert not PF.within_noise({"mean": 100.0, "sd": None}, {"mean": 103.0, "sd": None}, 0.02)


def test_winner_table_names_the_best_its_margin_and_the_verdict():
    rec = _record(
        {
            "constant": {1: (50.0, 1.0), 4: (90.0, 2.0)},
            "lr": {1: (40.0, 1.0), 4: (89.5, 0.1)},
            "shortgpt": {1: (20.0, 0.0), 4: (200.0, 0.0)},
        }
    )
    rows = {(w["size"], w["stage"]): w for w in PF.winners(rec, rel_noise=0.02)}
    one, four = rows[(1, "after")], rows[(4, "after")]
    assert one["best"] == "shortgpt" and one["runner_up"] == "lr" and one["margin_pct"] == pytest.approx(100.0)
    assert one["within_noise"] is False
    assert four["best"] == "lr" and four["runner_up"] == "constant" and four["within_noise"] is True
    table = PF.winner_table(rec, rel_noise=0.02)
    assert list(table["verdict"]) == ["clear", "clear", "within noise", "within noise"]
    text = PF.answer(rec, rel_noise=0.02)
    assert "ShortGPT (delete layers) wins at 3%" in text and "within noise of constant slicing" in text
    assert "7–8B" in text and "RFT (8 LoRA steps of 4 × 128 tokens)" in text
    assert PF.noise()["rel"] == repro.measured_tolerances()["ppl_sliced"].rel


# ------------------------------------------------------------------------------------------------ the profile
def test_frontier_profile_sections_parse():
    prof = load_profile("frontier")
    assert prof.notebooks == ("07",) and prof.numerics == "pinned"
    f, r = prof.frontier, prof.rft
    assert f.sizes == (1, 4, 8, 11) and len(f.seeds) >= 3 and set(f.methods) == set(FR.METHODS)
    fractions = [1 - params_after_deletion(SMOL, k) / dense_params(SMOL) for k in f.sizes]
    assert fractions[0] < 0.03 and fractions[-1] > 0.28  # ~2% to ~30% of the parameters removed
    assert r.steps >= 1 and r.to_json()["seqlen"] == 128
    assert load_profile("smoke").frontier.model == "tiny-random"
    assert load_profile("cpu").frontier is None and load_profile("cpu").rft is None


def _frontier_obj(**changes):
    import yaml

    obj = yaml.safe_load((PROJECT_ROOT / "dynslice" / "experiment" / "profiles" / "frontier.yaml").read_text())
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if value is None:
            obj[section].pop(name) if name else obj.pop(section)
        else:
            obj[section][name] = value
    return obj


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frontier.sizes": []}, r"^f\.frontier\.sizes: \[\] must be a non-empty list"),
        ({"frontier.sizes": [1, 1]}, r"^f\.frontier\.sizes: "),
        ({"frontier.sizes": [0]}, r"^f\.frontier\.sizes\[\]: "),
        ({"frontier.methods": ["constant", "magic"]}, r"^f\.frontier\.methods: .* must be distinct names from"),
        ({"frontier.seeds": [0, -1]}, r"^f\.frontier\.seeds\[\]: "),
        ({"frontier.delete_share": 1.5}, r"^f\.frontier\.delete_share: 1\.5 is outside 0 < delete_share < 1"),
        ({"frontier.task_points": "some"}, r"^f\.frontier\.task_points: 'some' is not one of all, winners"),
        ({"frontier.cal_nsamples": 0}, r"^f\.frontier\.cal_nsamples: "),
        ({"frontier.sizez": [1]}, r"^f\.frontier\.sizez: unknown key \(allowed: "),
        ({"rft.steps": 0}, r"^f\.rft\.steps: "),
        ({"rft.learning_rate": 2.0}, r"^f\.rft\.learning_rate: "),
        ({"rft.stepz": 3}, r"^f\.rft\.stepz: "),
        ({"rft": None}, r"^f\.rft: a frontier: section needs an rft: section"),
    ],
)
def test_bad_frontier_and_rft_sections_get_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_profile(_frontier_obj(**change), "f")
    assert "\n" not in str(err.value)


def test_frontier_sizes_beyond_the_model_are_refused_before_any_work(tiny_bench):
    cfg = FrontierConfig(model="tiny-random", sizes=(4,))  # tiny-random has 4 layers: deleting 4 leaves none
    with pytest.raises(ValueError, match="n_deleted"):
        FR.target_params(tiny_bench.dims(), 4)
    assert cfg.sizes == (4,)


# --------------------------------------------------------------------------------------------- the whole thing
@pytest.mark.slow
def test_a_tiny_frontier_runs_resumes_and_is_checked(tmp_path, tiny_bench):
    prof = load_profile("smoke")
    cfg = dataclasses.replace(prof.frontier, sizes=(1,), seeds=(0, 1), tasks=(), methods=("constant", "shortgpt"))
    out = tmp_path / "frontier.json"
    rec = FR.run(cfg, prof.rft, out, bench=tiny_bench, progress=False)
    names = sorted(p.stem for p in (tmp_path / "frontier" / "points").glob("*.json"))
    assert names == ["constant-k01-seed0", "constant-k01-seed1", "dense", "shortgpt-k01-seed0", "shortgpt-k01-seed1"]
    short = [p for p in rec["points"] if p["method"] == "shortgpt"]
    assert short[1]["same_model_as"] == "shortgpt-k01-seed0" and short[1]["after"] == short[0]["after"]
    for p in rec["points"]:
        assert p["before"]["ppl"] != p["after"]["ppl"]  # RFT changed the weights
    assert {(s["method"], s["n"]) for s in rec["summary"]} == {("constant", 2), ("shortgpt", 2)}
    # resume: a lost record is rebuilt from the per-point files without recomputing them
    out.unlink()
    (tmp_path / "frontier" / "points" / "constant-k01-seed1.json").unlink()
    again = FR.run(cfg, prof.rft, out, bench=tiny_bench, progress=False)
    assert not (tmp_path / "frontier" / "rft-checkpoints" / "constant-k01-seed1").exists()  # discarded once done

    def numbers(r):
        return [(p["name"], p["params"], p["before"], p["after"], p["rft"]["final_loss"]) for p in r["points"]]

    assert numbers(again) == numbers(rec)  # the removed point is recomputed bit for bit
    # the reproduction check reads the record
    pub = tmp_path / "pub"
    pub.mkdir()
    write_json(pub / "frontier.json", read_json(out))
    assert repro.main(["check", str(tmp_path), str(pub)]) == 0
    changed = read_json(out)
    changed["summary"][0]["ppl"]["after"]["wiki"]["mean"] *= 1.5
    write_json(out, changed)
    assert repro.main(["check", str(tmp_path), str(pub)]) == 1


def test_notebook_07_is_parameterised_and_clean():
    import nbformat

    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "07_frontier.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for var in ('profile = "cpu"', 'root = "results"', 'figures = "figures/runs"', "force = False"):
        assert var in tagged[0].source
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code")
    assert "frontier.run(" in "".join(c.source for c in nb.cells)


@pytest.mark.slow
def test_run_all_frontier_on_a_tiny_profile_end_to_end(tmp_path):
    """A tiny frontier (the smoke profile's settings, notebook 07 only) through run_all.sh: papermill, the record,
    the tables, the figure, --publish and the reproduction check against what it published."""
    prof = tmp_path / "tinyfrontier.yaml"
    smoke = (PROJECT_ROOT / "dynslice" / "experiment" / "profiles" / "smoke.yaml").read_text()
    prof.write_text(smoke.replace("name: smoke", "name: tinyfrontier") + '\nnotebooks: ["07"]\n')
    env = {**os.environ, "DYNSLICE_PYTHON": sys.executable}
    common = ["--profile", str(prof), "--root", str(tmp_path / "r"), "--figures", str(tmp_path / "f")]

    def run_all(*args):
        return subprocess.run(
            [str(PROJECT_ROOT / "run_all.sh"), *common, *args],
            cwd=PROJECT_ROOT,
            env=env,
            text=True,
            capture_output=True,
            timeout=900,
            check=False,
        )

    proc = run_all()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = tmp_path / "r" / "tinyfrontier"
    rec = read_json(res / "frontier.json")
    assert {p["method"] for p in rec["points"]} == set(FR.METHODS)
    assert (res / "tables" / "frontier_winners.md").read_text().count("|") > 10
    assert (tmp_path / "f" / "tinyfrontier" / "frontier.pdf").read_bytes().startswith(b"%PDF")
    import nbformat

    nb = nbformat.read(res / "executed" / "07_frontier.ipynb", as_version=4)
    md = "".join(
        o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert PF.answer(rec) in md
    pub = tmp_path / "published"
    published = run_all("--publish", "--published", str(pub))
    assert published.returncode == 0, published.stderr[-2000:]
    check = run_all("--check-only", "--published", str(pub))
    assert check.returncode == 0 and "reproduction check passed" in check.stdout + check.stderr


def test_repro_reads_the_frontier_record(tmp_path):
    rec = _record({"constant": {1: (50.0, 1.0), 4: (90.0, 2.0)}, "shortgpt": {1: (20.0, 0.0), 4: (200.0, 0.0)}})
    rec["dense"]["tasks"] = {"dynslice_cloze": {"metric": "acc", "value": 0.55, "stderr": 0.1}}
    rec["points"] = [
        {"method": "shortgpt", "size": 1, "seed": 0, "after": {"tasks": {"dynslice_cloze": {"value": 0.5}}}},
        {"method": "shortgpt", "size": 1, "seed": 1, "after": {"tasks": {"dynslice_cloze": {"value": 0.9}}}},
    ]
    write_json(tmp_path / "frontier.json", rec)
    assert repro.is_results_folder(tmp_path)
    numbers = repro.headline_numbers(tmp_path)
    assert numbers["frontier constant 4 layers ppl wiki after RFT"] == ("ppl_sliced", 90.0)
    assert numbers["frontier constant 4 layers ppl wiki before RFT"] == ("ppl_sliced", 180.0)
    assert numbers["frontier dense ppl wiki"] == ("ppl_dense", 20.0)
    assert numbers["frontier dense acc dynslice_cloze"] == ("acc", 0.55)
    assert numbers["frontier shortgpt 1 layers acc dynslice_cloze"] == ("acc", 0.5)  # the first seed's
    assert numbers["frontier shortgpt 1 layers params"] == ("params", 1e8)
