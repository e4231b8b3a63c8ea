"""Measure the reference protocol against dynslice's own on the embedded SmolLM2, offline (``wiki`` stands in for the
hub datasets), and write ``bench/results/protocol_smollm2.json``.

What it measures (modest sizes, so that it fits a busy 2-core CPU):

- LR under each protocol and the max |delta| of the normalised vectors (also per LR deviation: the LR data from
  dynslice's to the authors' with the raw last layer, then the last layer from raw to after the final norm);
- dense, constant (SB = SP) and SB 0 perplexity at SP 0.3 under each protocol, each with its own perplexity;
- per deviation: dynslice's protocol at SP 0.3, SB 0 (where LR matters), with that one setting switched to the
  authors' choice; perplexity is dynslice's (test split, consecutive chunks) unless the deviation *is* the
  perplexity protocol. The LR rows build on each other: the authors' LR data, then their last layer, then their
  fp16 arithmetic of the cosine (``lr_precision``; the forward stays fp32, since a 4 x 256 fp16 forward takes over
  a minute on this CPU: the hidden states are rounded to fp16 and the cosine follows their formula);
- the fp16 LR arithmetic also in widths: at every SB of the paper's grid (step 0.02) at SP 0.3, how many layers'
  widths change;
- the tokenisation of the calibration sampler: the authors' decode-and-re-encode samples (``data_utils.py``,
  rebuilt here) against dynslice's concatenated ids, in tokens and in perplexity (the same widths, sliced on each);
- batch size 1 against 8 (LR and calibration);
- each effect is marked ``within_noise`` when its relative size is below the largest sliced-perplexity deviation
  measured across arithmetic settings and machines (``bench/results/numerics_noise.json``).

Run: ``PYTHONPATH=. python bench/bench_protocol.py`` (about 10 minutes on a busy 2-core machine).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

from dynslice.experiment.config import RunConfig
from dynslice.experiment.pipeline import Workbench, run, slice_dense, versions
from dynslice.experiment.profiles import dynamic_sbs
from dynslice.experiment.protocol import differences
from dynslice.experiment.widths import allocation
from dynslice.measure import data
from dynslice.measure.evaluate import dataset_perplexity
from dynslice.store.jsonio import write_json

OUT = Path(__file__).resolve().parent / "results" / "protocol_smollm2.json"
NOISE = Path(__file__).resolve().parent / "results" / "numerics_noise.json"
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
LR_DATA = {"lr_split": "validation", "lr_sampler": "sliding", "lr_seqlen": 1024, "lr_stride": 256}
#: One switch per deviation (keys match dynslice.experiment.protocol.DEVIATIONS' ``effect``), and the effect each
#: builds on (None: dynslice's protocol).
SWITCHES = {
    "lr_data": (LR_DATA, None),
    "lr_last_layer": ({**LR_DATA, "lr_last_layer": "final_norm"}, "lr_data"),
    "lr_precision": ({**LR_DATA, "lr_last_layer": "final_norm", "lr_precision": "authors_fp16"}, "lr_last_layer"),
    "embedding_mean": ({"embedding_mean": True}, None),
    "cal_sampler": ({"cal_sampler": "documents"}, None),
    "rounding": ({"rounding": "reference", "round_interval": 1}, None),
    "batch_size": ({"batch_size": 1}, None),
}


def noise_rel() -> float:
    """The largest relative deviation of a sliced model's perplexity across arithmetic settings and machines."""
    return float(json.loads(NOISE.read_text())["tolerances"]["by_quantity"]["ppl_sliced"]["largest_seen"])


def authors_document_rows(name: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """The authors' calibration samples, rebuilt from their rule (SliceGPT ``data_utils.py:104-132``, not their
    code): the same joining as :func:`dynslice.measure.data.join_documents`, but each piece becomes token strings
    (``tokenize``), the sample is turned back into text (``convert_tokens_to_string``) and tokenised again with the
    tokenizer's special tokens, cut at ``seqlen``."""
    texts = data.load_texts(name, "train")

    def pieces(text: str) -> list[str]:
        return tokenizer.tokenize(text)

    rows = data.join_documents(texts, pieces, nsamples, seqlen, seed)
    return [tokenizer(tokenizer.convert_tokens_to_string(r))["input_ids"][:seqlen] for r in rows]


def config(protocol: str, **changes) -> RunConfig:
    base = RunConfig(protocol=protocol, **SIZES, sb=0.0)
    ppl = PPL[changes.get("ppl_protocol", base.ppl_protocol)]
    return RunConfig(**{**base.to_json(), **ppl, **changes})


def ppl_of(bench: Workbench, cfg: RunConfig) -> float:
    rec = run(cfg, bench=bench)
    return float(rec["ppl"]["wiki"])


def effect(before: float, after: float, switch: dict, noise: float, **extra) -> dict:
    delta = after - before
    return {
        "ppl_dynslice": before,
        "ppl_reference": after,
        "delta_ppl": delta,
        "relative": delta / before,
        "within_noise": abs(delta) / before < noise,
        "switch": switch,
        **extra,
    }


def changed_widths(bench: Workbench, cfg: RunConfig, lr_a: dict, lr_b: dict) -> dict:
    """At every SB of the paper's grid (step 0.02) at ``cfg.sp``: layers whose width differs between the two LRs."""
    dims = bench.dims()
    out = {}
    for sb in dynamic_sbs(cfg.sp, 0.02):
        c = cfg.replace(sb=sb)
        wa, wb = allocation(c, dims, lr_a).widths, allocation(c, dims, lr_b).widths
        out[f"{sb:.2f}"] = sum(x != y for x, y in zip(wa, wb))
    return out


def main() -> int:
    t0 = time.perf_counter()
    noise = noise_rel()
    bench = Workbench("smollm2-135m", "fp32", "cpu")
    out: dict = {
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "sizes": {k: v for k, v in SIZES.items() if k != "ppl_datasets"},
        "ppl_sizes": PPL,
        "sp": SP,
        "noise_rel": noise,
    }

    # LR under each protocol (and under each LR deviation alone).
    lr = {p: bench.lr(config(p)) for p in ("dynslice", "reference")}
    for key in ("lr_data", "lr_last_layer", "lr_precision"):
        lr[key] = bench.lr(config("dynslice", **SWITCHES[key][0]))

    def max_delta(a: str, b: str) -> float:
        return max(abs(x - y) for x, y in zip(lr[a]["normalized"], lr[b]["normalized"]))

    out["lr"] = {
        "normalized": {k: [round(v, 4) for v in s["normalized"]] for k, s in lr.items()},
        "windows": {k: s["windows"] for k, s in lr.items()},
        "max_abs_delta_reference_vs_dynslice": max_delta("reference", "dynslice"),
        "max_abs_delta_lr_data_only": max_delta("lr_data", "dynslice"),
        "max_abs_delta_last_layer_only": max_delta("lr_last_layer", "lr_data"),
        "max_abs_delta_precision_only": max_delta("lr_precision", "lr_last_layer"),
        "widths_changed_by_precision": changed_widths(
            bench, config("dynslice", **SWITCHES["lr_precision"][0]), lr["lr_last_layer"], lr["lr_precision"]
        ),
    }
    print(out["lr"], file=sys.stderr)

    # Each protocol's own numbers: dense, constant and SB 0 at SP 0.3 (reference at this bench's sizes).
    out["protocols"] = {}
    for p in ("dynslice", "reference"):
        rows = {
            "dense": ppl_of(bench, config(p, sp=0.0, sb=0.0)),
            "constant": ppl_of(bench, config(p, sb=SP)),
            "sb0": ppl_of(bench, config(p, sb=0.0)),
        }
        out["protocols"][p] = {**rows, "differences": differences(config(p, sb=0.0).to_json())}
        print(p, rows, file=sys.stderr)

    # Per-deviation effects, from dynslice's protocol at SP 0.3, SB 0 (or from the effect a row builds on).
    base = out["protocols"]["dynslice"]["sb0"]
    effects: dict = {}
    records = {}
    for key, (change, after) in SWITCHES.items():
        before = effects[after]["ppl_reference"] if after else base
        records[key] = run(config("dynslice", **change), bench=bench)
        value = float(records[key]["ppl"]["wiki"])
        extra = {}
        if key == "lr_precision":
            before_widths = records["lr_last_layer"]["widths"]
            extra["widths_changed_sb0"] = sum(a != b for a, b in zip(before_widths, records[key]["widths"]))
            extra["extra"] = (
                f"normalised LR moves by up to {out['lr']['max_abs_delta_precision_only']:.3f}, "
                f"{extra['widths_changed_sb0']} of {len(before_widths)} widths change at SB 0"
            )
        effects[key] = effect(before, value, change, noise, **extra)
        print(key, effects[key], file=sys.stderr)
    docs = config("dynslice", ppl_protocol="documents")
    value = ppl_of(bench, docs)
    effects["ppl_protocol"] = effect(
        base,
        value,
        {"ppl_protocol": "documents"},
        noise,
        note="same sliced model, measured on the validation split by the authors' sampler",
    )

    # The authors' tokenisation of the calibration samples, on the documents sampler's widths.
    cfg = config("dynslice", cal_sampler="documents")
    ours = bench.calibration(cfg)["input_ids"].tolist()
    theirs = authors_document_rows(cfg.cal_dataset, bench.tokenizer, cfg.cal_nsamples, cfg.cal_seqlen, cfg.seed)
    n = max(len(r) for r in theirs)
    ids = torch.full((len(theirs), n), bench.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(theirs):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    model = slice_dense(
        copy.deepcopy(bench.model),
        cfg,
        {"input_ids": ids, "attention_mask": mask},
        records["cal_sampler"]["widths"],
        progress=False,
    )
    value = dataset_perplexity(
        model,
        bench.tokenizer,
        "wiki",
        seqlen=cfg.ppl_seqlen,
        protocol=cfg.ppl_protocol,
        max_chunks=cfg.ppl_max_chunks,
        batch_size=cfg.batch_size,
    )
    same = sum(a == b for a, b in zip(ours, theirs))
    tokens_differ = sum(x != y for a, b in zip(ours, theirs) for x, y in zip(a, b)) / sum(map(len, ours))
    effects["cal_tokenisation"] = effect(
        effects["cal_sampler"]["ppl_reference"],
        float(value),
        {},
        noise,
        samples_identical=same,
        samples=len(ours),
        token_positions_differing=tokens_differ,
        lengths=sorted({len(r) for r in theirs}),
        extra=f"{same} of {len(ours)} samples identical, {100 * tokens_differ:.1f}% of token positions differ",
    )
    print("cal_tokenisation", effects["cal_tokenisation"], file=sys.stderr)
    out["effects"] = effects
    out["not_measured"] = {
        "dtype": "fp16 forward on this CPU: a 4 x 256 SmolLM2 forward takes about 75 s",
        "sizes": "128 x 2048 calibration per slicing",
        "zero_shot": "the six lm-eval tasks need the hub",
        "c4": "C4 needs the hub",
    }
    out["time_s"] = round(time.perf_counter() - t0, 1)
    write_json(OUT, out)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
