"""Does Layer Redundancy matter? Baselines and ablations at equal parameters, with error bars (notebook 06).

Every method below goes through the same allocator (:func:`dynslice.core.allocate.allocate`) with the same slicing
base ``SB``, only the per-layer score vector changes:

- ``constant``: SliceGPT (``SB = SP``);
- ``lr``: the paper's LR (mean cosine of each layer's input and output), min-max normalised;
- ``first_layer``: layer 0 gets score 0 and every other layer 1, so layer 0 is sliced at ``SB`` and every other
  layer equally (does protecting the first layer alone carry the gain?);
- ``shuffled``: the LR vector randomly permuted (``permutations`` seeded permutations);
- ``inverted``: ``1 - n``, the most redundant layers kept widest (a sanity check that should lose);
- ``bi`` and ``angular``: ShortGPT's Block Influence and the angular distance, as redundancy (negated).
  Averaged per token, ``BI = 1 - cos`` is an affine function of LR, so its normalised vector *is* LR's;

each at the ``params`` budget (as many parameters as constant slicing) and at the paper's ``width`` budget (mean
slice fraction ``SP``). ``shortgpt`` deletes whole layers of lowest BI until the dense count is at or below the
constant-``SP`` count (:mod:`dynslice.core.shortgpt`).

Error bars: constant and ``lr`` are repeated over ``seeds`` calibration sets whose windows are disjoint by
construction (:func:`disjoint_calibration`); every run is evaluated on the same test chunks. The gap is tested
with a paired t-test across seeds and a paired bootstrap over evaluation chunks. Zero-shot accuracies carry
lm-eval's standard error.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynslice.core.adapters import count_parameters
from dynslice.core.allocate import Allocation
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, dense_params, sliced_params
from dynslice.core.shortgpt import delete_layers, layers_to_delete
from dynslice.experiment import numerics, pipeline
from dynslice.experiment.config import RunConfig
from dynslice.experiment.profiles.ablation import RECORD_VERSION, AblationConfig
from dynslice.experiment.statistics import gap_tests, summarize
from dynslice.experiment.widths import allocation
from dynslice.measure import data
from dynslice.measure.evaluate import zero_shot
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.records import LRInput


# --------------------------------------------------------------------------------------------------- data
def disjoint_calibration(
    name: str, tokenizer, nsamples: int, seqlen: int, n_sets: int, seed: int = 42
) -> list[dict[str, torch.Tensor]]:
    """``n_sets`` calibration batches of ``nsamples`` windows each, no token shared between any two windows.

    The train stream is cut into consecutive ``seqlen`` chunks, which one generator seeded with ``seed``
    permutes; set ``k`` takes chunks ``k·nsamples .. (k+1)·nsamples - 1`` of that permutation.
    """
    stream = data.token_stream(name, "train", tokenizer)
    n_chunks = stream.numel() // seqlen
    if n_chunks < n_sets * nsamples:
        raise ValueError(
            f"seeds: {n_sets} sets of {nsamples} windows of {seqlen} tokens need "
            f"{n_sets * nsamples} chunks; the {name} train split has {n_chunks}"
        )
    order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed))
    sets = []
    for k in range(n_sets):
        starts = order[k * nsamples : (k + 1) * nsamples] * seqlen
        ids = stream[starts[:, None] + torch.arange(seqlen)]
        sets.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return sets


@torch.no_grad()
def chunk_nll(model: nn.Module, chunks: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Summed next-token NLL of every chunk (``(n,)`` float64); ``exp(sum / (n·(seqlen-1)))`` is the perplexity
    that :func:`dynslice.measure.evaluate.perplexity` reports."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros(chunks.shape[0], dtype=np.float64)
    try:
        for start in range(0, chunks.shape[0], batch_size):
            ids = chunks[start : start + batch_size].to(device)
            logits = model(input_ids=ids).logits
            for row in range(ids.shape[0]):
                out[start + row] = float(
                    F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum").double()
                )
    finally:
        model.train(was_training)
    return out


def ppl_from_nll(nll: Sequence[float], tokens_per_chunk: int) -> float:
    return math.exp(float(np.sum(nll)) / (len(nll) * tokens_per_chunk))


# ------------------------------------------------------------------------------------------------ score vectors
def score_vectors(scores: dict[str, Sequence[float]], permutations: int, seed: int) -> dict[str, np.ndarray]:
    """Normalised redundancy vectors (high = slice more) of every score method.

    ``scores`` holds the ``normalized`` vectors of :func:`dynslice.core.lr.layer_redundancy` for ``cosine`` and,
    optionally, ``bi`` and ``angular``. Shuffled vectors are ``shuffled/0`` .. ``shuffled/{permutations-1}``,
    drawn from one generator seeded with ``seed``.
    """
    lr = np.asarray(scores["cosine"], dtype=np.float64)
    n = lr.size
    out = {"lr": lr, "first_layer": np.r_[0.0, np.ones(n - 1)], "inverted": 1.0 - lr}
    for metric in ("bi", "angular"):
        if metric in scores:
            out[metric] = np.asarray(scores[metric], dtype=np.float64)
    rng = np.random.default_rng(seed)
    for k in range(permutations):
        out[f"shuffled/{k}"] = lr[rng.permutation(n)]
    return out


def method_of(key: str) -> str:
    return key.split("/")[0]


def allocations(
    vectors: dict[str, np.ndarray],
    base: RunConfig,
    sb: float,
    dims: ArchDims,
    budgets: Sequence[str],
    sb_step: float = 0.02,
) -> dict[tuple[str, str], Allocation | str]:
    """``{(key, budget): Allocation}`` for constant slicing and every score vector at every budget, each through
    the run's own allocation step (:func:`dynslice.experiment.widths.allocation`) on ``base`` (SP, rounding).

    A vector that cannot meet its budget at ``sb`` (e.g. inverted LR, whose one peaked layer would have to be
    sliced entirely) gets the lowest feasible SB of ``sb, sb + sb_step, ...`` below ``sp`` (``Allocation.sb``
    says which); if none is feasible, the error message stands in for it, so the experiment records it.
    """
    sp = base.sp
    out: dict[tuple[str, str], Allocation | str] = {}
    steps = range(math.ceil((sp - sb) / sb_step) + 1)
    grid = [b for b in (round(sb + k * sb_step, 10) for k in steps) if b < sp - 1e-9]
    scores = {key: LRInput(tuple(float(x) for x in vec), "redundancy") for key, vec in vectors.items()}
    for budget in budgets:
        cfg = base.replace(budget=budget)
        out[("constant", budget)] = allocation(cfg, dims, scores["lr"], sb=sp)
        for key, vec in scores.items():
            first_error = None
            for b in grid:
                try:
                    out[(key, budget)] = allocation(cfg, dims, vec, sb=b)
                    break
                except ValueError as err:
                    first_error = first_error or str(err)
            else:
                out[(key, budget)] = first_error or f"sb: no feasible SB below sp={sp}"
    return out


# ---------------------------------------------------------------------------------------------------- statistics
# ----------------------------------------------------------------------------------------------------- the run
@dataclass
class _Context:
    cfg: AblationConfig
    fresh: Callable[[], nn.Module]  # a new dense copy (read from the checkpoint), never a resident second copy
    tokenizer: Any
    dims: ArchDims
    eval_chunks: dict[str, torch.Tensor]
    cache: dict = field(default_factory=dict)

    def evaluate(self, model: nn.Module, with_tasks: bool) -> dict[str, Any]:
        nll = {name: chunk_nll(model, chunks, self.cfg.batch_size) for name, chunks in self.eval_chunks.items()}
        out: dict[str, Any] = {
            "ppl": {name: ppl_from_nll(v, self.cfg.ppl_seqlen - 1) for name, v in nll.items()},
            "chunk_nll": {name: v.tolist() for name, v in nll.items()},
        }
        if with_tasks and self.cfg.tasks:
            out["tasks"] = zero_shot(
                model, self.tokenizer, list(self.cfg.tasks), limit=self.cfg.task_limit, batch_size=self.cfg.batch_size
            )
        return out

    def sliced_eval(
        self, calibration: dict[str, torch.Tensor], seed: int, widths: tuple[int, ...], with_tasks: bool
    ) -> dict[str, Any]:
        """Slice a copy of the dense model to ``widths`` and evaluate it (cached per seed and widths)."""
        key = (seed, widths, with_tasks)
        if key not in self.cache:
            if not with_tasks and (seed, widths, True) in self.cache:
                return self.cache[(seed, widths, True)]
            run_cfg = self.cfg.run_config(self.cfg.sp[0])  # the slicing settings (SP only sizes the record)
            model = pipeline.slice_dense(self.fresh(), run_cfg, calibration, widths, progress=False)
            actual = count_parameters(model)
            expected = sliced_params(self.dims, list(widths)).total
            if actual != expected:
                raise RuntimeError(f"parameter accounting: formula gives {expected}, the model has {actual}")
            self.cache[key] = {"params": actual, **self.evaluate(model, with_tasks)}
            del model
        return self.cache[key]


def _lr_scores(
    model: nn.Module, batch: dict[str, torch.Tensor], metrics: Sequence[str], batch_size: int
) -> dict[str, dict[str, Any]]:
    return {
        m: layer_redundancy(model, batch, metric=m, batch_size=batch_size, progress=False).to_json() for m in metrics
    }


def run(
    cfg: AblationConfig,
    out: str | Path | None = None,
    *,
    force: bool = False,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole ablation experiment and return its record; with ``out``, write it atomically.

    A record at ``out`` whose ``config`` equals ``cfg`` is returned as it is unless ``force``. ``model`` and
    ``tokenizer`` may be passed in (a dense model of ``cfg.model``); otherwise they are loaded. With ``out``, every
    finished evaluation is also checkpointed to ``<out stem>.partial.json``, so a stopped run resumes where it was
    (same config); the checkpoint is removed once the record is written.
    """
    if out is not None and Path(out).is_file() and not force:
        existing = read_json(out)
        if existing.get("config") == cfg.to_json() and existing.get("record_version") == RECORD_VERSION:
            return existing
    t_start = time.perf_counter()
    if model is None or tokenizer is None:
        bench = pipeline.Workbench(cfg.model, cfg.dtype, cfg.device)
        fresh, tokenizer = bench.load, bench.tokenizer
    else:  # the caller's model: each slicing takes a copy of it
        given = model

        def fresh() -> nn.Module:
            return copy.deepcopy(given)

    model = fresh()  # the dense model for the scores and the dense row, dropped before the slicings
    dims = ArchDims.from_config(model.config)
    eval_chunks = {
        name: data.eval_chunks(name, tokenizer, cfg.ppl_seqlen, split="test", max_chunks=cfg.ppl_max_chunks)
        for name in cfg.ppl_datasets
    }
    ctx = _Context(cfg, fresh, tokenizer, dims, eval_chunks)
    cal_sets = disjoint_calibration(
        cfg.cal_dataset, tokenizer, cfg.cal_nsamples, cfg.cal_seqlen, cfg.seeds, cfg.window_seed
    )
    checkpoint = None if out is None else Path(out).with_name(Path(out).stem + ".partial.json")
    saved = read_json(checkpoint) if checkpoint is not None and checkpoint.is_file() and not force else {}
    if saved.get("config") != cfg.to_json():
        saved = {}
    done: dict[str, dict[str, Any]] = dict(saved.get("rows", {}))
    # Scores per seed: the LR of seed k comes from seed k's calibration windows; BI and angular from seed 0.
    scores = saved.get("scores")
    if scores is None:
        scores = [_lr_scores(model, cal_sets[0], ("cosine", "bi", "angular"), cfg.batch_size)]
        scores += [_lr_scores(model, cal_sets[k], ("cosine",), cfg.batch_size) for k in range(1, cfg.seeds)]

    def save(job: str, row: dict[str, Any]) -> None:
        done[job] = row
        if checkpoint is not None:
            write_json(checkpoint, {"config": cfg.to_json(), "scores": scores, "rows": done})

    if "dense" not in done:
        save(
            "dense",
            {
                "method": "dense",
                "key": "dense",
                "budget": None,
                "sp": None,
                "seed": None,
                "widths": [dims.hidden] * dims.layers,
                "params": count_parameters(model),
                **ctx.evaluate(model, "dense" in cfg.task_methods),
            },
        )
    rows: list[dict[str, Any]] = [done["dense"]]
    del model

    jobs: list[tuple[float, str, str, int]] = []  # (sp, key, budget, seed)
    vecs0 = score_vectors({m: s["normalized"] for m, s in scores[0].items()}, cfg.permutations, cfg.permutation_seed)
    for sp in cfg.sp:
        for budget in cfg.budgets:
            jobs += [(sp, "constant", budget, 0)] + [(sp, key, budget, 0) for key in vecs0]
        for seed in range(1, cfg.seeds):
            for budget in cfg.seed_budgets:
                jobs += [(sp, "constant", budget, seed), (sp, "lr", budget, seed)]
    allocs: dict[tuple[int, float], dict] = {}
    for sp, key, budget, seed in tqdm(jobs, desc="ablations", disable=not progress):
        if (seed, sp) not in allocs:
            vecs = vecs0 if seed == 0 else {"lr": np.asarray(scores[seed]["cosine"]["normalized"])}
            allocs[(seed, sp)] = allocations(vecs, cfg.run_config(sp), cfg.sb, dims, cfg.budgets)
        alloc = allocs[(seed, sp)][(key, budget)]
        method = method_of(key)
        if isinstance(alloc, str):
            rows.append({"method": method, "key": key, "budget": budget, "sp": sp, "seed": seed, "infeasible": alloc})
            continue
        with_tasks = seed == 0 and method in cfg.task_methods and budget in cfg.task_budgets
        job = f"{sp}|{key}|{budget}|{seed}"
        if job not in done:
            save(
                job,
                {
                    "method": method,
                    "key": key,
                    "budget": budget,
                    "sp": sp,
                    "seed": seed,
                    "sb": alloc.sb,
                    "widths": list(alloc.widths),
                    **ctx.sliced_eval(cal_sets[seed], seed, alloc.widths, with_tasks),
                },
            )
        rows.append(done[job])

    for sp in cfg.sp:  # ShortGPT: delete the lowest-BI layers down to the constant-SP parameter count
        target = sliced_params(dims, list(allocs[(0, sp)][("constant", "params")].widths)).total
        bi = scores[0]["bi"]["lr"]
        drop = layers_to_delete(bi, dims, target)
        job = f"{sp}|shortgpt"
        if job not in done:
            short = delete_layers(fresh(), drop)
            save(
                job,
                {
                    "method": "shortgpt",
                    "key": "shortgpt",
                    "budget": "params",
                    "sp": sp,
                    "seed": 0,
                    "deleted_layers": drop,
                    "target_params": target,
                    "params": count_parameters(short),
                    "widths": [dims.hidden] * (dims.layers - len(drop)),
                    **ctx.evaluate(short, "shortgpt" in cfg.task_methods),
                },
            )
            del short
        rows.append(done[job])

    record = {
        "record_version": RECORD_VERSION,
        "config": cfg.to_json(),
        "model": cfg.model,
        "dims": dims.to_json(),
        "dense_params": dense_params(dims),
        "scores": {
            "per_seed_lr": [s["cosine"] for s in scores],
            "bi": scores[0]["bi"],
            "angular": scores[0]["angular"],
            "similarity": score_similarity(scores[0]),
        },
        "rows": rows,
    }
    record["summary"] = summarize(record)
    record["gap_tests"] = gap_tests(record)
    record["time_s"] = round(time.perf_counter() - t_start, 1)
    record["versions"], record["numerics"] = numerics.versions(), numerics.describe(cfg.device)
    if out is not None:
        write_json(out, record)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
    return record


# ------------------------------------------------------------------------------------------------ summaries
def score_similarity(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Pearson correlation and max absolute difference of BI's and angular's normalised vectors with LR's."""
    lr = np.asarray(scores["cosine"]["normalized"])
    out = {}
    for m in ("bi", "angular"):
        v = np.asarray(scores[m]["normalized"])
        corr = float(np.corrcoef(lr, v)[0, 1]) if lr.std() > 0 and v.std() > 0 else float("nan")
        out[m] = {"pearson": corr, "max_abs_diff": float(np.max(np.abs(lr - v)))}
    return out
