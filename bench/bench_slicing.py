"""Wall time and memory of slicing SmolLM2-135M on the CPU, against the one-pass floor.

The issue's target: slicing at SP 0.3 with 32×512 calibration tokens should take at most 1.3× the *floor*, the
time of one dense pass of the calibration set through the decoder (``model.model``: no LM head), times the
number of signal passes the engine makes (one: every sublayer runs once per batch, see :mod:`dynslice.core.slicing`).

In one process, with ``--threads`` torch threads:

1. the floor, measured three times (before, between and after the slicing runs; the median is used), so that
   noise from other work on the machine shows up as spread instead of as a biased ratio;
2. constant slicing (SB = SP) and dynamic slicing (``--sb``, LR allocation), each on a fresh deep copy of the
   dense model: wall time, the engine's own split (capture / forward / PCA / rotate), time / floor, and memory:
   ``ru_maxrss`` (the process's lifetime peak) and the RSS rise during ``slice_model`` seen by a thread that
   samples ``/proc/self/statm`` every few milliseconds;
3. sanity checks: the parameter count of each sliced model equals :func:`dynslice.core.params.sliced_params`, and its
   loss on two calibration sequences is reported next to the dense one.

SliceGPT's reference implementation runs every decoder layer twice per batch (once for the PCA inputs, once more
after rotating), so its signal passes cost about 2× the floor; that estimate is stated in the JSON, not run.

Run: ``python bench/bench_slicing.py [--nsamples 32 --seqlen 512 --sp 0.3 --sb 0.1 --threads 2]``.
Writes ``bench/results/slicing_cpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import resource
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynslice.core.adapters import count_parameters
from dynslice.core.allocate import allocate, constant_width
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, dense_params, sliced_params
from dynslice.core.slicing import slice_model
from dynslice.measure.data import calibration_batch
from dynslice.store.jsonio import write_json
from dynslice.store.models import load

MODEL = "smollm2-135m"
DATASET = "wiki"
ROUND_INTERVAL = 8
TARGET_RATIO = 1.3
SIGNAL_PASSES = 1  # dynslice runs each sublayer once per calibration batch
REFERENCE_SIGNAL_PASSES = 2  # SliceGPT's reference runs each layer forward twice per batch
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "slicing_cpu.json"


# ---------------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` when that is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import transformers

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mem_total_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "shared": "the machine was shared with other engineers running tests; compare ratios within one run",
    }


def _meminfo_kib(key: str) -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (and one inter-op thread: the models run no parallel graph)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once parallel work has started
        pass


# ---------------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size of this process (``/proc/self/statm``; psutil when /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil  # only reached off Linux

        return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    """Peak RSS over the process's lifetime (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler:
    """Context manager: samples the RSS on a background thread and keeps the largest value seen.

    A spike shorter than ``interval_s`` can be missed; ``ru_maxrss`` bounds the lifetime peak from above.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: {interval_s} is outside interval_s > 0")
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.peak_at_s = 0.0  # seconds after entering the context
        self.samples = 0
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            now = rss_bytes()
            if now > self.peak_bytes:
                self.peak_bytes, self.peak_at_s = now, time.perf_counter() - self._t0
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._t0 = time.perf_counter()
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = rss_bytes()
        if now > self.peak_bytes:
            self.peak_bytes, self.peak_at_s = now, time.perf_counter() - self._t0


def mib(n: float) -> float:
    return round(n / 2**20, 1)


# ---------------------------------------------------------------------------------------------------- timing


@torch.no_grad()
def dense_pass(model: nn.Module, calibration: dict[str, torch.Tensor], batch_size: int) -> tuple[float, float]:
    """``(wall, cpu)`` seconds for one pass of the calibration set through the decoder (``model.model``, no LM
    head); ``cpu`` is the process's CPU time, all threads together."""
    ids, mask = calibration["input_ids"], calibration["attention_mask"]
    t, c = time.perf_counter(), time.process_time()
    for start in range(0, ids.shape[0], batch_size):
        model.model(
            input_ids=ids[start : start + batch_size], attention_mask=mask[start : start + batch_size], use_cache=False
        )
    return time.perf_counter() - t, time.process_time() - c


@torch.no_grad()
def sample_loss(model: nn.Module, calibration: dict[str, torch.Tensor], rows: int = 2) -> float:
    """Mean next-token loss on the first ``rows`` calibration sequences (a sanity check, not an evaluation)."""
    ids = calibration["input_ids"][:rows]
    return float(model(input_ids=ids, attention_mask=calibration["attention_mask"][:rows], labels=ids).loss)


def slice_run(
    dense: nn.Module, calibration: dict[str, torch.Tensor], widths: list[int], batch_size: int, dims: ArchDims
) -> dict[str, Any]:
    """Slice a deep copy of ``dense`` to ``widths``: wall time, the engine's split, memory and sanity checks."""
    gc.collect()
    rss_before_copy = rss_bytes()
    model = copy.deepcopy(dense)
    rss_baseline = rss_bytes()
    with RssSampler() as sampler:
        t, c = time.perf_counter(), time.process_time()
        slice_model(model, calibration, widths, batch_size=batch_size)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    timings = dict(model.dynslice_info.timings_s)
    expected = sliced_params(dims, widths)
    actual = count_parameters(model)
    if actual != expected.total:
        raise RuntimeError(f"sliced model has {actual} parameters, sliced_params says {expected.total}")
    record = {
        "widths": widths,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "timings_s": timings,
        "split_fraction": {k: round(v / timings["total"], 4) for k, v in timings.items() if k != "total"},
        "memory": {
            "rss_before_copy_mib": mib(rss_before_copy),
            "rss_baseline_mib": mib(rss_baseline),
            "rss_peak_during_slicing_mib": mib(sampler.peak_bytes),
            "rss_increase_during_slicing_mib": mib(sampler.peak_bytes - rss_baseline),
            "rss_peak_at_s": round(sampler.peak_at_s, 2),
            "rss_after_slicing_mib": mib(rss_bytes()),
            "ru_maxrss_mib": mib(max_rss_bytes()),
            "rss_samples": sampler.samples,
        },
        "params": expected.to_json(),
        "sample_loss": round(sample_loss(model, calibration), 4),
    }
    del model
    gc.collect()
    return record


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--sp", type=float, default=0.3, help="slicing percentage (mean slice fraction)")
    p.add_argument("--sb", type=float, default=0.1, help="slicing base of the dynamic run (0 <= sb <= sp)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for name in ("nsamples", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: {getattr(args, name)} is outside {name} >= 1")
    if args.seqlen < 2:
        raise ValueError(f"seqlen: {args.seqlen} is outside seqlen >= 2")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    started = datetime.now(timezone.utc)
    load_start = load_average()

    t = time.perf_counter()
    model, tokenizer = load(MODEL)
    load_s = time.perf_counter() - t
    dims = ArchDims.from_config(model.config)
    calibration = calibration_batch(DATASET, tokenizer, args.nsamples, args.seqlen, seed=args.seed)
    rss_dense = rss_bytes()

    # A one-batch warm-up so that first-call costs (allocator, kernel selection) land in no measurement.
    dense_pass(model, {k: v[: args.batch_size] for k, v in calibration.items()}, args.batch_size)
    floors = [dense_pass(model, calibration, args.batch_size)]
    print(f"floor #1: {floors[-1][0]:.2f} s", flush=True)

    t = time.perf_counter()
    lr = layer_redundancy(model, calibration, batch_size=args.batch_size)
    lr_s = time.perf_counter() - t
    const_widths = [constant_width(dims.hidden, args.sp, ROUND_INTERVAL)] * dims.layers
    dyn = allocate(lr.normalized, args.sp, args.sb, dims.hidden, round_interval=ROUND_INTERVAL, dims=dims)

    runs: dict[str, Any] = {}
    for name, sb, widths in (("constant", args.sp, const_widths), ("dynamic", args.sb, list(dyn.widths))):
        runs[name] = {"sb": sb, **slice_run(model, calibration, widths, args.batch_size, dims)}
        floors.append(dense_pass(model, calibration, args.batch_size))
        print(f"{name}: {runs[name]['wall_s']:.2f} s; floor #{len(floors)}: {floors[-1][0]:.2f} s", flush=True)

    walls, cpus = [f[0] for f in floors], [f[1] for f in floors]
    floor, floor_cpu = statistics.median(walls) * SIGNAL_PASSES, statistics.median(cpus) * SIGNAL_PASSES
    for k, run in enumerate(runs.values()):
        run["ratio_to_floor"] = round(run["wall_s"] / floor, 3)  # headline: against the median floor
        run["meets_target"] = run["ratio_to_floor"] <= TARGET_RATIO
        adjacent = SIGNAL_PASSES * (walls[k] + walls[k + 1]) / 2  # the floors measured just before and after
        run["ratio_to_adjacent_floors"] = round(run["wall_s"] / adjacent, 3)
        run["cpu_ratio_to_floor"] = round(run["cpu_s"] / floor_cpu, 3)
    tokens = int(calibration["attention_mask"].sum())
    result = {
        "benchmark": "slicing_cpu",
        "model": MODEL,
        "dataset": DATASET,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "tokens": tokens,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "sp": args.sp,
        "round_interval": ROUND_INTERVAL,
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()},
        "model_load_s": round(load_s, 2),
        "rss_dense_model_mib": mib(rss_dense),
        "floor": {
            "definition": "one pass of the calibration set through model.model (no LM head, torch.no_grad, same "
            "batch size) x the engine's signal passes; measured before, between and after the "
            "slicing runs, median used",
            "signal_passes": SIGNAL_PASSES,
            "passes_wall_s": [round(w, 3) for w in walls],
            "passes_cpu_s": [round(c, 3) for c in cpus],
            "spread": round((max(walls) - min(walls)) / min(walls), 3),
            "floor_s": round(floor, 3),
            "floor_cpu_s": round(floor_cpu, 3),
            "tokens_per_s": round(tokens / statistics.median(walls), 1),
        },
        "target_ratio": TARGET_RATIO,
        "reference_estimate": {
            "signal_passes": REFERENCE_SIGNAL_PASSES,
            "signal_s": round(REFERENCE_SIGNAL_PASSES * statistics.median(walls), 3),
            "note": "estimate, not run: SliceGPT's reference runs every layer twice per batch, so its signal "
            "passes alone cost ~2x the floor (PCA and rotation come on top)",
        },
        "lr": {
            "metric": lr.metric,
            "time_s": round(lr_s, 3),
            "ratio_to_floor": round(lr_s / floor, 3),
            "note": "dynamic slicing also needs the LR scores (one dense pass with hooks), timed separately",
        },
        "dense": {"params": dense_params(dims), "sample_loss": round(sample_loss(model, calibration), 4)},
        "runs": runs,
    }
    write_json(args.out, result)
    print(f"floor {floor:.2f} s (passes {', '.join(f'{w:.2f}' for w in walls)})")
    for name, run in runs.items():
        print(
            f"{name}: {run['wall_s']:.2f} s = {run['ratio_to_floor']:.2f}x floor "
            f"(CPU time {run['cpu_ratio_to_floor']:.2f}x); split {run['timings_s']}; "
            f"RSS +{run['memory']['rss_increase_during_slicing_mib']} MiB, "
            f"ru_maxrss {run['memory']['ru_maxrss_mib']} MiB"
        )
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
