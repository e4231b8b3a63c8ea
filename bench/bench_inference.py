"""Prefill and decode speed of dense vs sliced SmolLM2-135M on the CPU, with parameter counts.

Models: the dense model; constant slicing at SP 0.2 and 0.3; dynamic slicing at SP 0.3, SB 0.1 (LR allocation).
Sliced models are built from a small calibration set (16×256 wiki tokens by default): speed does not depend on
calibration quality, only on the widths.

For batch sizes 1 and 8, with prompts of 256 real tokens (consecutive chunks of the wiki test split):

* **prefill**: one forward of the prompt that fills the KV cache and computes the logits of the last position
  only (``logits_to_keep=1``, as a generator does); tokens/s = batch × prompt length / time;
* **decode**: after an untimed prefill, 64 greedy steps of one token each through the KV cache (a manual loop,
  so every run produces exactly 64 tokens); tokens/s = batch × 64 / time.

Each is repeated ``--repeats`` times (3) after a warm-up, the models taking turns within every repeat (so that
load from other processes hits them alike); the median is reported. A sanity check per model: the
last cached decode step's logits against a full (cache-free) forward of prompt + generated tokens.

Run as a script (it imports helpers from ``bench_slicing.py`` next to it):
``python bench/bench_inference.py [--threads 2]``. Writes ``bench/results/inference_cpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from bench_slicing import load_average, machine_info, set_threads
from torch import nn

from dynslice.core.adapters import count_parameters
from dynslice.core.allocate import allocate, constant_width
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, dense_params, sliced_params
from dynslice.core.slicing import slice_model
from dynslice.measure.data import calibration_batch, eval_chunks
from dynslice.store.jsonio import write_json
from dynslice.store.models import load

MODEL = "smollm2-135m"
DATASET = "wiki"
ROUND_INTERVAL = 8
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "inference_cpu.json"
#: (name, sp, sb); sb == sp is SliceGPT's constant slicing, sp None the dense model.
CONFIGS: tuple[tuple[str, float | None, float | None], ...] = (
    ("dense", None, None),
    ("constant_sp0.2", 0.2, 0.2),
    ("constant_sp0.3", 0.3, 0.3),
    ("dynamic_sp0.3_sb0.1", 0.3, 0.1),
)


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor) -> Any:
    """Forward of the prompt that fills a KV cache; logits of the last position only."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def greedy_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Untimed prefill (it picks the first token), then ``new_tokens`` timed greedy steps through the KV cache,
    each feeding the previous token and picking the next.

    Returns ``(seconds, the fed tokens (batch × new_tokens), logits of the last step (batch × vocab))``.
    """
    out = prefill(model, ids)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    fed = []
    t = time.perf_counter()
    for _ in range(new_tokens):
        fed.append(nxt)
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    seconds = time.perf_counter() - t
    return seconds, torch.cat(fed, dim=1), out.logits[:, -1]


@torch.no_grad()
def cache_consistency(model: nn.Module, ids: torch.Tensor, fed: torch.Tensor, last_logits: torch.Tensor) -> float:
    """Max |Δ| between the last cached decode step's logits and a cache-free forward of prompt + fed tokens,
    relative to the largest logit magnitude."""
    full = model(input_ids=torch.cat([ids, fed], dim=1), use_cache=False, logits_to_keep=1).logits[:, -1]
    return float((full - last_logits).abs().max() / full.abs().max())


def measure(
    models: dict[str, nn.Module], prompts: torch.Tensor, batch: int, new_tokens: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Median prefill and decode tokens/s of every model at one batch size.

    After a warm-up of each model, the repeats are interleaved (round r times every model once), so that a burst of
    load from other processes hits all models alike instead of one model's whole block.
    """
    ids = prompts[:batch]
    for model in models.values():
        prefill(model, ids)
        greedy_decode(model, ids, min(4, new_tokens))
    pre: dict[str, list[float]] = {name: [] for name in models}
    dec: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t = time.perf_counter()
            prefill(model, ids)
            pre[name].append(time.perf_counter() - t)
            dec[name].append(greedy_decode(model, ids, new_tokens)[0])
    out = {}
    for name in models:
        pre_s, dec_s = statistics.median(pre[name]), statistics.median(dec[name])
        out[name] = {
            "batch": batch,
            "prefill_s": [round(v, 4) for v in pre[name]],
            "prefill_tokens_per_s": round(batch * ids.shape[1] / pre_s, 1),
            "decode_s": [round(v, 4) for v in dec[name]],
            "decode_tokens_per_s": round(batch * new_tokens / dec_s, 2),
            "decode_ms_per_step": round(1000 * dec_s / new_tokens, 2),
        }
    return out


def widths_for(sp: float, sb: float, lr: list[float], dims: ArchDims) -> list[int]:
    """Constant SliceGPT widths when ``sb == sp``, else the paper's LR allocation (width budget)."""
    if sb == sp:
        return [constant_width(dims.hidden, sp, ROUND_INTERVAL)] * dims.layers
    return list(allocate(lr, sp, sb, dims.hidden, round_interval=ROUND_INTERVAL, dims=dims).widths)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cal-nsamples", type=int, default=16)
    p.add_argument("--cal-seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for name in ("prompt_len", "new_tokens", "repeats", "cal_nsamples", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: {getattr(args, name)} is outside {name} >= 1")
    if args.cal_seqlen < 2:
        raise ValueError(f"cal_seqlen: {args.cal_seqlen} is outside cal_seqlen >= 2")
    if any(b < 1 for b in args.batch_sizes):
        raise ValueError(f"batch_sizes: {args.batch_sizes} must all be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    started, load_start, t_start = datetime.now(timezone.utc), load_average(), time.perf_counter()

    dense, tokenizer = load(MODEL)
    dims = ArchDims.from_config(dense.config)
    calibration = calibration_batch(DATASET, tokenizer, args.cal_nsamples, args.cal_seqlen, seed=args.seed)
    prompts = eval_chunks(DATASET, tokenizer, args.prompt_len, split="test", max_chunks=max(args.batch_sizes))
    if prompts.shape[0] < max(args.batch_sizes):
        raise ValueError(
            f"batch_sizes: the {DATASET} test split has only {prompts.shape[0]} prompts of {args.prompt_len} tokens"
        )
    lr = layer_redundancy(dense, calibration, progress=False).normalized

    records: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    for name, sp, sb in CONFIGS:
        record: dict[str, Any] = {"sp": sp, "sb": sb}
        if sp is None:
            model = dense
            record["params"] = {"total": count_parameters(dense), "weights": count_parameters(dense), "shortcuts": 0}
        else:
            widths = widths_for(sp, sb, lr, dims)
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            slice_model(model, calibration, widths, progress=False)
            record["slicing_s"] = round(time.perf_counter() - t, 2)
            count = sliced_params(dims, widths)
            if count_parameters(model) != count.total:
                raise RuntimeError(
                    f"{name}: model has {count_parameters(model)} parameters, sliced_params says {count.total}"
                )
            record.update(widths=widths, mean_width=round(sum(widths) / len(widths), 1), params=count.to_json())
        record["params"]["fraction_of_dense"] = round(record["params"]["total"] / dense_params(dims), 4)
        _, fed, last = greedy_decode(model, prompts[:1], args.new_tokens)
        record["kv_cache_rel_error"] = cache_consistency(model, prompts[:1], fed, last)
        records[name], models[name] = record, model
        print(f"{name}: {record['params']['total']} parameters", flush=True)

    for record in records.values():
        record["speed"] = []
    for batch in args.batch_sizes:
        for name, speed in measure(models, prompts, batch, args.new_tokens, args.repeats).items():
            records[name]["speed"].append(speed)
            print(
                f"{name} batch {batch}: prefill {speed['prefill_tokens_per_s']} tok/s, "
                f"decode {speed['decode_tokens_per_s']} tok/s",
                flush=True,
            )
    del models
    gc.collect()

    base = {s["batch"]: s for s in records["dense"]["speed"]}
    for record in records.values():
        for s in record["speed"]:
            s["prefill_speedup"] = round(s["prefill_tokens_per_s"] / base[s["batch"]]["prefill_tokens_per_s"], 3)
            s["decode_speedup"] = round(s["decode_tokens_per_s"] / base[s["batch"]]["decode_tokens_per_s"], 3)
    result = {
        "benchmark": "inference_cpu",
        "model": MODEL,
        "dtype": "fp32",
        "dataset": DATASET,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batch_sizes": args.batch_sizes,
        "calibration": {"nsamples": args.cal_nsamples, "seqlen": args.cal_seqlen},
        "seed": args.seed,
        "round_interval": ROUND_INTERVAL,
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()},
        "dense_params": dense_params(dims),
        "models": records,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['total_s']} s)")
    return result


if __name__ == "__main__":
    main()
