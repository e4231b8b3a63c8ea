"""Measure the numerical noise of slicing: the published quantities recomputed under the arithmetic users' machines
differ by, and the calibration-seed spread next to it. Writes ``bench/results/numerics_noise.json`` (a copy goes to
``dynslice/measured/``, where the reproduction check reads its tolerances for unpinned comparisons).

Three steps (each resumable; records land under ``--work``, default ``bench/.numerics``, gitignored):

    python bench/bench_numerics.py run [--settings native-2t native-1t native-4t avx2]
        # per setting, a subprocess with that environment recomputes a representative subset of the cpu profile
        # (dense, constant and dynamic at SP 0.2 and 0.3, both budgets, zero-shot runs, one automatic SB)
    python bench/bench_numerics.py analyze --pinned A=DIR B=DIR ...
        # DIR: <root>/cpu folders of ./run_all.sh (pinned arithmetic); the first one is the reference
    python bench/bench_numerics.py plants
        # bench/plants.py on two cpu-profile runs (pinned): which planted regressions each regime of the check catches
    python bench/bench_numerics.py cost [--threads 1 2 4]
        # wall and CPU time of one slicing + evaluation, pinned vs native, per thread count (run it on an idle machine)

Settings (``SETTINGS``) change only the environment: the thread count (``OMP_NUM_THREADS``), and the SIMD level of
ATen, MKL and oneDNN (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, ``ONEDNN_MAX_CPU_ISA``), which simulates an older or
an AMD CPU on this one. The pins of ``dynslice.experiment.numerics.PINNED_ENV`` are removed first, so ``native`` means what a
user gets from ``dynslice`` outside ``run_all.sh``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynslice.experiment.numerics import PINNED_ENV, cpu  # noqa: E402
from dynslice.store.jsonio import read_json, write_json  # noqa: E402

OUT = ROOT / "bench" / "results" / "numerics_noise.json"
PACKAGE_COPY = ROOT / "dynslice" / "measured" / "numerics_noise.json"
WORK = ROOT / "bench" / ".numerics"
PROFILE = "cpu"
#: The recomputed runs: every kind of number the check compares (cpu profile run names).
SUBSET = (
    "dense-zs",
    "sp0.20-sb0.20-width-calwiki-zs",
    "sp0.20-sb0.10-width-calwiki",
    "sp0.30-sb0.30-width-calwiki-zs",
    "sp0.30-sb0.10-width-calwiki",
    "sp0.30-sb0.10-params-calwiki",
    "sp0.30-sbauto-width-calwiki",
)
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SETTINGS: dict[str, dict[str, str]] = {
    "native-2t": {"OMP_NUM_THREADS": "2"},
    "native-1t": {"OMP_NUM_THREADS": "1"},
    "native-4t": {"OMP_NUM_THREADS": "4"},
    "avx2": {**AVX2, "OMP_NUM_THREADS": "2"},  # an AVX2-only CPU (the "older or AMD CPU")
    "sse4": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "OMP_NUM_THREADS": "2",
    },  # no AVX at all: a BLAS path far from this CPU's
}
#: Quantities of the check, with dense and sliced perplexity apart (their noise differs by five orders).
CLASSES = ("ppl_sliced", "ppl_dense", "acc", "ppl_change_pct", "acc_points", "params", "sb")
#: Another machine (an Intel CPU with AVX-512, 2 cores), one run, from ../shared/numerics.md: the same code and
#: versions, measured by another session. Used with the settings measured here when deriving tolerances.
OTHER_MACHINE = {
    "source": "shared/numerics.md (Intel x86 AVX-512, 2 cores, torch 2.13.0, transformers 5.25)",
    "run": "sp0.30-sb0.10-params-calwiki",
    "ppl": {
        "default 2 threads": {"wiki": 71.46020295107057, "news": 193.04193764227466},
        "1 thread": {"wiki": 71.45898688487074, "news": 194.56346212896406},
        "avx2 (not strict)": {"wiki": 71.4694882017123, "news": 194.98494715833996},
        "pinned (strict), 1, 2 and 4 threads": {"wiki": 71.48295749868835, "news": 193.47367698167784},
    },
}
#: Tolerance = MARGIN x the largest deviation from the reference seen for that quantity (rounded up).
MARGIN = 2.0


def env_for(setting: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV}
    env.update(setting)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT)
    )
    return env


# --------------------------------------------------------------------------------------------------------- run
def worker(folder: Path) -> None:
    """Recompute :data:`SUBSET` into ``folder/cpu`` with this process's arithmetic (called in a subprocess)."""
    from dynslice.experiment.profiles import load_profile, run_name, sweep_configs
    from dynslice.experiment.sweep import run_sweep

    profile = load_profile(PROFILE)
    configs = [c for c in sweep_configs(profile) if run_name(c) in SUBSET]
    missing = set(SUBSET) - {run_name(c) for c in configs}
    if missing:
        raise SystemExit(f"bench_numerics: the cpu profile has no runs named {sorted(missing)}")
    run_sweep(configs, folder, PROFILE)


def run_settings(names: list[str], work: Path) -> None:
    """Each setting in its own subprocess, one after another (start several ``run`` commands to overlap them)."""
    for name in names:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        print(f"== {name}: {SETTINGS[name]}", flush=True)
        subprocess.run([sys.executable, __file__, "_worker", str(work / name)], env=env_for(SETTINGS[name]), check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times = read_json(work / "times.json") if (work / "times.json").is_file() else {}
        times[name] = {
            "wall_s": round(time.perf_counter() - t, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "load_after": round(os.getloadavg()[0], 2),
        }
        write_json(work / "times.json", times)


# ----------------------------------------------------------------------------------------------------- analyze
def numbers_of(folder: Path, work: Path) -> dict[str, tuple[str, float]]:
    """The check's numbers of ``folder`` (a ``<root>/cpu`` folder) over :data:`SUBSET`, headline rows included."""
    from dynslice.experiment.config import RunConfig
    from dynslice.experiment.profiles import run_name
    from dynslice.publish import repro
    from dynslice.publish.report import records_frame, write_tables
    from dynslice.store.records import load_records

    sub = work / "subsets" / f"{folder.parent.name}-{folder.name}"
    if sub.exists():
        shutil.rmtree(sub)  # bench's own scratch copy
    for path in sorted((folder / "runs").rglob("*.json")):
        if run_name(RunConfig.from_json(read_json(path)["config"])) in SUBSET:
            dest = sub / "runs" / path.parent.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    write_tables(records_frame(load_records(sub / "runs")), sub, "wiki")
    return repro.headline_numbers(sub)


def deviation(quantity: str, ref: float, value: float) -> float:
    """Relative for perplexities, absolute for the rest."""
    return (
        abs(value - ref) / abs(ref)
        if quantity.startswith("ppl_") and quantity != "ppl_change_pct"
        else abs(value - ref)
    )


def round_up(x: float) -> float:
    """``x`` rounded up to one significant digit (0 stays 0)."""
    if x <= 0:
        return 0.0
    p = 10 ** math.floor(math.log10(x))
    return math.ceil(x / p - 1e-9) * p


def seed_spread() -> dict:
    """Calibration-seed spread of the published ablations: per-run sd over seeds (constant and LR slicing), and the
    sd of the paired dynamic-vs-constant difference (``gap_tests``: log-perplexity, about a relative change)."""
    path = ROOT / "results" / "published" / "ablations" / "ablations.json"
    record = read_json(path)
    rows = []
    for row in record["summary"]:
        if row["method"] not in ("constant", "lr"):  # the rows whose seeds are calibration seeds
            continue
        for ds, stats in row["ppl"].items():
            if stats.get("n", 1) > 1 and stats.get("sd"):
                rows.append(
                    {
                        "method": row["method"],
                        "sp": row["sp"],
                        "budget": row["budget"],
                        "dataset": ds,
                        "n_seeds": stats["n"],
                        "mean": stats["mean"],
                        "sd": stats["sd"],
                        "rel_sd": stats["sd"] / stats["mean"],
                    }
                )
    paired = {
        g["dataset"]: {
            "sp": g["sp"],
            "budget": g["budget"],
            "seeds": g["seeds"],
            "change_sd_points": 100 * g["paired_t_logppl"]["sd"],
        }
        for g in record["gap_tests"]
    }
    rel = sorted(r["rel_sd"] for r in rows)
    return {
        "source": "results/published/ablations/ablations.json (calibration seeds)",
        "rows": rows,
        "max_rel_sd": rel[-1] if rel else None,
        "median_rel_sd": rel[len(rel) // 2] if rel else None,
        "paired_change": paired,
    }


def analyze(pinned: list[tuple[str, Path]], work: Path) -> dict:
    settings = {name: numbers_of(work / name / PROFILE, work) for name in SETTINGS if (work / name / PROFILE).is_dir()}
    pins = {f"pinned-{name}": numbers_of(folder, work) for name, folder in pinned}
    ref_name = f"pinned-{pinned[0][0]}"
    ref = pins[ref_name]
    per_number = {}
    for name, (quantity, value) in ref.items():
        vals = {s: nums[name][1] for s, nums in {**pins, **settings}.items() if name in nums}
        per_number[name] = {
            "quantity": quantity,
            "values": vals,
            "max_deviation": max(deviation(quantity, value, v) for v in vals.values()),
        }
    classes = {}
    for q in CLASSES:
        rows = {n: r for n, r in per_number.items() if r["quantity"] == q}
        if not rows:
            continue
        pinned_dev = max(
            (deviation(q, ref[n][1], nums[n][1]) for nums in pins.values() for n in rows if n in nums), default=0.0
        )
        native_dev = {
            s: max((deviation(q, ref[n][1], nums[n][1]) for n in rows if n in nums), default=0.0)
            for s, nums in settings.items()
        }
        spread = max(max(r["values"].values()) - min(r["values"].values()) for r in rows.values())
        classes[q] = {
            "unit": "relative" if q in ("ppl_sliced", "ppl_dense") else "absolute",
            "numbers": len(rows),
            "max_deviation_pinned": pinned_dev,
            "max_deviation_by_setting": native_dev,
            "max_spread_abs": spread,
        }
    # The other machine's run, against this machine's pinned reference.
    run = OTHER_MACHINE["run"]
    other = {}
    for setting, ppl in OTHER_MACHINE["ppl"].items():
        for ds, value in ppl.items():
            key = next(n for n in ref if n.endswith(f"{run} ppl {ds}"))
            other[f"{setting} {ds}"] = deviation("ppl_sliced", ref[key][1], value)
    classes["ppl_sliced"]["max_deviation_other_machine"] = max(other.values())
    tolerances = {}
    for q, c in classes.items():
        seen = max([*c["max_deviation_by_setting"].values(), c.get("max_deviation_other_machine", 0.0)])
        tol = round_up(MARGIN * seen)
        tolerances[q] = {"rel" if c["unit"] == "relative" else "abs": tol, "largest_seen": seen}
    if "acc_points" not in tolerances and "acc" in tolerances:  # no dynamic zero-shot run in the subset
        seen = 2 * 100 * tolerances["acc"]["largest_seen"]  # a difference of two accuracies, in points
        tolerances["acc_points"] = {
            "abs": round_up(MARGIN * seen),
            "largest_seen": seen,
            "derived": "from acc: the difference of two accuracies, in points",
        }
    seeds = seed_spread()
    return {
        "what": "numerical noise of slicing: the cpu profile's numbers recomputed under other arithmetic",
        "reference": {"setting": ref_name, "folder": str(pinned[0][1])},
        "cpu": cpu(),
        "subset": list(SUBSET),
        "settings": {s: SETTINGS[s] for s in settings},
        "pinned_folders": {f"pinned-{n}": str(f) for n, f in pinned},
        "times": read_json(work / "times.json") if (work / "times.json").is_file() else {},
        "classes": classes,
        "other_machine": {**OTHER_MACHINE, "deviation_from_reference": other},
        "tolerances": {
            "margin": MARGIN,
            "rule": "MARGIN x the largest deviation from the pinned reference "
            "over every unpinned setting (and the other machine), rounded "
            "up to one significant digit",
            "by_quantity": tolerances,
        },
        "seed_spread": seeds,
        "per_number": per_number,
    }


# ------------------------------------------------------------------------------------------------------ plants
PLANT_RUNS = ("sp0.30-sb0.10-width-calwiki", "sp0.30-sb0.10-params-calwiki")


def plants(work: Path) -> dict:
    """Recompute :data:`PLANT_RUNS` with each plant (pinned), then check each against the honest recomputation
    under both regimes: which numbers fail, and by how much the perplexities moved."""
    from dynslice.publish import repro

    root = work / "plants"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plants.py"), PROFILE, str(root), "--runs", *PLANT_RUNS],
        env=env_for(dict(PINNED_ENV)),
        check=True,
    )
    ref = repro.headline_numbers(root / "none" / PROFILE)
    regimes = {
        "identical arithmetic": repro.identical_tolerances(),
        "different arithmetic": repro.measured_tolerances(),
    }
    out = {}
    for plant in ("none", "width", "sb", "lr", "seed"):
        nums = repro.headline_numbers(root / plant / PROFILE)
        moved = {n: (nums[n][1] - v) / v for n, (q, v) in ref.items() if q.startswith("ppl") and n in nums}
        out[plant] = {
            "ppl_change_rel": moved,
            "params_changed": [n for n, (q, v) in ref.items() if q == "params" and nums[n][1] != v],
            "caught": {
                name: [r.name for r in repro.compare(ref, nums, tol) if r.status != "ok"]
                for name, tol in regimes.items()
            },
        }
    return {
        "runs": list(PLANT_RUNS),
        "profile": PROFILE,
        "plants": out,
        "tolerances_different_arithmetic": {q: str(t) for q, t in regimes["different arithmetic"].items()},
    }


# -------------------------------------------------------------------------------------------------------- cost
COST_RUN = [
    "--model",
    "smollm2-135m",
    "--seed",
    "42",
    "--round-interval",
    "8",
    "--sp",
    "0.3",
    "--sb",
    "0.1",
    "--budget",
    "params",
    "--lr-dataset",
    "wiki",
    "--lr-nsamples",
    "16",
    "--lr-seqlen",
    "256",
    "--cal-dataset",
    "wiki",
    "--cal-nsamples",
    "16",
    "--cal-seqlen",
    "256",
    "--batch-size",
    "8",
    "--ppl",
    "wiki",
    "news",
    "--ppl-seqlen",
    "256",
    "--ppl-max-chunks",
    "16",
]


def cost(threads: list[int], work: Path, repeats: int) -> dict:
    rows = []
    for rep in range(repeats):
        for n in threads:
            for mode, extra in (("native", {}), ("pinned", dict(PINNED_ENV))):
                out = work / "cost" / f"{mode}-{n}t-{rep}.json"
                out.unlink(missing_ok=True)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "dynslice", "run", *COST_RUN, "--out", str(out)],
                    check=True,
                    env=env_for({**extra, "OMP_NUM_THREADS": str(n)}),
                    stdout=subprocess.DEVNULL,
                )
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                rec = read_json(out)
                rows.append(
                    {
                        "mode": mode,
                        "threads": n,
                        "repeat": rep,
                        "wall_s": round(time.perf_counter() - t, 2),
                        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
                        "load_before": round(os.getloadavg()[0], 2),
                        "ppl": rec["ppl"],
                        "timings_s": rec["timings_s"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return {"run": COST_RUN, "cores": os.cpu_count(), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=WORK)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument(
        "--settings", nargs="+", default=["native-2t", "native-1t", "native-4t", "avx2"], choices=sorted(SETTINGS)
    )
    a = sub.add_parser("analyze")
    a.add_argument(
        "--pinned",
        nargs="+",
        required=True,
        metavar="NAME=DIR",
        help="<root>/cpu folders of pinned ./run_all.sh runs; the first is the reference",
    )
    c = sub.add_parser("cost")
    c.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4])
    c.add_argument("--repeats", type=int, default=1)
    sub.add_parser("plants")
    w = sub.add_parser("_worker")
    w.add_argument("folder", type=Path)
    args = ap.parse_args()
    if args.cmd == "_worker":
        worker(args.folder)
    elif args.cmd == "run":
        run_settings(args.settings, args.work)
    elif args.cmd == "analyze":
        pinned = [(p.split("=", 1)[0], Path(p.split("=", 1)[1])) for p in args.pinned]
        result = analyze(pinned, args.work)
        write_json(OUT, result)
        PACKAGE_COPY.write_text(OUT.read_text())
        print(json.dumps({q: t for q, t in result["tolerances"]["by_quantity"].items()}, indent=1))
    elif args.cmd == "plants":
        result = plants(args.work)
        write_json(OUT.with_name("numerics_plants.json"), result)
        print(json.dumps({p: {k: len(v) for k, v in r["caught"].items()} for p, r in result["plants"].items()}))
    else:
        result = cost(args.threads, args.work, args.repeats)
        out = OUT.with_name("numerics_cost.json")
        write_json(out, result)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
