"""Running a profile: its runs one after another (skipping finished ones), by phase, and what is still missing.

:func:`run_sweep` runs a list of :class:`~dynslice.experiment.config.RunConfig` with one model load per (model,
dtype, device); :func:`run_phase` runs a profile's phases: the sweep, then the zero-shot runs of the best dynamic
SB, which depend on the sweep's perplexities (:mod:`dynslice.experiment.profiles` says what the runs are and where
their records go). A sweep never knows which shard it runs: the scaler (:mod:`dynslice.scale.shard`) hands it the
runs to do, and the launchers run phase ``zero-shot`` after every shard of phase ``sweep`` has finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dynslice.experiment.config import RunConfig
from dynslice.experiment.profiles import (
    Profile,
    infeasible_path,
    is_done,
    lr_path,
    missing_runs,
    result_path,
    run_name,
    sweep_configs,
    zero_shot_configs,
)
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.paths import configure_hf_cache

PHASES = ("sweep", "zero-shot", "all")


# ------------------------------------------------------------------------------------------- running runs
def infeasible_reason(bench, cfg: RunConfig) -> str | None:
    """Why ``cfg``'s allocation cannot exist (e.g. a small SB asks a layer to drop everything), else ``None``.

    Only fixed-SB runs are checked (auto-SB never picks an infeasible SB); it needs the LR score, which the run
    computes anyway.
    """
    from dynslice.experiment.widths import allocation

    if cfg.dense or cfg.auto_sb:
        return None
    try:
        allocation(cfg, bench.dims(), bench.lr(cfg))
    except ValueError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` did: paths of runs executed, skipped (already done) and infeasible (with reasons)."""

    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    infeasible: tuple[tuple[str, str], ...]
    time_s: float


def _group_by_bench(configs: Iterable[RunConfig]) -> dict[tuple[str, str, str], list[RunConfig]]:
    groups: dict[tuple[str, str, str], list[RunConfig]] = {}
    for cfg in configs:
        groups.setdefault((cfg.model, cfg.dtype, cfg.device), []).append(cfg)
    return groups


def run_sweep(
    configs: Sequence[RunConfig],
    root: str | Path,
    profile: str,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run every config not yet done, one :class:`~dynslice.experiment.pipeline.Workbench` per (model, dtype, device).

    Finished records (same config at the same path) are skipped without loading the model; ``force`` reruns them.
    Configs whose allocation is infeasible are reported and noted under ``infeasible/``, not run. Records are
    written atomically, so a sweep killed halfway resumes where it stopped.
    """
    configure_hf_cache()
    from dynslice.experiment.pipeline import Workbench, run

    t0 = time.perf_counter()
    ran: list[str] = []
    skipped: list[str] = []
    infeasible: list[tuple[str, str]] = []
    for (model, dtype, device), group in _group_by_bench(configs).items():
        noted = [c for c in group if not force and is_done(c, infeasible_path(c, root, profile))]
        infeasible += [
            (str(result_path(c, root, profile)), read_json(infeasible_path(c, root, profile))["infeasible"])
            for c in noted
        ]
        todo = [c for c in group if c not in noted and (force or not is_done(c, result_path(c, root, profile)))]
        skipped += [str(result_path(c, root, profile)) for c in group if c not in todo and c not in noted]
        if not todo:
            continue
        bench = Workbench(model, dtype, device)
        for k, cfg in enumerate(tqdm(todo, desc=f"runs {model}"), 1):
            path = result_path(cfg, root, profile)
            reason = infeasible_reason(bench, cfg)
            if reason is not None:
                infeasible.append((str(path), reason))
                write_json(infeasible_path(cfg, root, profile), {"config": cfg.to_json(), "infeasible": reason})
                log(f"[{k}/{len(todo)}] infeasible: {run_name(cfg)}: {reason}")
                continue
            t = time.perf_counter()
            rec = run(cfg, out=path, bench=bench, force=force)
            ran.append(str(path))
            ppl = ", ".join(f"{ds} {v:.2f}" for ds, v in rec["ppl"].items())
            log(f"[{k}/{len(todo)}] {run_name(cfg)}: ppl {ppl} ({time.perf_counter() - t:.0f} s)")
    result = SweepResult(tuple(ran), tuple(skipped), tuple(infeasible), time.perf_counter() - t0)
    log(
        f"sweep {profile}: ran {len(ran)}, skipped {len(skipped)} already finished, "
        f"{len(infeasible)} infeasible ({result.time_s:.0f} s)"
    )
    return result


# ---------------------------------------------------------------------------------------------------- phases
def phase_configs(profile: Profile, root: str | Path, phase: str) -> list[RunConfig]:
    """The configs of a phase: the sweep, or the zero-shot runs of the groups whose sweep is finished."""
    from dynslice.store.records import load_records

    if phase not in PHASES:
        raise ValueError(f"phase: {phase!r} is not one of {', '.join(PHASES)}")
    if phase == "sweep":
        return sweep_configs(profile)
    runs = Path(root) / profile.name / "runs"
    records = load_records(runs) if runs.is_dir() else []
    return zero_shot_configs(profile, records, root=root)


def run_phase(
    profile: Profile,
    root: str | Path,
    phase: str = "all",
    *,
    pick: Callable[[Sequence[RunConfig]], Sequence[RunConfig]] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[SweepResult]:
    """Run one phase (or both, in order) of ``profile``; ``pick`` chooses which of each phase's runs this process
    does (a shard: :func:`dynslice.scale.shard.picker`), all of them by default."""
    results = []
    for ph in ("sweep", "zero-shot") if phase == "all" else (phase,):
        configs = phase_configs(profile, root, ph)
        mine = list(pick(configs)) if pick is not None else configs
        log(f"phase {ph}: {len(mine)} of {len(configs)} runs")
        results.append(run_sweep(mine, root, profile.name, force=force, log=log))
    return results


def profile_missing(profile: Profile, root: str | Path) -> tuple[list[RunConfig], int]:
    """The runs of ``profile`` (sweep, and zero-shot of the finished groups) not finished under ``root``, and
    how many runs that list was taken from. Zero-shot runs of groups still sweeping are not counted yet."""
    expected = phase_configs(profile, root, "sweep") + phase_configs(profile, root, "zero-shot")
    return missing_runs(expected, root, profile.name), len(expected)


def missing_text(missing: Sequence[RunConfig], total: int) -> str:
    """One paragraph for the report notebooks: how many runs the tables lack, and which."""
    if not missing:
        return f"All {total} runs of the profile are finished."
    names = ", ".join(f"{c.model}:{run_name(c)}" for c in missing[:12])
    more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
    return (
        f"{len(missing)} of {total} runs are not finished yet (other shards, or not run): the tables cover "
        f"the rest. Missing: {names}{more}."
    )


# ----------------------------------------------------------------------------------------------------- LR files
def compute_lr_for_profile(
    profile: Profile, root: str | Path, *, force: bool = False, log: Callable[[str], None] = print
) -> list[Path]:
    """LR scores of every model on every ``lr_datasets`` corpus, as JSON (skipping files already written).

    Uses the profile's LR sample size, sequence length, metric and seed (the values the runs use).
    """
    configure_hf_cache()
    from dynslice.experiment.pipeline import Workbench

    paths = []
    for model in profile.models:
        bench = None
        for corpus in profile.lr_datasets:
            cfg = profile.base_config(model, sp=profile.sp[0], sb=profile.sp[0], lr_dataset=corpus)
            path = lr_path(root, profile.name, model.spec, corpus)
            want = {
                "dataset": corpus,
                "nsamples": cfg.lr_nsamples,
                "seqlen": cfg.lr_seqlen,
                "metric": cfg.lr_metric,
                "seed": cfg.seed,
                "model": model.spec,
                "precision": cfg.lr_precision,
            }
            # an LR file written before LR precision was recorded was computed in fp32
            if (
                not force
                and path.is_file()
                and all({"precision": "fp32", **read_json(path)}.get(k) == v for k, v in want.items())
            ):
                log(f"skipped LR {model.spec}/{corpus}: {path} is up to date")
                paths.append(path)
                continue
            bench = bench or Workbench(model.spec, model.dtype, model.device)
            write_json(path, bench.lr(cfg))
            log(f"wrote LR {model.spec}/{corpus}: {path}")
            paths.append(path)
    return paths
