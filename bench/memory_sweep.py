"""Measured vs predicted peak host RAM of a *sweep*: three runs of one model in one process, on the memory plan.

A sweep (:func:`dynslice.experiment.sweep.run_sweep`) keeps one :class:`~dynslice.experiment.pipeline.Workbench` per
model; the workbench never holds the dense model, so every run re-reads it from the memory-mapped checkpoint, and
the sweep's peak should be one run's peak (:func:`dynslice.store.memory.plan_run`), not grow with the runs.

For each config (random-init Llama-3-8B / Mistral-7B shapes with the layer count cut, from ``memory_model.py``), a
model is saved as safetensors with SmolLM2's tokenizer (a vocabulary below its 49152 ids is raised to it), then a fresh process runs, on the offline ``wiki`` corpus:
the LR score, then three runs (constant SP 0.3, and SB 0.2 and 0.1), twice, through :func:`dynslice.experiment.pipeline.run`.
A thread samples the resident set every 2 ms; the peak above the baseline (imports, tokenizer and data batches
loaded) is recorded for the LR and for each run, next to the plan's prediction.

Run: ``python bench/memory_sweep.py [--configs llama3-8b-2l/4 mistral-7b-2l/4] [--dtype bf16]``. Writes
``bench/results/memory_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_model import CONFIGS, ROOT, _env, build_model  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "memory_sweep.json"
SMOLLM2_VOCAB = 49152
#: three runs (constant, SB 0.2, SB 0.1), then the same three again: six runs in one process, to see whether the
#: peak keeps growing after the first runs
SPS = {"sp": 0.3, "sbs": [0.3, 0.2, 0.1, 0.3, 0.2, 0.1]}

_CHILD = r"""
import json, os, sys, threading, time
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from dynslice.experiment.config import RunConfig
from dynslice.experiment import pipeline
from dynslice.measure import data
from dynslice.store.memory import Shapes, plan_run
from dynslice.store.placement import dense_bytes

page = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page
peak = [0]
stop = False
def sample():
    while not stop:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()

common = dict(model=a["src"], dtype=a["dtype"], device="cpu", seed=42, lr_dataset="wiki", lr_nsamples=a["nsamples"],
              lr_seqlen=a["seqlen"], cal_dataset="wiki", cal_nsamples=a["nsamples"], cal_seqlen=a["seqlen"],
              batch_size=a["batch_size"], ppl_datasets=("wiki",), ppl_seqlen=a["seqlen"], ppl_max_chunks=a["chunks"])
cfgs = [RunConfig(sp=a["sp"], sb=sb, **common) for sb in a["sbs"]]
bench = pipeline.Workbench.of(cfgs[0])
# the baseline holds what a sweep keeps for good: tokenizer, token batches, evaluation chunks, kernels warmed up
bench.calibration(cfgs[0]); bench.lr_batch(cfgs[0])
data.eval_chunks("wiki", bench.tokenizer, a["seqlen"], split="test", max_chunks=a["chunks"])
q = torch.randn(1, 2, 8, 16).to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[a["dtype"]]))
torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
time.sleep(0.05)
base = rss()
out = {"base_bytes": base, "runs": []}

def measured(fn):
    time.sleep(0.02)
    peak[0] = rss()
    t = time.perf_counter()
    value = fn()
    time.sleep(0.02)
    return value, peak[0] - base, time.perf_counter() - t

evaluate = pipeline.evaluate_model
phase = {}
def evaluate_model(*args, **kw):  # the slicing's peak so far, then the evaluation's own
    phase["slicing"] = peak[0] - base
    peak[0] = rss()
    value = evaluate(*args, **kw)
    time.sleep(0.02)
    phase["eval"] = peak[0] - base
    peak[0] = max(phase["slicing"], phase["eval"]) + base
    return value
pipeline.evaluate_model = evaluate_model
_, lr_peak, lr_s = measured(lambda: bench.lr(cfgs[0]))
out["lr"] = {"measured_bytes": lr_peak, "wall_s": lr_s}
for cfg in cfgs:
    rec, p, s = measured(lambda: pipeline.run(cfg, bench=bench))
    out["runs"].append({"sb": cfg.sb, "widths": rec["widths"], "measured_bytes": p, "wall_s": s,
                        "after_bytes": rss() - base, "ppl": rec["ppl"], "phases": dict(phase)})
stop = True
slicing = bench.plan(cfgs[0])
rp = plan_run(Shapes.from_config(bench.config), slicing, lr_batch_tokens=a["batch_size"] * a["seqlen"],
              eval_batch_tokens=a["batch_size"] * a["seqlen"], eval_seqlen=a["seqlen"])
out["plan"] = rp.to_json()
print(json.dumps(out))
"""


def measure_sweep(
    name: str, dtype: str, nsamples: int, seqlen: int, batch_size: int, chunks: int, threads: int
) -> dict:
    """Build ``name``'s model and measure its three-run sweep in a fresh process."""
    from dynslice.store.models import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="dynslice-sweep-bench-") as tmp:
        # the calibration text is tokenised with SmolLM2's tokenizer: the vocabulary must hold its 49152 ids
        cfg = dict(
            CONFIGS[name], vocab_size=max(CONFIGS[name]["vocab_size"], SMOLLM2_VOCAB), bos_token_id=1, eos_token_id=2
        )
        src = build_model(cfg, Path(tmp) / "model", dtype)
        load_tokenizer("smollm2-135m").save_pretrained(src)
        arg = {
            "src": str(src),
            "dtype": dtype,
            "nsamples": nsamples,
            "seqlen": seqlen,
            "batch_size": batch_size,
            "chunks": chunks,
            "threads": threads,
            **SPS,
        }
        r = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(arg)], check=True, capture_output=True, text=True, env=_env()
        )
    got = json.loads(r.stdout.strip().splitlines()[-1])
    plan = got["plan"]
    predicted = plan["peak_host_bytes"]
    runs = got["runs"]
    return {
        "config": name,
        "dtype": dtype,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "batch_size": batch_size,
        "lr": {**got["lr"], "predicted_bytes": plan["phase_host_bytes"]["lr"]},
        "runs": runs,
        "predicted_run_bytes": predicted,
        "measured_sweep_bytes": max([r["measured_bytes"] for r in runs] + [got["lr"]["measured_bytes"]]),
        "error": round(max(r["measured_bytes"] for r in runs) / predicted - 1, 4),
        "growth_last_vs_first": round(runs[-1]["measured_bytes"] / runs[0]["measured_bytes"] - 1, 4),
        # the second three runs against the first three: a sweep whose peak grows with its runs shows it here
        "growth_second_vs_first_three": round(
            max(r["measured_bytes"] for r in runs[3:]) / max(r["measured_bytes"] for r in runs[:3]) - 1, 4
        ),
        "plan": plan,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["llama3-8b-2l/4", "mistral-7b-2l/4"], choices=sorted(CONFIGS))
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    from dynslice.store.jsonio import write_json

    rows = []
    for name in a.configs:
        row = measure_sweep(name, a.dtype, a.nsamples, a.seqlen, a.batch_size, a.chunks, a.threads)
        print(
            f"{name}: sweep peak {row['measured_sweep_bytes'] / 2**20:.0f} MiB, plan {row['predicted_run_bytes'] / 2**20:.0f}"
            f" MiB ({row['error']:+.1%}); runs {[round(r['measured_bytes'] / 2**20) for r in row['runs']]} MiB"
        )
        rows.append(row)
    write_json(a.out, {"rows": rows, "threads": a.threads, "sps": SPS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
