"""Measure the reference protocol against dynslice's own on the embedded SmolLM2, offline (``wiki`` stands in for the
hub datasets), and write ``bench/results/protocol_smollm2.json``.

What it measures (modest sizes, so that it fits a busy 2-core CPU):

- LR under each protocol and the max |delta| of the normalised vectors (also per LR deviation: the LR data from
  dynslice's to the authors' with the raw last layer, then the last layer from raw to after the final norm);
- dense, constant (SB = SP) and SB 0 perplexity at SP 0.3 under each protocol, each with its own perplexity;
- per deviation: dynslice's protocol at SP 0.3, SB 0 (where LR matters), with that one setting switched to the
  authors' choice; perplexity is dynslice's (test split, consecutive chunks) unless the deviation *is* the
  perplexity protocol. fp16 is not measured: a 4 x 256 forward in fp16 takes over a minute on this CPU.

Run: ``PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_protocol.py`` (about 30 minutes on a busy 2-core machine;
the GGUF-loaded dense model is the slow part).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from dynslice.experiment.config import RunConfig
from dynslice.experiment.pipeline import Workbench, run, versions
from dynslice.experiment.protocol import differences
from dynslice.store.jsonio import write_json

OUT = Path(__file__).resolve().parent / "results" / "protocol_smollm2.json"
SP = 0.3
SIZES = {
    "model": "smollm2-135m",
    "dtype": "fp32",
    "device": "cpu",
    "seed": 42,
    "sp": SP,
    "lr_nsamples": 8,
    "cal_nsamples": 16,
    "cal_seqlen": 256,
    "ppl_seqlen": 256,
    "batch_size": 4,
    "lr_dataset": "wiki",
    "cal_dataset": "wiki",
    "ppl_datasets": ("wiki",),
}
#: ppl sizes per perplexity protocol: 8 consecutive test chunks, or 8 document-joined validation samples.
PPL = {
    "slicegpt": {"ppl_max_chunks": 8, "ppl_nsamples": None},
    "documents": {"ppl_max_chunks": None, "ppl_nsamples": 8},
}
#: One switch per deviation (keys match dynslice.experiment.protocol.DEVIATIONS' ``effect``).
SWITCHES = {
    "lr_data": {"lr_split": "validation", "lr_sampler": "sliding", "lr_seqlen": 1024, "lr_stride": 256},
    "lr_last_layer": {
        "lr_split": "validation",
        "lr_sampler": "sliding",
        "lr_seqlen": 1024,
        "lr_stride": 256,
        "lr_last_layer": "final_norm",
    },
    "embedding_mean": {"embedding_mean": True},
    "cal_sampler": {"cal_sampler": "documents"},
    "rounding": {"rounding": "reference", "round_interval": 1},
}


def config(protocol: str, **changes) -> RunConfig:
    base = RunConfig(protocol=protocol, **SIZES, sb=0.0)
    ppl = PPL[changes.get("ppl_protocol", base.ppl_protocol)]
    return RunConfig(**{**base.to_json(), **ppl, **changes})


def ppl_of(bench: Workbench, cfg: RunConfig) -> float:
    rec = run(cfg, bench=bench)
    return float(rec["ppl"]["wiki"])


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bench = Workbench("smollm2-135m", "fp32", "cpu")
    out: dict = {
        "versions": versions(),
        "sizes": {k: v for k, v in SIZES.items() if k != "ppl_datasets"},
        "ppl_sizes": PPL,
        "sp": SP,
    }

    # LR under each protocol (and under each LR deviation alone).
    lr = {p: bench.lr(config(p)) for p in ("dynslice", "reference")}
    lr["lr_data"] = bench.lr(config("dynslice", **SWITCHES["lr_data"]))

    def max_delta(a: str, b: str) -> float:
        return max(abs(x - y) for x, y in zip(lr[a]["normalized"], lr[b]["normalized"]))

    out["lr"] = {
        "normalized": {k: [round(v, 4) for v in s["normalized"]] for k, s in lr.items()},
        "windows": {k: s["windows"] for k, s in lr.items()},
        "max_abs_delta_reference_vs_dynslice": max_delta("reference", "dynslice"),
        "max_abs_delta_lr_data_only": max_delta("lr_data", "dynslice"),
        "max_abs_delta_last_layer_only": max_delta("reference", "lr_data"),
    }
    print(out["lr"], file=sys.stderr)

    # Each protocol's own numbers: dense, constant and SB 0 at SP 0.3.
    out["protocols"] = {}
    for p in ("dynslice", "reference"):
        rows = {
            "dense": ppl_of(bench, config(p, sp=0.0, sb=0.0)),
            "constant": ppl_of(bench, config(p, sb=SP)),
            "sb0": ppl_of(bench, config(p, sb=0.0)),
        }
        out["protocols"][p] = {**rows, "differences": differences(config(p, sb=0.0).to_json())}
        print(p, rows, file=sys.stderr)

    # Per-deviation effects, from dynslice's protocol at SP 0.3, SB 0.
    base = out["protocols"]["dynslice"]["sb0"]
    effects = {}
    for key, change in SWITCHES.items():
        # The last layer's effect is measured on the authors' LR data (from raw to after the final norm).
        before = effects["lr_data"]["ppl_reference"] if key == "lr_last_layer" else base
        value = ppl_of(bench, config("dynslice", **change))
        effects[key] = {"ppl_dynslice": before, "ppl_reference": value, "delta_ppl": value - before, "switch": change}
        print(key, effects[key], file=sys.stderr)
    docs = config("dynslice", ppl_protocol="documents")
    value = ppl_of(bench, docs)
    effects["ppl_protocol"] = {
        "ppl_dynslice": base,
        "ppl_reference": value,
        "delta_ppl": value - base,
        "switch": {"ppl_protocol": "documents"},
        "note": "same sliced model, measured on the validation split by the authors' sampler",
    }
    out["effects"] = effects
    out["not_measured"] = {"dtype": "fp16 on this CPU: a 4 x 256 SmolLM2 forward takes about 75 s"}
    out["time_s"] = round(time.perf_counter() - t0, 1)
    write_json(OUT, out)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
