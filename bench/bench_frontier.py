"""How long the frontier profile takes (notebook 07): one size and one seed of it measured, the rest extrapolated.

    python bench/bench_frontier.py [--profile frontier] [--size 4] [--work bench/.frontier]

Runs :func:`dynslice.experiment.frontier.run` with the profile's own settings cut to one size and one calibration
seed (every method, RFT included; resumable: points land under ``--work``), then multiplies each phase by how often
the full profile repeats it. Wall and CPU seconds are both kept: on a shared machine the wall time says little, and
the CPU time of a two-thread run is about twice the wall time it takes on two idle cores (bench/results/
slicing_cpu.json: 61.7 CPU s for a 31.5 s pass). Writes ``bench/results/frontier_time.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from dynslice.experiment import frontier
from dynslice.experiment.numerics import describe
from dynslice.experiment.profiles import load_profile
from dynslice.store.jsonio import read_json, write_json

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="frontier")
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--work", default=str(HERE / ".frontier"))
    ap.add_argument("--out", default=str(HERE / "results" / "frontier_time.json"))
    args = ap.parse_args()
    prof = load_profile(args.profile)
    full = prof.frontier
    cut = dataclasses.replace(full, sizes=(args.size,), seeds=full.seeds[:1])
    load0 = os.getloadavg()
    rec = frontier.run(cut, prof.rft, Path(args.work) / "frontier.json", progress=True)
    wall = rec["time_s"]  # the record's own (a rerun of this script rereads it and recomputes nothing)
    points = {p["name"]: p for p in rec["points"] if "same_model_as" not in p}
    per_point_cpu = sum(p["timings_s"].get("cpu", 0.0) for p in points.values()) / max(1, len(points))
    per_point_wall = sum(sum(v for k, v in p["timings_s"].items() if k != "cpu") for p in points.values()) / max(
        1, len(points)
    )
    work = Path(args.work) / "frontier" / "points"
    sb = read_json(work / f"sb-k{args.size:02d}.json")
    # Full profile: every method x size x seed is a point, except that ShortGPT's deletion rarely changes with the
    # seed (counted once per size here, as it is computed once when the deleted layers agree).
    n_full = len(full.sizes) * sum(1 if m == "shortgpt" else len(full.seeds) for m in full.methods)
    winners = len(full.sizes) if full.tasks and full.task_points == "winners" else 0
    # Besides the points: load, LR, the dense model (with tasks), the SB search and the winner's zero-shot rerun.
    # The last two repeat per size; counting all of it per size overestimates (load and dense are paid once).
    fixed_cpu = rec["cpu_s"] - per_point_cpu * len(points)
    predicted_cpu = per_point_cpu * n_full + fixed_cpu * len(full.sizes)
    out = {
        "benchmark": "frontier_time",
        "profile": prof.name,
        "measured": {
            "sizes": list(cut.sizes),
            "seeds": list(cut.seeds),
            "points_computed": len(points),
            "wall_s": round(wall, 1),
            "cpu_s": rec["cpu_s"],
            "per_point_wall_s": round(per_point_wall, 1),
            "per_point_cpu_s": round(per_point_cpu, 1),
            "sb_search_wall_s": round(sb["time_s"], 1),
            "per_point_phases_s": {k: v for k, v in next(iter(points.values()))["timings_s"].items()},
            "fixed_cpu_s": round(fixed_cpu, 1),
            "load_average_when_written": [round(x, 2) for x in load0],
        },
        "full_profile": {
            "points": n_full,
            "winner_zero_shot": winners,
            "predicted_cpu_s": round(predicted_cpu, 0),
            "predicted_idle_wall_min": round(predicted_cpu / 2 / 60, 1),
            "budget_min": 45,
            "rule": "CPU s of the cut run per point x the full profile's points, plus its fixed CPU (load, LR, dense, "
            "SB search, winner tasks) once per size (an overestimate: load and the dense model are paid once); "
            "idle two-core wall = CPU / 2",
        },
        "numerics": describe(),
    }
    write_json(args.out, out)
    print(out)


if __name__ == "__main__":
    main()
