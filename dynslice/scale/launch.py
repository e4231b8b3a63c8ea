"""One node, many GPUs: one shard of a profile per visible GPU (or per CPU process), each a ``dynslice sweep``
process with its own ``CUDA_VISIBLE_DEVICES`` and its own log.

The sweep phase runs first, in N shards at once; when every shard has finished, the zero-shot phase (the best-SB
runs, which need the whole sweep) runs in N shards the same way. A rerun does only what is not finished.
Logs: ``<root>/<profile>/logs/<phase>-shard<K>of<N>.log`` (appended to, so a rerun keeps the earlier lines).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``$CUDA_VISIBLE_DEVICES`` when set, else every GPU torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in (x.strip() for x in env.split(",")) if g and g != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def parse_gpus(text: str) -> list[str]:
    """``"0,1,3"`` -> ``["0", "1", "3"]``; ``"all"`` -> :func:`visible_gpus` (an error when there is none)."""
    gpus = visible_gpus() if text.strip() == "all" else [g.strip() for g in text.split(",") if g.strip()]
    if not gpus:
        raise ValueError(f"gpus: {text!r} names no GPU (use --processes N to run shards as CPU processes)")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"gpus: {text!r} names a GPU twice")
    return gpus


def shard_command(
    profile: str, root: str | Path, k: int, n: int, phase: str, python: str = sys.executable
) -> list[str]:
    """The command line of one shard: ``python -m dynslice sweep --profile P --root R --shard K/N --phase X``."""
    return [
        python,
        "-m",
        "dynslice",
        "sweep",
        "--profile",
        str(profile),
        "--root",
        str(root),
        "--shard",
        f"{k}/{n}",
        "--phase",
        phase,
    ]


def log_path(root: str | Path, profile_name: str, phase: str, k: int, n: int) -> Path:
    return Path(root) / profile_name / "logs" / f"{phase}-shard{k}of{n}.log"


def launch(
    profile: str,
    root: str | Path,
    *,
    gpus: Sequence[str] | None = None,
    processes: int | None = None,
    phases: Sequence[str] = ("sweep", "zero-shot"),
    log: Callable[[str], None] = print,
) -> int:
    """Run every phase of ``profile`` in shards, one per GPU in ``gpus`` (or ``processes`` CPU processes).

    Returns 0 when every shard of every phase exited 0, else 1 (a failed phase stops before the next one).
    """
    from dynslice.experiment.profiles import load_profile

    if (gpus is None) == (processes is None):
        raise ValueError("gpus: give either gpus or processes")
    if processes is not None and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        raise ValueError(f"processes: {processes!r} is outside processes >= 1")
    name = load_profile(profile).name  # validates the profile before any process starts
    profile = str(Path(profile).resolve()) if Path(profile).suffix in (".yaml", ".yml") else profile
    root = Path(root).resolve()
    n = len(gpus) if gpus is not None else processes
    env0 = {k: v for k, v in os.environ.items() if k != "DYNSLICE_SHARD"}
    for phase in phases:
        t0 = time.perf_counter()
        procs = []
        for k in range(n):
            env = dict(env0, CUDA_VISIBLE_DEVICES=gpus[k] if gpus is not None else "")
            path = log_path(root, name, phase, k, n)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:  # the child keeps its own handle
                procs.append(
                    subprocess.Popen(
                        shard_command(profile, root, k, n, phase), stdout=fh, stderr=subprocess.STDOUT, env=env
                    )
                )
            where = f"GPU {gpus[k]}" if gpus is not None else "CPU"
            log(f"{phase}: shard {k}/{n} on {where} (pid {procs[-1].pid}), log {path}")
        codes = [p.wait() for p in procs]
        failed = [k for k, c in enumerate(codes) if c != 0]
        log(f"{phase}: {n - len(failed)}/{n} shards finished in {time.perf_counter() - t0:.0f} s")
        if failed:
            for k in failed:
                log(f"{phase}: shard {k}/{n} exited {codes[k]}; see {log_path(root, name, phase, k, n)}")
            return 1
    return 0
