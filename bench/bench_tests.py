"""Wall time of the test tiers: `./run_all.sh --test` (fast) and `./run_all.sh --test --all` (both), one run each.

Writes bench/results/test_times.json (merged with what is there, one entry per tier) with the load average before
and after, the commit and the pytest summary line, so the README's stated times have a measured source.

    python bench/bench_tests.py --tier fast    # about 4 minutes on 2 cores
    python bench/bench_tests.py --tier all     # about 25 minutes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynslice.store.jsonio import read_json, write_json  # noqa: E402

OUT = ROOT / "bench" / "results" / "test_times.json"
ARGS = {"fast": ["--test"], "all": ["--test", "--all"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tier", choices=sorted(ARGS), required=True)
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    res = subprocess.run(["./run_all.sh", *ARGS[a.tier]], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = [ln for ln in res.stdout.splitlines() if " passed" in ln or " failed" in ln]
    entry = {
        "command": "./run_all.sh " + " ".join(ARGS[a.tier]),
        "wall_s": round(wall, 1),
        "returncode": res.returncode,
        "summary": lines[-1].strip() if lines else None,
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record = read_json(OUT) if OUT.is_file() else {}
    record[a.tier] = entry
    write_json(OUT, record)
    print(entry)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
