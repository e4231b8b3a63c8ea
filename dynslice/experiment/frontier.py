"""The compression frontier (notebook 07): every method at matched sizes, before and after recovery fine-tuning.

At each size (``k`` whole decoder layers' worth of parameters, the coarsest method's step) and calibration seed:

- ``constant``: SliceGPT, every layer at the width whose parameter count is closest to the target;
- ``lr``: the paper's LR-dynamic widths at the same SP under the ``params`` budget (so the same size), with the
  best SB of a search on held-out calibration chunks (:func:`dynslice.experiment.pipeline.choose_sb`, on the
  first seed; the other seeds reuse its SB);
- ``shortgpt``: delete the ``k`` layers of lowest Block Influence (:mod:`dynslice.core.shortgpt`);
- ``delete_slice``: delete the ``ceil(delete_share·k)`` layers of highest LR, then slice the rest at the constant
  width whose count is closest to the target.

Every slicing goes through the run's own steps (:func:`dynslice.experiment.widths.allocation`,
:meth:`~dynslice.experiment.pipeline.Workbench.sliced` / :func:`~dynslice.experiment.pipeline.slice_dense`,
:func:`~dynslice.experiment.pipeline.evaluate_model`); each model is evaluated, fine-tuned
(:func:`dynslice.experiment.finetune.finetune`, LoRA merged into the weights) and evaluated again. Each point is
written to ``<out>/points/`` as soon as it is done, so an interrupted run resumes there; the same model met twice
(ShortGPT deleting the same layers for two seeds, or a best SB equal to SP) is computed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import resource
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from dynslice.core.adapters import count_parameters
from dynslice.core.allocate import Allocation
from dynslice.core.params import ArchDims, dense_params, sliced_params
from dynslice.core.shortgpt import delete_layers, deletion_order, params_after_deletion
from dynslice.experiment import numerics, pipeline
from dynslice.experiment.config import RunConfig
from dynslice.experiment.finetune import FinetuneConfig, discard_checkpoints, finetune
from dynslice.experiment.profiles.frontier import METHODS, RECORD_VERSION, FrontierConfig
from dynslice.experiment.widths import allocation
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.records import lr_input


# ------------------------------------------------------------------------------------------------ matched sizes
def target_params(dims: ArchDims, size: int) -> int:
    """The target of a size: the dense count with ``size`` whole decoder layers deleted."""
    return params_after_deletion(dims, size)


def sp_for_target(cfg: RunConfig, dims: ArchDims, target: int) -> tuple[float, Allocation]:
    """The constant-slicing SP (and its allocation, through :func:`allocation`) whose total parameter count is
    closest to ``target`` (ties: the smaller model). The SP of width ``w`` is ``1 - (w + 1/2)/D``, which SliceGPT's
    ``int((1-SP)·D)`` maps back to ``w`` exactly."""
    best: tuple[tuple[int, int], float, Allocation] | None = None
    for w in range(cfg.round_interval, dims.hidden, cfg.round_interval):
        sp = round(1 - (w + 0.5) / dims.hidden, 9)
        alloc = allocation(cfg.replace(sp=sp, sb=sp), dims)
        total = sliced_params(dims, alloc.widths).total
        rank = (abs(total - target), total)
        if best is None or rank < best[0]:
            best = (rank, sp, alloc)
    if best is None:
        raise ValueError(f"round_interval: {cfg.round_interval} leaves no width below the hidden size {dims.hidden}")
    return best[1], best[2]


def most_redundant(lr: dict[str, Any], n: int) -> list[int]:
    """The ``n`` layers of highest redundancy (LR: the cosine between a layer's input and output), sorted."""
    red = np.asarray(lr_input(lr).redundancy, dtype=np.float64)
    return sorted(int(i) for i in np.argsort(-red, kind="stable")[:n])


def shortened(dims: ArchDims, deleted: Sequence[int]) -> ArchDims:
    return dataclasses.replace(dims, layers=dims.layers - len(deleted))


def lr_allocation(run: RunConfig, dims: ArchDims, lr: dict[str, Any], sb: float) -> Allocation:
    """LR-dynamic widths at ``run.sp`` under the params budget with slicing base ``sb``, or the lowest feasible SB of
    ``sb, sb + step, ...`` (another seed's LR may not reach the budget at the SB the first seed chose)."""
    step = run.auto_sb_step
    grid = [min(round(sb + k * step, 10), run.sp) for k in range(math.ceil((run.sp - sb) / step) + 1)]
    for b in grid:
        try:
            return allocation(run.replace(sb=b), dims, lr, sb=b)
        except ValueError:
            if b >= run.sp:
                raise
    return allocation(run, dims, lr, sb=run.sp)


# ----------------------------------------------------------------------------------------------------- a point
@dataclasses.dataclass(frozen=True)
class Plan:
    """What one frontier point builds: the layers deleted, then (unless ``widths`` is ``None``) the slicing."""

    method: str
    size: int
    seed: int
    target: int
    deleted: tuple[int, ...] = ()
    widths: tuple[int, ...] | None = None
    sp: float | None = None
    sb: float | None = None
    expected_params: int = 0

    @property
    def identity(self) -> str:
        """Two plans with one identity build the same model (same calibration windows, deletions, widths)."""
        seed = None if self.widths is None else self.seed
        return json.dumps([seed, list(self.deleted), None if self.widths is None else list(self.widths)])


def plan_point(
    cfg: FrontierConfig, bench: pipeline.Workbench, method: str, size: int, seed: int, sb: float | None = None
) -> Plan:
    """The model of ``method`` at ``size`` for calibration seed ``seed`` (``sb``: LR-dynamic slicing's SB)."""
    dims = bench.dims()
    target = target_params(dims, size)
    run = cfg.run_config(seed)
    if method == "shortgpt":
        bi = bench.lr(run.replace(lr_metric="bi"))["lr"]
        drop = tuple(sorted(deletion_order(bi)[:size]))
        return Plan(method, size, seed, target, drop, expected_params=params_after_deletion(dims, size))
    drop = tuple(most_redundant(bench.lr(run), cfg.delete_count(size))) if method == "delete_slice" else ()
    sliced_dims = shortened(dims, drop)
    sp, alloc = sp_for_target(run, sliced_dims, target)
    if method == "lr":
        alloc = lr_allocation(run.replace(sp=sp, sb=sp), dims, bench.lr(run), sp if sb is None else min(sb, sp))
    elif method not in ("constant", "delete_slice"):
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return Plan(
        method,
        size,
        seed,
        target,
        drop,
        tuple(alloc.widths),
        sp,
        alloc.sb,
        sliced_params(sliced_dims, alloc.widths).total,
    )


def build(cfg: FrontierConfig, bench: pipeline.Workbench, plan: Plan) -> nn.Module:
    """The model of ``plan``: a fresh copy of the dense model with its layers deleted, then sliced through the
    pipeline (:meth:`~dynslice.experiment.pipeline.Workbench.sliced` when nothing is deleted)."""
    run = cfg.run_config(plan.seed, plan.sp or 0.3, plan.sb)
    if plan.widths is not None and not plan.deleted:
        model = bench.sliced(run, list(plan.widths))
    else:
        model = delete_layers(bench.load(), plan.deleted)  # a fresh dense copy from the checkpoint
        if plan.widths is not None:
            model = pipeline.slice_dense(model, run, bench.calibration(run), plan.widths, progress=False)
    actual = count_parameters(model)
    if actual != plan.expected_params:
        raise RuntimeError(
            f"parameter accounting: {plan.method} expects {plan.expected_params}, the model has {actual}"
        )
    return model


def evaluate(cfg: FrontierConfig, bench: pipeline.Workbench, model: nn.Module, with_tasks: bool) -> dict[str, Any]:
    """Perplexity on every corpus (and with ``with_tasks`` the zero-shot tasks), through the run's evaluation step."""
    run = cfg.run_config(0)
    if with_tasks and cfg.tasks:
        run = run.replace(tasks=cfg.tasks, task_limit=cfg.task_limit)
    ppl, tasks = pipeline.evaluate_model(model, bench.tokenizer, run)
    return {"ppl": ppl, **({"tasks": tasks} if tasks else {})}


def quiet_finetune(model: nn.Module, tokenizer, rft: FinetuneConfig, **kw: Any) -> dict[str, Any]:
    """:func:`finetune` without its progress bar, and without the deprecation notice transformers' Trainer raises
    about its own ``is_gradient_checkpointing`` on every call (dozens of identical lines in notebook 07)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return finetune(model, tokenizer, rft, progress=False, **kw)


def compute_point(
    cfg: FrontierConfig,
    rft: FinetuneConfig,
    bench: pipeline.Workbench,
    plan: Plan,
    with_tasks: bool,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Build, evaluate, fine-tune and evaluate again one point; returns its record (without its name)."""
    t0, c0 = time.perf_counter(), _cpu_s()
    model = build(cfg, bench, plan)
    t_build = time.perf_counter() - t0
    before = evaluate(cfg, bench, model, False)
    t_eval = time.perf_counter() - t0 - t_build
    key = {"identity": plan.identity, "parameters": plan.expected_params}
    tuned = quiet_finetune(model, bench.tokenizer, rft, checkpoint_dir=checkpoint_dir, model_key=key)
    t_rft = time.perf_counter() - t0 - t_build - t_eval
    after = evaluate(cfg, bench, model, with_tasks)
    del model
    return {
        "before": before,
        "after": after,
        "rft": {k: tuned[k] for k in ("final_loss", "trainable_parameters", "resumed_from_step")}
        | {"loss_first": next((h["loss"] for h in tuned["history"] if "loss" in h), None)},
        "timings_s": {
            "build": round(t_build, 2),
            "eval": round(t_eval, 2),
            "rft": round(t_rft, 2),
            "eval_after": round(time.perf_counter() - t0 - t_build - t_eval - t_rft, 2),
            "cpu": round(_cpu_s() - c0, 2),  # CPU seconds of the whole point (every thread)
        },
    }


# ----------------------------------------------------------------------------------------------------- the run
def stamp(cfg: FrontierConfig, rft: FinetuneConfig) -> str:
    """A short hash of everything a point depends on: a point file with another stamp is recomputed."""
    text = json.dumps({"frontier": cfg.to_json(), "rft": rft.to_json(), "v": RECORD_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _done(path: Path, mark: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = read_json(path)
    except ValueError:
        return None
    return obj if obj.get("stamp") == mark else None


def run(
    cfg: FrontierConfig,
    rft: FinetuneConfig,
    out: str | Path | None = None,
    *,
    force: bool = False,
    bench: pipeline.Workbench | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole frontier and return its record; with ``out`` (``<results>/frontier.json``), write it atomically.

    Every finished point is written to ``<out folder>/frontier/points/`` (and the SB search of each size beside it),
    so that a stopped run resumes point by point; a record at ``out`` with the same settings is returned as it is
    unless ``force``. ``bench`` may hold the dense model already (a :class:`~dynslice.experiment.pipeline.Workbench`
    of ``cfg.model``).
    """
    mark = stamp(cfg, rft)
    if out is not None and not force and (existing := _done(Path(out), mark)) is not None:
        return existing
    t_start, cpu_start = time.perf_counter(), _cpu_s()
    folder = None if out is None else Path(out).parent / "frontier"
    bench = bench or pipeline.Workbench(cfg.model, cfg.dtype, cfg.device)
    dims = bench.dims()

    def cached(name: str, compute) -> dict[str, Any]:
        path = None if folder is None else folder / "points" / f"{name}.json"
        if path is not None and not force and (hit := _done(path, mark)) is not None:
            return hit
        obj = {"stamp": mark, **compute()}
        if path is not None:
            write_json(path, obj)
        return obj

    def dense_point() -> dict[str, Any]:
        model = bench.load()
        return {"params": count_parameters(model), **evaluate(cfg, bench, model, True)}

    dense = cached("dense", dense_point)
    sb_search: dict[int, dict[str, Any]] = {}
    if "lr" in cfg.methods:
        first = cfg.run_config(cfg.seeds[0])
        for size in cfg.sizes:
            sp, _ = sp_for_target(first, dims, target_params(dims, size))
            run_cfg = first.replace(sp=sp, sb=sp)
            sb_search[size] = cached(f"sb-k{size:02d}", lambda r=run_cfg: pipeline.choose_sb(bench, r, bench.lr(r)))

    jobs = [(size, method, seed) for size in cfg.sizes for method in cfg.methods for seed in cfg.seeds]
    points: list[dict[str, Any]] = []
    by_identity: dict[tuple[str, str], dict[str, Any]] = {}
    for size, method, seed in tqdm(jobs, desc="frontier points", disable=not progress):
        plan = plan_point(cfg, bench, method, size, seed, sb_search.get(size, {}).get("best_sb"))
        with_tasks = seed == cfg.seeds[0] and cfg.task_points == "all"
        name = f"{method}-k{size:02d}-seed{seed}"
        ident = (plan.identity, str(with_tasks))
        same = by_identity.get(ident)
        ckpt = None if folder is None else folder / "rft-checkpoints" / name

        def compute(plan=plan, same=same, with_tasks=with_tasks, ckpt=ckpt) -> dict[str, Any]:
            body = same or compute_point(cfg, rft, bench, plan, with_tasks, ckpt)
            return {k: body[k] for k in ("before", "after", "rft", "timings_s")} | (
                {"same_model_as": same["name"]} if same else {}
            )

        row = cached(name, compute)
        if ckpt is not None and ckpt.is_dir():
            discard_checkpoints(ckpt)  # the point is written: its fine-tuning checkpoints are not needed any more
        row = {
            "name": name,
            "method": method,
            "size": size,
            "seed": seed,
            "target_params": plan.target,
            "params": plan.expected_params,
            "fraction_removed": 1 - plan.expected_params / dense_params(dims),
            "deleted_layers": list(plan.deleted),
            "widths": None if plan.widths is None else list(plan.widths),
            "sp": plan.sp,
            "sb": plan.sb,
            **{k: v for k, v in row.items() if k != "stamp"},
        }
        by_identity.setdefault(ident, row)
        points.append(row)

    if cfg.tasks and cfg.task_points == "winners":
        for size in cfg.sizes:
            win = winner(points, size, cfg.ppl_datasets[0])
            row = next(p for p in points if p["name"] == f"{win}-k{size:02d}-seed{cfg.seeds[0]}")
            plan = plan_point(cfg, bench, win, size, cfg.seeds[0], sb_search.get(size, {}).get("best_sb"))

            ckpt = None if folder is None else folder / "rft-checkpoints" / f"tasks-{row['name']}"

            def tasks_of(plan=plan, ckpt=ckpt) -> dict[str, Any]:
                model = build(cfg, bench, plan)  # the same model, fine-tuned the same way, again
                key = {"identity": plan.identity, "parameters": plan.expected_params}
                quiet_finetune(model, bench.tokenizer, rft, checkpoint_dir=ckpt, model_key=key)
                return evaluate(cfg, bench, model, True)

            row["after"] = {**row["after"], "tasks": cached(f"tasks-{row['name']}", tasks_of)["tasks"]}
            if ckpt is not None and ckpt.is_dir():
                discard_checkpoints(ckpt)

    record = {
        "record_version": RECORD_VERSION,
        "stamp": mark,
        "config": cfg.to_json(),
        "rft": rft.to_json(),
        "model": cfg.model,
        "dims": dims.to_json(),
        "dense_params": dense_params(dims),
        "dense": {k: v for k, v in dense.items() if k != "stamp"},
        "sb_search": {str(k): {kk: vv for kk, vv in v.items() if kk != "stamp"} for k, v in sb_search.items()},
        "points": points,
    }
    record["summary"] = summarize(record)
    record["time_s"] = round(time.perf_counter() - t_start, 1)
    record["cpu_s"] = round(_cpu_s() - cpu_start, 1)
    record["versions"], record["numerics"] = numerics.versions(), numerics.describe(cfg.device)
    if out is not None:
        write_json(out, record)
    return record


# ------------------------------------------------------------------------------------------------ summaries
def _mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def summarize(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method and size: the mean parameter count and fraction removed, and per stage (``before``/``after``
    RFT) and corpus the perplexity's mean and sd over the calibration seeds."""
    out = []
    cfg = record["config"]
    for size in cfg["sizes"]:
        for method in cfg["methods"]:
            rows = [p for p in record["points"] if p["size"] == size and p["method"] == method]
            if not rows:
                continue
            out.append(
                {
                    "method": method,
                    "size": size,
                    "n": len(rows),
                    "params": float(np.mean([p["params"] for p in rows])),
                    "fraction_removed": float(np.mean([p["fraction_removed"] for p in rows])),
                    "target_fraction": 1 - rows[0]["target_params"] / record["dense_params"],
                    "ppl": {
                        stage: {d: _mean_sd([p[stage]["ppl"][d] for p in rows]) for d in cfg["ppl_datasets"]}
                        for stage in ("before", "after")
                    },
                }
            )
    return out


def winner(points: Sequence[dict[str, Any]], size: int, dataset: str, stage: str = "after") -> str:
    """The method of lowest mean ``stage`` perplexity on ``dataset`` at ``size``."""
    means: dict[str, list[float]] = {}
    for p in points:
        if p["size"] == size:
            means.setdefault(p["method"], []).append(p[stage]["ppl"][dataset])
    return min(means, key=lambda m: (float(np.mean(means[m])), METHODS.index(m)))
