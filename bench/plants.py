"""Recompute some runs of a profile with a real regression planted in the method, to show what the reproduction check
catches. Each plant is a small change a bug could make; ``none`` plants nothing (the honest recomputation):

* ``width``: one layer's width (the middle one) is one rounding step narrower than the allocator said;
* ``sb``: dynamic runs are allocated with SB one grid step lower than their record says;
* ``lr``: the LR score of one layer (the middle one) is raised by a tenth of the score range;
* ``seed``: the calibration windows are drawn with seed + 1.

Every recomputed run goes through the one pipeline (:func:`dynslice.experiment.sweep.run_sweep`), so the records and the
tables (``headline.json``) have the published layout: ``<root>/<plant>/<profile>/{runs,headline.json,...}``.

    python bench/plants.py PROFILE ROOT [--runs NAME ...] [--plants none width sb lr seed]

Run it with the profile's numerics (``dynslice.experiment.numerics.PINNED_ENV`` in the environment for a pinned profile);
``tests/test_repro.py`` runs it on the smoke profile, ``bench/bench_numerics.py plants`` on the cpu profile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dynslice.experiment import pipeline  # noqa: E402
from dynslice.experiment.config import RunConfig  # noqa: E402
from dynslice.experiment.profiles import load_profile, run_name, sweep_configs  # noqa: E402
from dynslice.experiment.sweep import run_sweep  # noqa: E402
from dynslice.publish.report import records_frame, write_tables  # noqa: E402
from dynslice.store.records import load_records  # noqa: E402

PLANTS = ("none", "width", "sb", "lr", "seed")


@contextlib.contextmanager
def planted(plant: str, sb_step: float) -> Iterator[None]:
    """Patch the pipeline's allocation, LR or calibration step with ``plant`` for the duration of the block."""
    allocation, lr, calibration = pipeline.allocation, pipeline.Workbench.lr, pipeline.Workbench.calibration

    def narrower(cfg, dims, score=None, *, sb=None):
        alloc = allocation(cfg, dims, score, sb=sb)
        widths = list(alloc.widths)
        mid = len(widths) // 2
        widths[mid] -= cfg.round_interval
        return dataclasses.replace(alloc, widths=tuple(widths))

    def lower_sb(cfg, dims, score=None, *, sb=None):
        sb = cfg.sb if sb is None else sb
        return allocation(cfg, dims, score, sb=max(0.0, sb - sb_step) if sb < cfg.sp else sb)

    def raised_lr(self, cfg):
        score = dict(lr(self, cfg))
        values = list(score["lr"])
        mid = len(values) // 2
        values[mid] += 0.1 * (max(values) - min(values))
        return {**score, "lr": values}

    def other_seed(self, cfg):
        return calibration(self, cfg.replace(seed=cfg.seed + 1))

    patches = {
        "width": ("allocation", pipeline, narrower),  # the name the pipeline's run looks up
        "sb": ("allocation", pipeline, lower_sb),
        "lr": ("lr", pipeline.Workbench, raised_lr),
        "seed": ("calibration", pipeline.Workbench, other_seed),
    }
    if plant == "none":
        yield
        return
    name, owner, fn = patches[plant]
    old = getattr(owner, name)
    setattr(owner, name, fn)
    try:
        yield
    finally:
        setattr(owner, name, old)


def recompute(profile_name: str, root: Path, runs: list[str] | None, plants: list[str]) -> None:
    profile = load_profile(profile_name)
    configs: list[RunConfig] = [c for c in sweep_configs(profile) if runs is None or run_name(c) in runs]
    if runs is not None and len(configs) != len(set(runs)):
        raise SystemExit(
            f"plants: the {profile_name} profile has no runs named {sorted(set(runs) - {run_name(c) for c in configs})}"
        )
    for plant in plants:
        folder = root / plant
        with planted(plant, profile.sb_step):
            run_sweep(configs, folder, profile.name, log=lambda _: None)
        results = folder / profile.name
        write_tables(records_frame(load_records(results / "runs")), results, profile.ppl_datasets[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile")
    ap.add_argument("root", type=Path)
    ap.add_argument("--runs", nargs="+", help="run names of the profile (default: all of its sweep)")
    ap.add_argument("--plants", nargs="+", default=list(PLANTS), choices=PLANTS)
    a = ap.parse_args()
    recompute(a.profile, a.root, a.runs, a.plants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
