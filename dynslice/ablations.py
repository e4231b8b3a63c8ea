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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynslice import data, numerics
from dynslice.core.adapters import count_parameters
from dynslice.core.allocate import Allocation, allocate
from dynslice.core.checks import check_int
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, dense_params, sliced_params
from dynslice.core.shortgpt import delete_layers, layers_to_delete
from dynslice.core.slicing import slice_model
from dynslice.evaluate import zero_shot
from dynslice.jsonio import read_json, write_json
from dynslice.models import load

SCORE_METHODS = ("lr", "first_layer", "shuffled", "inverted", "bi", "angular")
METHODS = ("dense", "constant") + SCORE_METHODS + ("shortgpt",)
BUDGETS = ("params", "width")
RECORD_VERSION = 1


# ------------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class AblationConfig:
    """Everything the ablation experiment depends on (same config and arithmetic -> same JSON, timings aside)."""

    model: str = "smollm2-135m"
    dtype: str = "fp32"
    device: str = "cpu"
    cal_dataset: str = "wiki"
    cal_nsamples: int = 16  # calibration windows per seed (also the LR batch of that seed)
    cal_seqlen: int = 256
    window_seed: int = 42  # seeds the one permutation of train chunks that every seed takes its share of
    seeds: int = 3  # calibration sets with pairwise disjoint windows (constant and lr)
    sp: tuple[float, ...] = (0.3,)
    sb: float = 0.0  # slicing base of every dynamic method (the best SB of the CPU sweep)
    budgets: tuple[str, ...] = BUDGETS
    seed_budgets: tuple[str, ...] = ("params",)  # budgets at which lr is repeated over the seeds
    permutations: int = 5
    permutation_seed: int = 0
    round_interval: int = 8
    ppl_datasets: tuple[str, ...] = ("wiki", "news")
    ppl_seqlen: int = 256
    ppl_max_chunks: int = 16
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    task_methods: tuple[str, ...] = ("dense", "constant", "lr", "first_layer", "shortgpt")
    task_budgets: tuple[str, ...] = ("params",)
    batch_size: int = 8
    bootstrap: int = 2000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (
            ("cal_nsamples", 1),
            ("cal_seqlen", 2),
            ("seeds", 1),
            ("permutations", 1),
            ("round_interval", 1),
            ("ppl_seqlen", 2),
            ("ppl_max_chunks", 1),
            ("batch_size", 1),
            ("bootstrap", 100),
        ):
            check_int(name, getattr(self, name), low)
        if not self.sp or any(not 0 < s < 1 for s in self.sp):
            raise ValueError(f"sp: {self.sp!r} must be a non-empty list of values with 0 < sp < 1")
        if any(not 0 <= self.sb < s for s in self.sp):
            raise ValueError(f"sb: {self.sb!r} is outside 0 <= sb < sp for sp in {list(self.sp)}")
        for name, allowed in (
            ("budgets", BUDGETS),
            ("seed_budgets", BUDGETS),
            ("task_budgets", BUDGETS),
            ("task_methods", METHODS),
        ):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: {bad} not in {list(allowed)}")
        if not self.ppl_datasets:
            raise ValueError("ppl_datasets: needs at least one dataset")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> AblationConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"ablations: unknown key(s) {unknown}; allowed: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def settings_path() -> Path:
    """``dynslice/profiles/ablations/06_ablations.yaml`` (package data): the ablation settings of each profile
    (notebook 06)."""
    from importlib import resources

    return Path(str(resources.files("dynslice.profiles").joinpath("ablations", "06_ablations.yaml")))


def load_config(path: str | Path, profile: str) -> AblationConfig | None:
    """The ``profile`` section of an ablations YAML (``None`` when the profile has none)."""
    import yaml

    obj = yaml.safe_load(Path(path).read_text()) or {}
    section = obj.get(profile)
    return None if section is None else AblationConfig.from_dict(section)


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
    that :func:`dynslice.evaluate.perplexity` reports."""
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
    sp: float,
    sb: float,
    dims: ArchDims,
    budgets: Sequence[str],
    round_interval: int = 8,
    sb_step: float = 0.02,
) -> dict[tuple[str, str], Allocation | str]:
    """``{(key, budget): Allocation}`` for constant slicing and every score vector at every budget.

    A vector that cannot meet its budget at ``sb`` (e.g. inverted LR, whose one peaked layer would have to be
    sliced entirely) gets the lowest feasible SB of ``sb, sb + sb_step, ...`` below ``sp`` (``Allocation.sb``
    says which); if none is feasible, the error message stands in for it, so the experiment records it.
    """
    out: dict[tuple[str, str], Allocation | str] = {}
    steps = range(math.ceil((sp - sb) / sb_step) + 1)
    grid = [b for b in (round(sb + k * sb_step, 10) for k in steps) if b < sp - 1e-9]
    for budget in budgets:
        out[("constant", budget)] = allocate(
            vectors["lr"], sp, sp, dims.hidden, round_interval=round_interval, budget=budget, dims=dims
        )
        for key, vec in vectors.items():
            first_error = None
            for b in grid:
                try:
                    out[(key, budget)] = allocate(
                        vec, sp, b, dims.hidden, round_interval=round_interval, budget=budget, dims=dims
                    )
                    break
                except ValueError as err:
                    first_error = first_error or str(err)
            else:
                out[(key, budget)] = first_error or f"sb: no feasible SB below sp={sp}"
    return out


# ---------------------------------------------------------------------------------------------------- statistics
def paired_t(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Paired t-test of ``a - b`` (``None`` statistics with fewer than 2 pairs or zero spread)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out: dict[str, float | None] = {"n": int(d.size), "mean": float(d.mean()), "sd": None, "t": None, "p": None}
    if d.size >= 2:
        sd = float(d.std(ddof=1))
        out["sd"] = sd
        if sd > 0:
            from scipy import stats

            t = float(d.mean() / (sd / math.sqrt(d.size)))
            out["t"], out["p"] = t, float(2 * stats.t.sf(abs(t), d.size - 1))
    return out


def bootstrap_gap(
    nll_a: np.ndarray, nll_b: np.ndarray, tokens_per_chunk: int, n_boot: int, seed: int
) -> dict[str, float]:
    """Paired bootstrap over evaluation chunks of the relative perplexity change ``ppl_a / ppl_b - 1``.

    ``nll_a`` and ``nll_b`` are ``(seeds, chunks)`` summed NLLs of the same chunks; each resample draws chunk
    indices once, for every seed and both methods, and averages the log-ratio over seeds.
    """
    a, b = np.atleast_2d(nll_a), np.atleast_2d(nll_b)
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    tok = n * tokens_per_chunk
    log_ratio = (a[:, idx].sum(-1) - b[:, idx].sum(-1)).mean(0) / tok  # (n_boot,)
    point = float((a.sum(-1) - b.sum(-1)).mean() / tok)
    lo, hi = np.quantile(log_ratio, [0.025, 0.975])
    return {
        "change": math.expm1(point),
        "ci95": [math.expm1(float(lo)), math.expm1(float(hi))],
        "p_no_gain": float(np.mean(log_ratio >= 0)),
    }


def mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


# ----------------------------------------------------------------------------------------------------- the run
@dataclass
class _Context:
    cfg: AblationConfig
    model: nn.Module
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
            model = slice_model(
                copy.deepcopy(self.model),
                calibration,
                list(widths),
                batch_size=self.cfg.batch_size,
                device=self.cfg.device,
                progress=False,
            )
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
        model, tokenizer = load(cfg.model, cfg.dtype, cfg.device)
    dims = ArchDims.from_config(model.config)
    eval_chunks = {
        name: data.eval_chunks(name, tokenizer, cfg.ppl_seqlen, split="test", max_chunks=cfg.ppl_max_chunks)
        for name in cfg.ppl_datasets
    }
    ctx = _Context(cfg, model, tokenizer, dims, eval_chunks)
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
            allocs[(seed, sp)] = allocations(vecs, sp, cfg.sb, dims, cfg.budgets, cfg.round_interval)
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
            short = delete_layers(copy.deepcopy(model), drop)
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
    record["answer"] = answer(record)
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


def summarize(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (sp, budget, method): params, perplexity mean ± sd over seeds or permutations, accuracy ± se."""
    groups: dict[tuple, list[dict]] = {}
    for row in record["rows"]:
        if row.get("infeasible"):
            continue
        groups.setdefault((row["sp"], row["budget"] or "", row["method"]), []).append(row)
    out = []
    for (sp, budget, method), rows in groups.items():
        spread = "permutations" if method == "shuffled" else "seeds" if len(rows) > 1 else None
        entry: dict[str, Any] = {
            "sp": sp,
            "budget": budget or None,
            "method": method,
            "n": len(rows),
            "spread_over": spread,
            "sb": rows[0].get("sb"),
            "params": mean_sd([r["params"] for r in rows])["mean"],
            "ppl": {d: mean_sd([r["ppl"][d] for r in rows]) for d in rows[0]["ppl"]},
        }
        tasks = [r for r in rows if r.get("tasks")]
        if tasks:
            entry["tasks"] = tasks[0]["tasks"]
        out.append(entry)
    return out


def gap_tests(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Dynamic (lr) vs constant over the seeds, per SP, seed budget and dataset: paired t and chunk bootstrap."""
    cfg = AblationConfig.from_dict(record["config"])
    out = []
    for sp in cfg.sp:
        for budget in cfg.seed_budgets:
            by = {
                m: sorted(
                    (
                        r
                        for r in record["rows"]
                        if r["sp"] == sp and r["budget"] == budget and r["method"] == m and not r.get("infeasible")
                    ),
                    key=lambda r: r["seed"],
                )
                for m in ("constant", "lr")
            }
            if len(by["lr"]) != len(by["constant"]) or not by["lr"]:
                continue
            for d in cfg.ppl_datasets:
                log_lr = [math.log(r["ppl"][d]) for r in by["lr"]]
                log_c = [math.log(r["ppl"][d]) for r in by["constant"]]
                t = paired_t(log_lr, log_c)
                boot = bootstrap_gap(
                    np.array([r["chunk_nll"][d] for r in by["lr"]]),
                    np.array([r["chunk_nll"][d] for r in by["constant"]]),
                    cfg.ppl_seqlen - 1,
                    cfg.bootstrap,
                    cfg.bootstrap_seed,
                )
                sd_c = mean_sd([r["ppl"][d] for r in by["constant"]])["sd"]
                sd_l = mean_sd([r["ppl"][d] for r in by["lr"]])["sd"]
                gap = (
                    mean_sd([r["ppl"][d] for r in by["constant"]])["mean"]
                    - mean_sd([r["ppl"][d] for r in by["lr"]])["mean"]
                )
                spread = max(v for v in (sd_c, sd_l, 0.0) if v is not None)
                out.append(
                    {
                        "sp": sp,
                        "budget": budget,
                        "dataset": d,
                        "seeds": len(by["lr"]),
                        "gap_ppl": gap,
                        "spread_sd": spread,
                        "paired_t_logppl": t,
                        "bootstrap": boot,
                        "exceeds_spread": bool(abs(gap) > 2 * spread and (boot["ci95"][1] < 0 or boot["ci95"][0] > 0)),
                    }
                )
    return out


def _find(summary: list[dict], sp: float, budget: str | None, method: str) -> dict | None:
    for s in summary:
        if s["sp"] == sp and s["budget"] == budget and s["method"] == method:
            return s
    return None


def _pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}%"


def _seed0(record: dict[str, Any], sp: float, budget: str, method: str, dataset: str) -> float | None:
    """The seed-0 perplexity of ``method`` (the calibration set every single-seed method uses), if it ran."""
    row = next(
        (
            r
            for r in record["rows"]
            if r["sp"] == sp
            and r["budget"] == budget
            and r["method"] == method
            and r.get("seed") == 0
            and not r.get("infeasible")
        ),
        None,
    )
    return None if row is None else float(row["ppl"][dataset])


def answer(record: dict[str, Any]) -> str:
    """One paragraph that states what the numbers say, generated from the record.

    Like is compared with like: the multi-seed means of LR and constant with each other, and every single-seed
    method (first layer only, shuffled, inverted, BI, angular, ShortGPT) with the seed-0 rows of LR and constant,
    which share its calibration set.
    """
    cfg = AblationConfig.from_dict(record["config"])
    summary = record.get("summary") or summarize(record)
    tests = record.get("gap_tests") or gap_tests(record)
    d = cfg.ppl_datasets[0]
    parts = []
    for sp in cfg.sp:
        b = "params" if "params" in cfg.budgets else cfg.budgets[0]
        get = {m: _find(summary, sp, b, m) for m in METHODS}
        get["shortgpt"] = _find(summary, sp, "params", "shortgpt")
        c, lr = get["constant"], get["lr"]
        c0, l0 = _seed0(record, sp, b, "constant", d), _seed0(record, sp, b, "lr", d)
        if not c or not lr or c0 is None or l0 is None:
            continue
        pc, pl = c["ppl"][d]["mean"], lr["ppl"][d]["mean"]
        over = f"the mean over {lr['n']} calibration sets" if lr["n"] > 1 else "one calibration set"
        s = (
            f"At SP {sp} and equal parameters ({b} budget, SB {cfg.sb}), LR dynamic slicing gives {d} perplexity "
            f"{pl:.2f} against constant slicing's {pc:.2f} ({_pct(pl, pc)}; {over})"
        )
        test = next((t for t in tests if t["sp"] == sp and t["budget"] == b and t["dataset"] == d), None)
        if test:
            boot = test["bootstrap"]
            s += (
                f"; over {test['seeds']} disjoint calibration sets the gap is {abs(test['gap_ppl']):.2f} against "
                f"a seed-to-seed sd of {test['spread_sd']:.2f}, with a chunk-bootstrap 95% interval of "
                f"[{100 * boot['ci95'][0]:+.1f}%, {100 * boot['ci95'][1]:+.1f}%]"
                + (
                    f" and a paired-t p of {test['paired_t_logppl']['p']:.3f}"
                    if test["paired_t_logppl"]["p"] is not None
                    else ""
                )
                + (
                    ", so it exceeds the calibration noise."
                    if test["exceeds_spread"]
                    else ", so it does not clearly exceed the noise."
                )
            )
        else:
            s += "."
        s += (
            f" The single-seed variants that follow share calibration set 0, on which constant gives {c0:.2f} and "
            f"LR {l0:.2f}."
        )
        fl, sh, inv = get["first_layer"], get["shuffled"], get["inverted"]
        if fl:
            pf = fl["ppl"][d]["mean"]
            share = (c0 - pf) / (c0 - l0) if c0 != l0 else float("nan")
            s += (
                f" Protecting only the first layer gives {pf:.2f}, "
                f"{'about ' + format(100 * share, '.0f') + '% of' if math.isfinite(share) else 'none of'} "
                f"LR's gain over constant on that set"
                + (", so protecting layer 0 carries the gain" if math.isfinite(share) and share >= 0.8 else "")
            )
            s += ";" if sh else "."
        if sh:
            ps, sds = sh["ppl"][d]["mean"], sh["ppl"][d]["sd"] or 0.0
            verdict = (
                "worse than LR by more than twice their spread, so where the narrow layers go matters (a "
                "shuffle also moves layer 0's protection to a random layer)"
                if ps - l0 > 2 * sds
                else "within twice their spread of LR, so the LR ordering adds little"
            )
            s += f" {sh['n']} shuffled LR vectors give {ps:.2f} ± {sds:.2f}, {verdict}."
        if inv:
            pi = inv["ppl"][d]["mean"]
            at = f" at SB {inv['sb']:.2f}, the lowest feasible," if inv.get("sb") not in (None, cfg.sb) else ""
            s += f" Inverted LR{at} gives {pi:.2f} ({'worse' if pi > c0 else 'better'} than constant)."
        for m in ("angular", "bi"):
            g = get[m]
            if g:
                s += (
                    f" {'Angular distance' if m == 'angular' else 'BI'} through the same allocator gives "
                    f"{g['ppl'][d]['mean']:.2f}."
                )
        if get["shortgpt"]:
            g = get["shortgpt"]
            row = next(r for r in record["rows"] if r["method"] == "shortgpt" and r["sp"] == sp)
            dl = row["deleted_layers"]
            s += (
                " ShortGPT at the same size deletes "
                + (
                    f"{len(dl)} layer(s) ({', '.join(map(str, dl))})"
                    if dl
                    else "no layer (the dense model already fits the budget)"
                )
                + f" and gives {g['ppl'][d]['mean']:.2f}"
                f" ({'better' if g['ppl'][d]['mean'] < l0 else 'worse'} than LR slicing)."
            )
        parts.append(s.strip())
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- table and figure
LABELS = {
    "dense": "dense",
    "constant": "constant (SliceGPT)",
    "lr": "LR dynamic",
    "first_layer": "first layer only",
    "shuffled": "shuffled LR",
    "inverted": "inverted LR",
    "bi": "BI",
    "angular": "angular",
    "shortgpt": "ShortGPT (layer deletion)",
}


def table(record: dict[str, Any]):
    """A DataFrame of the summary: method, budget, params, ppl ± sd per dataset, acc ± se per task."""
    import pandas as pd

    rows = []
    for s in record["summary"]:
        row = {
            "SP": "" if s["sp"] is None else f"{s['sp']:.2f}",
            "budget": s["budget"] or "-",
            "method": LABELS[s["method"]],
            "SB": "" if s.get("sb") is None else f"{s['sb']:.2f}",
            "n": s["n"],
            "params (M)": f"{s['params'] / 1e6:.2f}",
        }
        for dname, v in s["ppl"].items():
            row[f"ppl {dname}"] = f"{v['mean']:.2f}" + (f" ± {v['sd']:.2f}" if v["sd"] is not None else "")
        for task, v in (s.get("tasks") or {}).items():
            if task == "average":
                continue
            se = v.get("stderr")
            row[f"acc {task}"] = f"{v['value']:.3f}" + (f" ± {se:.3f}" if se is not None else "")
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def write_tables(record: dict[str, Any], stem: str | Path) -> tuple[Path, Path]:
    from dynslice.report import write_table

    return write_table(
        table(record),
        stem,
        caption="Ablations at equal parameters and equal mean width: "
        "perplexity mean ± sd over calibration seeds (constant, LR) or permutations (shuffled); "
        "accuracy ± lm-eval standard error",
    )


MARKERS = {
    "dense": "*",
    "constant": "s",
    "lr": "o",
    "first_layer": "^",
    "shuffled": "v",
    "inverted": "X",
    "bi": "P",
    "angular": "D",
    "shortgpt": "h",
}


def figure_note(record: dict[str, Any], dataset: str | None = None) -> str:
    """A one-line reading of :func:`figure`: per SP, the equal-parameter perplexities from best to worst."""
    cfg = AblationConfig.from_dict(record["config"])
    d = dataset or cfg.ppl_datasets[0]
    dense = _find(record["summary"], None, None, "dense")
    parts = []
    for sp in cfg.sp:
        rows = sorted(
            (s for s in record["summary"] if s["sp"] == sp and s["budget"] == "params"),
            key=lambda s: s["ppl"][d]["mean"],
        )
        parts.append(
            f"SP {sp}, equal parameters, best to worst: "
            + ", ".join(
                f"{LABELS[s['method']]} {s['ppl'][d]['mean']:.2f}" + (f" (mean of {s['n']})" if s["n"] > 1 else "")
                for s in rows
            )
            + "."
        )
    if dense:
        parts.append(f"Dense: {dense['ppl'][d]['mean']:.2f}.")
    return " ".join(parts)


def figure(record: dict[str, Any], dataset: str | None = None):
    """Per SP, two panels. Left: perplexity (log scale) vs parameters, one marker per method (filled: params
    budget, hollow: width budget), error bars = sd over seeds or permutations. Right: the equal-parameter
    methods side by side, sorted, on a linear scale (off-scale failures such as inverted LR are named in the
    title instead)."""
    import matplotlib.pyplot as plt

    cfg = AblationConfig.from_dict(record["config"])
    d = dataset or cfg.ppl_datasets[0]
    fig, axes = plt.subplots(
        len(cfg.sp), 2, figsize=(12.0, 4.2 * len(cfg.sp)), squeeze=False, gridspec_kw={"width_ratios": [1.25, 1.0]}
    )
    dense = _find(record["summary"], None, None, "dense")
    for (ax, bars), sp in zip(axes, cfg.sp, strict=True):
        seen = set()
        for s in record["summary"]:
            if s["sp"] not in (sp, None):  # None: the dense model, shown in every panel
                continue
            m, v = s["method"], s["ppl"][d]
            hollow = s["budget"] == "width"
            color = f"C{list(MARKERS).index(m)}"
            label = LABELS[m] if m not in seen else None
            seen.add(m)
            ax.errorbar(
                s["params"] / 1e6,
                v["mean"],
                yerr=v["sd"] or 0.0,
                fmt=MARKERS[m],
                color=color,
                mfc="none" if hollow else color,
                ms=8,
                capsize=3,
                label=label,
            )
        ax.set_title(f"SP = {sp}  (filled: equal params, hollow: equal mean width)", fontsize=9)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(f"{d} perplexity (log scale)")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
        _bars(bars, record, sp, d, dense)
    fig.tight_layout()
    return fig


def _bars(ax, record: dict[str, Any], sp: float, d: str, dense: dict | None) -> None:
    """Equal-parameter methods at ``sp``, sorted by perplexity, with their spread; failures named, not drawn."""
    rows = sorted(
        (s for s in record["summary"] if s["sp"] == sp and s["budget"] == "params"), key=lambda s: s["ppl"][d]["mean"]
    )
    const = next((s["ppl"][d]["mean"] for s in rows if s["method"] == "constant"), None)
    cap = 3 * const if const else float("inf")
    shown = [s for s in rows if s["ppl"][d]["mean"] <= cap]
    off = [f"{LABELS[s['method']]} {s['ppl'][d]['mean']:.0f}" for s in rows if s["ppl"][d]["mean"] > cap]
    ys = range(len(shown))
    ax.barh(
        list(ys),
        [s["ppl"][d]["mean"] for s in shown],
        xerr=[s["ppl"][d]["sd"] or 0.0 for s in shown],
        color=[f"C{list(MARKERS).index(s['method'])}" for s in shown],
        capsize=3,
    )
    ax.set_yticks(list(ys), [LABELS[s["method"]] + (f" (n={s['n']})" if s["n"] > 1 else "") for s in shown], fontsize=8)
    ax.invert_yaxis()
    if dense:
        ax.axvline(dense["ppl"][d]["mean"], color="k", lw=0.8, ls="--", label="dense")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel(f"{d} perplexity (mean ± sd)")
    ax.set_title(f"SP = {sp}, equal parameters" + (f"; off scale: {', '.join(off)}" if off else ""), fontsize=9)
