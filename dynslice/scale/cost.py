"""Predicted cost of a run and of a profile, before anything runs: FLOPs from the model's per-layer shapes, seconds
from a measured throughput.

A run's work is counted in token passes through the model: the slicing passes its calibration tokens through every
layer (times the engine's measured ratio to one plain forward pass, which covers the PCA and the rotation), the
perplexity pass runs the evaluation tokens through the sliced model, the zero-shot tasks score their requests, and
an automatic-SB run slices once per SB it tries. The FLOPs of one token through one layer are ``2 x`` the layer's
weights plus the attention over the sequence; the LM head adds ``2 x vocab x hidden``.

Seconds = FLOPs / throughput. The CPU throughput is measured (``bench/results/slicing_cpu.json``: tokens/s of
SmolLM2's forward pass on this project's CPUs; the package carries a copy, ``dynslice/measured/``, so that an
installed package plans without the repository). No GPU figure has been measured yet, so GPU hours are a
**CPU-scaled estimate**: the same FLOP counts and the CPU's measured phase ratios, divided by an assumed effective
GPU throughput (``gpu_tflops``; default 125 TFLOP/s, about 40 % of an A100's fp16 peak). Every figure says which.
Zero-shot request sizes are approximations of the lm-eval tasks (documents x choices x tokens), not measurements.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from dynslice.experiment.config import RunConfig
from dynslice.experiment.profiles import Profile, dynamic_sbs, load_profile, run_name, sweep_configs
from dynslice.store.memory import Shapes

#: The measured CPU throughput: a copy of ``bench/results/slicing_cpu.json`` in the package (``dynslice.measured``).
BENCH = "slicing_cpu.json"
DEFAULT_GPU_TFLOPS = 125.0
#: Shapes of the paper's models, so that a plan needs neither the hub nor a download (config.json values).
KNOWN_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": Shapes(
        vocab=128256,
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=14336,
        tied=False,
        qkv_bias=False,
    ),
    "mistralai/Mistral-7B-v0.1": Shapes(
        vocab=32000,
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=14336,
        tied=False,
        qkv_bias=False,
    ),
    "smollm2-135m": Shapes(
        vocab=49152,
        hidden=576,
        layers=30,
        heads=9,
        kv_heads=3,
        head_dim=64,
        intermediate=1536,
        tied=True,
        qkv_bias=False,
    ),
}
#: Approximate loglikelihood tokens per document of each zero-shot task (choices x context+continuation tokens;
#: lm-eval scores a shared context once when the continuations are one token, as in MMLU) and the document count.
TASK_TOKENS: dict[str, tuple[int, int]] = {
    "piqa": (1838, 2 * 70),
    "winogrande": (1267, 2 * 35),
    "hellaswag": (10042, 4 * 110),
    "arc_easy": (2376, 4 * 55),
    "arc_challenge": (1172, 4 * 60),
    "mmlu": (14042, 160),
    "dynslice_cloze": (200, 4 * 40),
    "dynslice_continuation": (200, 4 * 120),
}
DEFAULT_TASK = (1000, 4 * 100)
#: Approximate corpus sizes in tokens, for "every window" LR sampling (PG-19 validation: 50 books, ~3M words).
CORPUS_TOKENS = {"pg19": 4_000_000}
SLICING_RATIO = 1.6  # slicing / one plain forward pass of the calibration set (slicing_cpu.json, ~1.55-1.66)


@dataclass(frozen=True)
class Throughput:
    """FLOP/s used to turn FLOPs into seconds, and where the figure comes from."""

    flops_per_s: float
    device: str  # "gpu" or "cpu"
    source: str  # "measured: ..." or "CPU-scaled estimate: ..."
    slicing_ratio: float = SLICING_RATIO


def shapes_of(spec: str) -> Shapes:
    """The shapes of ``spec``: known ones from a table, others from their config (tiny-random, folders, the hub)."""
    if spec in KNOWN_SHAPES:
        return KNOWN_SHAPES[spec]
    return _config_shapes(spec)


@lru_cache(maxsize=16)
def _config_shapes(spec: str) -> Shapes:
    from transformers import AutoConfig

    from dynslice.store.models import resolve_spec, tiny_random_model

    r = resolve_spec(spec)
    if r.kind == "tiny":
        return Shapes.from_config(tiny_random_model().config)
    if r.kind == "sliced":
        raise ValueError(f"model: {spec} is already sliced; a profile's models are dense")
    kw = {"gguf_file": r.gguf_file} if r.gguf_file else {}
    return Shapes.from_config(AutoConfig.from_pretrained(r.location, **kw))


def token_flops(s: Shapes, seqlen: int, keep: float = 1.0, head: bool = True) -> float:
    """FLOPs of one token through the model at context ``seqlen``; ``keep``: the fraction of the width kept."""
    attn = 2 * 2 * (seqlen / 2) * s.heads * s.head_dim  # scores and weighted sum, causal (half the context)
    layers = s.layers * (2 * s.layer_params() * keep + attn)
    return layers + (2 * s.vocab * s.hidden * keep if head else 0.0)


def _forward(s: Shapes, tokens: float, seqlen: int, keep: float = 1.0) -> float:
    return tokens * token_flops(s, seqlen, keep)


def _task_tokens(tasks: Sequence[str], limit: int | None) -> float:
    total = 0.0
    for t in tasks:
        docs, per_doc = TASK_TOKENS.get(t, DEFAULT_TASK)
        total += min(docs, limit or docs) * per_doc
    return total


def _ppl_tokens(cfg: RunConfig) -> float:
    n = cfg.ppl_nsamples or cfg.ppl_max_chunks or 128  # an unbounded test split: about 128 chunks (WikiText-2)
    return float(len(cfg.ppl_datasets) * n * cfg.ppl_seqlen)


def auto_sb_evals(cfg: RunConfig) -> int:
    """Slicings an automatic-SB search makes: ``auto_sb_max_evals``, else a Fibonacci search over the SB grid."""
    if cfg.auto_sb_max_evals is not None:
        return cfg.auto_sb_max_evals
    points = round(cfg.sp / cfg.auto_sb_step) + 1
    return max(2, math.ceil(math.log(max(points, 2)) / math.log((1 + 5**0.5) / 2)) + 1)


def run_flops(cfg: RunConfig, shapes: Shapes | None = None, ratio: float = SLICING_RATIO) -> dict[str, float]:
    """Predicted FLOPs of one run by phase (``slice``, ``ppl``, ``zero_shot``, ``auto_sb``)."""
    s = shapes or shapes_of(cfg.model)
    keep = 1.0 - cfg.sp
    out = {"slice": 0.0, "ppl": 0.0, "zero_shot": 0.0, "auto_sb": 0.0}
    slicing = 0.0 if cfg.dense else ratio * _forward(s, cfg.cal_nsamples * cfg.cal_seqlen, cfg.cal_seqlen)
    out["slice"] = slicing
    out["ppl"] = _forward(s, _ppl_tokens(cfg), cfg.ppl_seqlen, keep)
    out["zero_shot"] = _forward(s, _task_tokens(cfg.tasks, cfg.task_limit), 256, keep)
    if cfg.auto_sb:
        score = _forward(s, cfg.auto_sb_nsamples * cfg.cal_seqlen, cfg.cal_seqlen, keep)
        out["auto_sb"] = auto_sb_evals(cfg) * (slicing + score)
    return out


def lr_flops(cfg: RunConfig, shapes: Shapes | None = None) -> float:
    """FLOPs of the LR score a process computes once per model (cached in its workbench, not per run)."""
    s = shapes or shapes_of(cfg.model)
    if cfg.lr_sampler == "sliding" and cfg.lr_nsamples is None:
        tokens = CORPUS_TOKENS.get(cfg.lr_dataset, 1_000_000) * cfg.lr_seqlen / cfg.lr_stride
    else:
        tokens = (cfg.lr_nsamples or 1) * cfg.lr_seqlen
    return tokens * token_flops(s, cfg.lr_seqlen, head=False)


@lru_cache(maxsize=4)
def _cpu_bench(path: str | None) -> tuple[float, float]:
    """FLOP/s and slicing ratio of a CPU benchmark file (``None``: the copy shipped in the package)."""
    if path is None:
        text = resources.files("dynslice.measured").joinpath(BENCH).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    b = json.loads(text)
    s = KNOWN_SHAPES[b["model"]]
    floor = b["floor"]
    flops = floor["tokens_per_s"] * token_flops(s, b["seqlen"], head=False)
    ratios = [r["ratio_to_floor"] for r in b.get("runs", {}).values() if "ratio_to_floor" in r]
    return flops, (sum(ratios) / len(ratios) if ratios else SLICING_RATIO)


def throughput(device: str, gpu_tflops: float | None = None, bench: str | Path | None = None) -> Throughput:
    """The throughput for ``device`` (``cpu`` or ``cuda``): measured on the CPU, CPU-scaled on a GPU."""
    cpu_flops, ratio = _cpu_bench(None if bench is None else str(bench))
    source = Path(bench).name if bench is not None else BENCH
    if device.startswith("cpu"):
        return Throughput(cpu_flops, "cpu", f"measured: {cpu_flops / 1e9:.0f} GFLOP/s ({source})", ratio)
    tf = DEFAULT_GPU_TFLOPS if gpu_tflops is None else gpu_tflops
    if not tf > 0:
        raise ValueError(f"gpu_tflops: {tf} is outside gpu_tflops > 0")
    return Throughput(
        tf * 1e12,
        "gpu",
        (
            f"CPU-scaled estimate: phase ratios measured on CPU ({source}), "
            f"assumed {tf:.0f} TFLOP/s effective on the GPU"
        ),
        ratio,
    )


def run_seconds(cfg: RunConfig, tp: Throughput, shapes: Shapes | None = None) -> float:
    """Predicted seconds of one run (the LR and the model load are per process, see :func:`lr_flops`)."""
    return sum(run_flops(cfg, shapes, tp.slicing_ratio).values()) / tp.flops_per_s


def run_cost(cfg: RunConfig) -> float:
    """A relative cost for balancing shards (FLOPs; the same on every machine)."""
    return sum(run_flops(cfg).values())


# ------------------------------------------------------------------------------------------------ profile plans
def kind_of(cfg: RunConfig) -> str:
    """``dense``, ``constant``, ``dynamic`` or ``auto`` (``+zs`` for a best-SB zero-shot run)."""
    if cfg.dense:
        return "dense"
    if cfg.auto_sb:
        return "auto"
    if math.isclose(cfg.sb, cfg.sp):
        return "constant"
    return "dynamic+zs" if cfg.tasks else "dynamic"


def predicted_zero_shot(profile: Profile) -> list[RunConfig]:
    """The zero-shot runs the profile will have: one per dynamic SB with ``zero_shot.every_sb``, else the best SB's
    (not known before the sweep: SP/2 stands in)."""
    if not profile.tasks:
        return []
    return [
        profile.base_config(
            m, sp=sp, sb=sb, budget=b, cal_dataset=cal, tasks=profile.tasks, task_limit=profile.task_limit
        )
        for m in profile.models
        for cal in profile.cal_datasets
        for sp in profile.sp
        for b in profile.zero_shot_budgets
        if b in profile.budgets
        for sb in (dynamic_sbs(sp, profile.sb_step) if profile.zero_shot_every_sb else [round(sp / 2, 4)])
    ]


def balance(costs: Sequence[float], keys: Sequence[Any], n: int) -> list[int]:
    """The part (of ``n``) of each item: greedy longest-processing-time on ``costs``, ties broken by ``keys``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shards: {n!r} is outside shards >= 1")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], keys[i], i))
    load = [0.0] * n
    out = [0] * len(costs)
    for i in order:
        k = min(range(n), key=lambda j: (load[j], j))
        out[i] = k
        load[k] += costs[i]
    return out


def _wall_hours(configs: Sequence[RunConfig], shards: int, tp_of, lr_h: Mapping[str, float]) -> float:
    """Wall-clock hours of ``configs`` in ``shards`` shards: the slowest shard, with one LR per model it runs."""
    if not configs:
        return 0.0
    sec = {c.key(): run_seconds(c, tp_of(c)) for c in configs}
    where = balance([run_cost(c) for c in configs], [c.key() for c in configs], shards)
    worst = 0.0
    for k in range(shards):
        mine = [c for c, s in zip(configs, where) if s == k]
        h = sum(sec[c.key()] for c in mine) / 3600 + sum(lr_h[m] for m in {c.model for c in mine})
        worst = max(worst, h)
    return worst


def run_memory(cfg: RunConfig, host_gib: float | None = None, gpu_gib: float | None = None) -> dict[str, Any]:
    """The predicted peaks of the largest run of ``cfg``'s model in a sweep (:func:`dynslice.store.memory.plan_run`:
    LR, slicing as the memory plan places it, evaluation), for ``host_gib`` of RAM and ``gpu_gib`` of GPU memory
    (default: what this machine has free now). A sweep holds one model at a time: this is the sweep's peak."""
    from dynslice.store.memory import GIB, available_gpu_bytes, plan, plan_run

    for name, v in (("host-gib", host_gib), ("gpu-gib", gpu_gib)):
        if v is not None and not v > 0:
            raise ValueError(f"{name}: {v} is outside {name} > 0")
    shapes = shapes_of(cfg.model)
    streamable = cfg.model not in ("smollm2-135m", "tiny-random") and not cfg.model.endswith(".gguf")
    slicing = plan(
        shapes,
        cfg.cal_nsamples,
        cfg.cal_seqlen,
        cfg.dtype,
        device=cfg.device,
        batch_size=cfg.batch_size,
        sp=cfg.sp,
        streamable=streamable,
        host_bytes=None if host_gib is None else int(host_gib * GIB),
        gpu_bytes=None if gpu_gib is None else int(gpu_gib * GIB),
    )
    lr_seqlen = cfg.lr_seqlen
    gpu_bytes = 0
    if cfg.device != "cpu":
        gpu_bytes = available_gpu_bytes(cfg.device) if gpu_gib is None else int(gpu_gib * GIB)
    rp = plan_run(
        shapes,
        slicing,
        lr_batch_tokens=min(cfg.batch_size, cfg.lr_nsamples or cfg.batch_size) * lr_seqlen,
        eval_batch_tokens=cfg.batch_size * cfg.ppl_seqlen,
        eval_seqlen=cfg.ppl_seqlen,
        gpu_bytes=gpu_bytes or None,
        host_bytes=None if host_gib is None else int(host_gib * GIB),
    )
    note = " (no GPU here: give --gpu-gib for the GPU's size)" if cfg.device != "cpu" and not gpu_bytes else ""
    return {**rp.to_json(), "describe": rp.describe() + note, "host_gib": host_gib, "gpu_gib": gpu_gib}


def profile_plan(
    name: str,
    shards: int = 1,
    gpu_tflops: float | None = None,
    host_gib: float | None = None,
    gpu_gib: float | None = None,
) -> dict[str, Any]:
    """The runs of a profile and their predicted hours (per model, in all, in ``shards`` shards), the peak memory of
    its sweep per model (:func:`run_memory`, for ``host_gib``/``gpu_gib``), and what the automatic SB search saves
    against the full fixed-SB grid. JSON-ready."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: {shards!r} is outside shards >= 1")
    profile = load_profile(name)
    sweep = sweep_configs(profile)
    zs = predicted_zero_shot(profile)
    tps = {m.spec: throughput(m.device, gpu_tflops) for m in profile.models}

    def tp_of(c: RunConfig) -> Throughput:
        return tps[c.model]

    lr_h = {
        m.spec: lr_flops(next(c for c in sweep if c.model == m.spec)) / tps[m.spec].flops_per_s / 3600
        for m in profile.models
    }
    models = []
    for m in profile.models:
        mine = [c for c in sweep + zs if c.model == m.spec]
        kinds: dict[str, int] = {}
        for c in mine:
            kinds[kind_of(c)] = kinds.get(kind_of(c), 0) + 1
        hours = sum(run_seconds(c, tps[m.spec]) for c in mine) / 3600 + lr_h[m.spec]
        sliced = [c for c in mine if not c.dense]
        largest = min(sliced, key=lambda c: c.sp) if sliced else mine[0]  # the least sliced: the largest model
        models.append(
            {
                "model": m.spec,
                "device": tps[m.spec].device,
                "runs": len(mine),
                "by_kind": kinds,
                "hours": hours,
                "lr_hours": lr_h[m.spec],
                "estimate": tps[m.spec].source,
                "memory": run_memory(largest, host_gib, gpu_gib),
            }
        )
    grid = [c for c in sweep if kind_of(c) == "dynamic" and c.budget in profile.auto_sb_budgets]
    autos = [c for c in sweep if c.auto_sb]
    grid_h = sum(run_seconds(c, tp_of(c)) for c in grid) / 3600
    auto_h = sum(run_seconds(c, tp_of(c)) for c in autos) / 3600
    wall = {str(n): _wall_hours(sweep, n, tp_of, lr_h) + _wall_hours(zs, n, tp_of, lr_h) for n in sorted({1, shards})}
    return {
        "profile": profile.name,
        "runs": len(sweep) + len(zs),
        "sweep_runs": len(sweep),
        "zero_shot_runs": len(zs),
        "device_hours": sum(m["hours"] for m in models),
        "models": models,
        "wall_hours": wall,
        "shards": shards,
        "auto_sb": {
            "auto_runs": len(autos),
            "auto_hours": auto_h,
            "grid_runs": len(grid),
            "grid_hours": grid_h,
            "saved_hours": grid_h - auto_h,
            "note": "auto-SB runs instead of the fixed-SB grid (same budgets); the zero-shot runs of the "
            "best SB are needed either way",
        },
        "run_list": [
            {"model": c.model, "run": run_name(c), "kind": kind_of(c), "minutes": run_seconds(c, tp_of(c)) / 60}
            for c in sweep + zs
        ],
    }


def describe(plan: Mapping[str, Any], list_runs: bool = False) -> str:
    """The plan as text for the terminal."""
    unit = "GPU" if any(m["device"] == "gpu" for m in plan["models"]) else "CPU"
    lines = [
        (
            f"profile {plan['profile']}: {plan['runs']} runs ({plan['sweep_runs']} sweep, "
            f"{plan['zero_shot_runs']} zero-shot, predicted)"
        )
    ]
    for m in plan["models"]:
        kinds = ", ".join(f"{v} {k}" for k, v in m["by_kind"].items())
        lines.append(
            f"  {m['model']}: {m['runs']} runs ({kinds}): {m['hours']:.1f} {unit}-hours "
            f"(LR {m['lr_hours']:.2f} h once per process)"
        )
        if "memory" in m:
            lines.append(f"    memory: {m['memory']['describe']}")
    lines.append(f"  total: {plan['device_hours']:.1f} {unit}-hours")
    for n, h in plan["wall_hours"].items():
        lines.append(f"  wall clock with {n} shard(s) (one {unit} each): {h:.1f} h")
    a = plan["auto_sb"]
    if a["auto_runs"]:
        pct = 100 * a["saved_hours"] / a["grid_hours"] if a["grid_hours"] else 0.0
        lines.append(
            f"  sb: auto: {a['auto_runs']} searches take {a['auto_hours']:.1f} h where the full grid of "
            f"{a['grid_runs']} fixed-SB runs takes {a['grid_hours']:.1f} h: saves {a['saved_hours']:.1f} h "
            f"({pct:.0f}%)"
        )
    sources = sorted({m["estimate"] for m in plan["models"]})
    lines += [f"  figures: {s}" for s in sources]
    lines.append("  zero-shot request sizes are approximations of the lm-eval tasks")
    if list_runs:
        lines += [f"    {r['model']}  {r['run']:<40} {r['kind']:<10} {r['minutes']:8.1f} min" for r in plan["run_list"]]
    return "\n".join(lines)
