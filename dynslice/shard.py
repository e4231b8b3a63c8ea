"""Deterministic shards of a profile's runs, balanced by predicted cost, and what is still missing.

``shard_configs(configs, k, n)`` splits the runs into ``n`` disjoint parts by greedy longest-processing-time:
runs sorted by predicted cost (largest first, ties by the run's key), each given to the least-loaded shard (ties
to the lowest index). The order depends only on the configs, so every machine computes the same split, and every
run lands in exactly one shard. Records are one file per run, so shards merge by themselves.

Two phases: the sweep (phase ``sweep``) can be split at once; the zero-shot runs of the best dynamic SB (phase
``zero-shot``) depend on the sweep's perplexities, so they are computed only for the (model, corpus, SP, budget)
groups whose sweep runs are all finished, and split in their turn. The launchers run phase ``zero-shot`` after
every shard of phase ``sweep`` has finished; a single process runs both in order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from dynslice.config import RunConfig

SHARD_ENV = "DYNSLICE_SHARD"
PHASES = ("sweep", "zero-shot", "all")


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N`` (K counts from 0)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"shard: {text!r} is not K/N with 0 <= K < N (e.g. 0/4)")
    return int(m.group(1)), int(m.group(2))


def shard_from_env() -> tuple[int, int] | None:
    """The shard named by ``$DYNSLICE_SHARD`` (set by ``run_all.sh --shard`` and the launchers), else ``None``."""
    text = os.environ.get(SHARD_ENV, "").strip()
    return parse_shard(text) if text else None


def assign(configs: Sequence[RunConfig], n: int, cost: Callable[[RunConfig], float] | None = None) -> list[int]:
    """The shard index of each config (greedy longest-processing-time on ``cost``, deterministic)."""
    from dynslice.cost import balance, run_cost

    cost = cost or run_cost
    return balance([float(cost(c)) for c in configs], [c.key() for c in configs], n)


def shard_configs(configs: Sequence[RunConfig], k: int, n: int,
                  cost: Callable[[RunConfig], float] | None = None) -> list[RunConfig]:
    """The configs of shard ``k`` of ``n``, in their original order."""
    if not 0 <= k < n:
        raise ValueError(f"shard: {k}/{n} is not K/N with 0 <= K < N")
    return [c for c, s in zip(configs, assign(configs, n, cost)) if s == k]


def shard_loads(configs: Sequence[RunConfig], n: int,
                cost: Callable[[RunConfig], float] | None = None) -> list[float]:
    """The predicted cost of each of the ``n`` shards."""
    from dynslice.cost import run_cost

    cost = cost or run_cost
    loads = [0.0] * n
    for c, s in zip(configs, assign(configs, n, cost)):
        loads[s] += cost(c)
    return loads


def missing_runs(configs: Sequence[RunConfig], root: str | Path, profile: str) -> list[RunConfig]:
    """The configs with neither a finished record nor an infeasibility note under ``<root>/<profile>``."""
    from dynslice.sweep import infeasible_path, is_done, result_path

    return [c for c in configs
            if not is_done(c, result_path(c, root, profile)) and not is_done(c, infeasible_path(c, root, profile))]


def profile_missing(profile, root: str | Path) -> tuple[list[RunConfig], int]:
    """The runs of ``profile`` (sweep, and zero-shot of the finished groups) not finished under ``root``, and
    how many runs that list was taken from. Zero-shot runs of groups still sweeping are not counted yet."""
    expected = phase_configs(profile, root, "sweep") + phase_configs(profile, root, "zero-shot")
    return missing_runs(expected, root, profile.name), len(expected)


def missing_text(missing: Sequence[RunConfig], total: int) -> str:
    """One paragraph for the report notebooks: how many runs the tables lack, and which."""
    from dynslice.sweep import run_name

    if not missing:
        return f"All {total} runs of the profile are finished."
    names = ", ".join(f"{c.model}:{run_name(c)}" for c in missing[:12])
    more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
    return (f"{len(missing)} of {total} runs are not finished yet (other shards, or not run): the tables cover "
            f"the rest. Missing: {names}{more}.")


def phase_configs(profile, root: str | Path, phase: str) -> list[RunConfig]:
    """The configs of a phase: the sweep, or the zero-shot runs of the groups whose sweep is finished."""
    from dynslice.report import load_records
    from dynslice.sweep import sweep_configs, zero_shot_configs

    if phase not in PHASES:
        raise ValueError(f"phase: {phase!r} is not one of {', '.join(PHASES)}")
    if phase == "sweep":
        return sweep_configs(profile)
    runs = Path(root) / profile.name / "runs"
    records = load_records(runs) if runs.is_dir() else []
    return zero_shot_configs(profile, records, root=root)


def run_phase(profile, root: str | Path, phase: str = "all", shard: tuple[int, int] | None = None,
              force: bool = False, log: Callable[[str], None] = print) -> list:
    """Run one phase (or both, in order) of ``profile``, only shard ``shard`` of it when given."""
    from dynslice.sweep import run_sweep

    results = []
    for ph in (("sweep", "zero-shot") if phase == "all" else (phase,)):
        configs = phase_configs(profile, root, ph)
        log(f"phase {ph}: {len(configs)} runs" + (f", shard {shard[0]}/{shard[1]}" if shard else ""))
        results.append(run_sweep(configs, root, profile.name, force=force, log=log, shard=shard))
    return results
