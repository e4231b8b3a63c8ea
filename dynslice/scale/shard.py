"""Deterministic shards of a profile's runs, balanced by predicted cost.

``shard_configs(configs, k, n)`` splits the runs into ``n`` disjoint parts by greedy longest-processing-time:
runs sorted by predicted cost (largest first, ties by the run's key), each given to the least-loaded shard (ties
to the lowest index). The order depends only on the configs, so every machine computes the same split, and every
run lands in exactly one shard. Records are one file per run, so shards merge by themselves.

Each phase of a profile (:func:`dynslice.experiment.sweep.run_phase`) is split in its turn: the sweep at once, the
zero-shot
runs of the best dynamic SB once the sweep groups they depend on are finished.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

from dynslice.experiment.config import RunConfig
from dynslice.scale.cost import balance, run_cost

SHARD_ENV = "DYNSLICE_SHARD"


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
    cost = cost or run_cost
    return balance([float(cost(c)) for c in configs], [c.key() for c in configs], n)


def shard_configs(
    configs: Sequence[RunConfig], k: int, n: int, cost: Callable[[RunConfig], float] | None = None
) -> list[RunConfig]:
    """The configs of shard ``k`` of ``n``, in their original order."""
    if not 0 <= k < n:
        raise ValueError(f"shard: {k}/{n} is not K/N with 0 <= K < N")
    return [c for c, s in zip(configs, assign(configs, n, cost)) if s == k]


def picker(
    shard: tuple[int, int] | None, log: Callable[[str], None] = print
) -> Callable[[Sequence[RunConfig]], list[RunConfig]]:
    """What :func:`dynslice.experiment.sweep.run_phase` calls to choose this process's runs: shard ``(K, N)`` of
    them, or every run when ``shard`` is ``None``."""

    def pick(configs: Sequence[RunConfig]) -> list[RunConfig]:
        if shard is None:
            return list(configs)
        mine = shard_configs(configs, *shard)
        log(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(configs)} runs")
        return mine

    return pick


def this_shard(configs: Sequence[RunConfig], log: Callable[[str], None] = print) -> list[RunConfig]:
    """The runs of ``configs`` that this process does: the shard named by ``$DYNSLICE_SHARD`` (as ``run_all.sh
    --shard`` and the launchers set it), or all of them. The notebooks call it before :func:`run_sweep
    <dynslice.experiment.sweep.run_sweep>`."""
    return picker(shard_from_env(), log)(configs)


def shard_loads(configs: Sequence[RunConfig], n: int, cost: Callable[[RunConfig], float] | None = None) -> list[float]:
    """The predicted cost of each of the ``n`` shards."""
    cost = cost or run_cost
    loads = [0.0] * n
    for c, s in zip(configs, assign(configs, n, cost)):
        loads[s] += cost(c)
    return loads
