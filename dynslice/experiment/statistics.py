"""The statistics of an ablation record, computed from its rows: mean ± sd over seeds or permutations, paired
t-tests across seeds and a paired bootstrap over evaluation chunks. Pure numpy (scipy for the t distribution)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynslice.experiment.profiles.ablation import AblationConfig


# ------------------------------------------------------------------------------------------------ statistics
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


# ------------------------------------------------------------------------------------------------ summaries
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
