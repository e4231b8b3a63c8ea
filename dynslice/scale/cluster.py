"""A cluster: a profile as a Slurm job array through ``submitit``, one shard per array task, in two phases.

Each task runs :func:`dynslice.experiment.sweep.run_phase` for its shard; finished records are skipped, so a failed or
pre-empted task reruns only its unfinished runs (on pre-emption or timeout submitit requeues the task through
:meth:`ShardTask.checkpoint`). The zero-shot phase is a second array that starts when the sweep array is done
(a Slurm ``afterany`` dependency; with the local executor, after waiting). Install with ``pip install
'dynslice[cluster]'``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ShardTask:
    """One array task: phase ``phase`` of shard ``k`` of ``n`` of ``profile`` under ``root``."""

    profile: str
    root: str
    k: int
    n: int
    phase: str

    def __call__(self) -> dict[str, int]:
        from dynslice.experiment.profiles import load_profile
        from dynslice.experiment.sweep import run_phase
        from dynslice.scale.shard import picker

        results = run_phase(load_profile(self.profile), self.root, self.phase, pick=picker((self.k, self.n)))
        return {
            "ran": sum(len(r.ran) for r in results),
            "skipped": sum(len(r.skipped) for r in results),
            "infeasible": sum(len(r.infeasible) for r in results),
        }

    def checkpoint(self):  # submitit calls this on pre-emption / timeout: requeue the same task
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def make_executor(folder: str | Path, cluster: str | None = None, **params: Any):
    """A submitit executor (``cluster``: None = Slurm when available, ``"local"`` = local processes)."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if params:
        ex.update_parameters(**params)
    return ex


def submit(
    profile: str,
    root: str | Path,
    shards: int,
    *,
    cluster: str | None = None,
    params: Mapping[str, Any] | None = None,
    wait: bool = False,
    log: Callable[[str], None] = print,
) -> list:
    """Submit the sweep array, then the zero-shot array after it; returns the jobs of both arrays.

    ``params`` go to ``executor.update_parameters`` (e.g. ``slurm_partition``, ``timeout_min``,
    ``gpus_per_node``). With the local executor (no dependencies) the first array is waited for before the
    second is submitted; ``wait`` also waits for the second.
    """
    from dynslice.experiment.profiles import load_profile

    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: {shards!r} is outside shards >= 1")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ValueError(
            "cluster: slurm was asked for, but no Slurm is reachable from here (no sbatch command on "
            "PATH); run on a Slurm login node, or pass --cluster local"
        )
    if cluster not in (None, "slurm", "local", "debug"):
        raise ValueError(f"cluster: {cluster!r} is not one of slurm, local")
    name = load_profile(profile).name
    profile = str(Path(profile).resolve()) if Path(profile).suffix in (".yaml", ".yml") else profile
    root = str(Path(root).resolve())
    folder = Path(root) / name / "submitit"
    base = dict(params or {})
    local = cluster in ("local", "debug")
    jobs: list = []
    previous = None
    for phase in ("sweep", "zero-shot"):
        kw = dict(base, name=f"dynslice-{name}-{phase}")
        if previous and not local:
            ids = ":".join(sorted({str(j.job_id).split("_")[0] for j in previous}))  # the array's job id
            kw["slurm_additional_parameters"] = {
                **base.get("slurm_additional_parameters", {}),
                "dependency": f"afterany:{ids}",
            }
        if not local:
            kw.setdefault("slurm_array_parallelism", shards)
        ex = make_executor(folder, cluster, **kw)
        tasks = [ShardTask(profile, root, k, shards, phase) for k in range(shards)]
        with ex.batch():
            batch = [ex.submit(t) for t in tasks]
        log(f"{phase}: submitted {shards} tasks ({', '.join(j.job_id for j in batch)}), logs in {folder}")
        jobs += batch
        if local and phase == "sweep":
            for j in batch:
                j.result()  # the zero-shot phase needs every sweep record
        previous = batch
    if wait:
        for j in jobs:
            j.result()
    return jobs
