"""Short Markdown paragraphs generated from the results, shown after each figure and table of the notebooks.

Each function reads a table of :mod:`dynslice.publish.report` (or an LR file) and says what it shows, the numbers that
matter, and how they compare with the paper's claim: dynamic slicing gives up to 7% lower perplexity and up to
5 points more average zero-shot accuracy than SliceGPT's constant slicing at the same mean slice fraction.
Because the text is computed, it stays true when the numbers change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from dynslice.experiment.protocol import BEST_SB_NOTE

#: The paper's headline claims (Dumitru et al., 2024): best dynamic SB vs constant slicing.
PAPER_PPL_GAIN_PCT = 7.0
PAPER_ACC_GAIN_POINTS = 5.0


def _claim_ppl(change_pct: float) -> str:
    gain = -change_pct
    if gain <= 0:
        return f"no gain, against the paper's up to {PAPER_PPL_GAIN_PCT:g}% lower perplexity"
    rel = "more than" if gain > PAPER_PPL_GAIN_PCT else "within"
    return f"{gain:.1f}% lower perplexity, {rel} the paper's up to {PAPER_PPL_GAIN_PCT:g}%"


def lr_text(scores: Mapping[tuple[str, str], Mapping[str, Any]], agreement: pd.DataFrame) -> str:
    """Which layers are most and least redundant, and whether the corpora agree."""
    parts = []
    for (model, corpus), s in scores.items():
        lr = list(s["lr"])
        lo, hi = min(range(len(lr)), key=lr.__getitem__), max(range(len(lr)), key=lr.__getitem__)
        parts.append(
            f"On **{model} / {corpus}**, LR runs from {lr[lo]:.3f} at layer {lo} (least redundant: it "
            f"turns its input most, so it is sliced least) to {lr[hi]:.3f} at layer {hi} (sliced most)."
        )
    for _, row in agreement.iterrows():
        verdict = "the same ordering" if row["spearman"] > 0.8 else "a different ordering"
        parts.append(
            f"The {row['corpus A']} and {row['corpus B']} curves have Spearman ρ = {row['spearman']:.2f}: "
            f"{verdict} of layers, so the allocation "
            f"{'does not hinge' if row['spearman'] > 0.8 else 'depends'}"
            f" on the LR corpus (the paper reports LR to be stable across corpora)."
        )
    return " ".join(parts)


def allocation_text(widths: Sequence[int], hidden: int, constant: int, sp: float, sb: float) -> str:
    """The spread of the per-layer widths against SliceGPT's constant width."""
    lo, hi = min(range(len(widths)), key=widths.__getitem__), max(range(len(widths)), key=widths.__getitem__)
    return (
        f"At SP = {sp:g} and SB = {sb:g}, SliceGPT keeps every layer at width {constant} of {hidden}; "
        f"dynamic slicing keeps between {widths[lo]} (layer {lo}) and {widths[hi]} (layer {hi}), with the same "
        f"total width ({sum(widths)} vs {constant * len(widths)}). The redundant layers give width to the "
        f"others, as in the paper's Figure 1."
    )


def sweep_text(head: pd.DataFrame, dataset: str) -> str:
    """Best dynamic SB vs constant, per SP and comparison, on ``dataset``."""
    if head.empty:
        return "No dynamic run has a constant run to compare with."
    col = f"ppl_{dataset}"
    lines = []
    for _, r in head.iterrows():
        lines.append(
            f"- SP {r['sp']:g}, {r['comparison']}: best SB {r['best_sb']:g}, perplexity "
            f"{r[col + '_dynamic']:.2f} vs {r[col + '_constant']:.2f} for constant slicing: "
            f"{_claim_ppl(r[col + '_change_pct'])}."
        )
    return (
        f"Perplexity on **{dataset}**, best dynamic SB against constant slicing (SB = SP):\n\n"
        + "\n".join(lines)
        + f"\n\n*{BEST_SB_NOTE}*"
    )


def params_text(head: pd.DataFrame) -> str:
    """What each comparison costs in parameters."""
    if head.empty:
        return "No comparison to show."
    lines = [
        f"- SP {r['sp']:g}, {r['comparison']}: {r['params_dynamic'] / 1e6:.2f}M parameters vs "
        f"{r['params_constant'] / 1e6:.2f}M ({100 * (r['params_dynamic'] / r['params_constant'] - 1):+.1f}%)."
        for _, r in head.iterrows()
    ]
    return (
        "At equal mean width dynamic slicing may keep more parameters than constant slicing; the "
        "equal-parameter budget removes that advantage, so its gain is the one that survives a fair size "
        "match:\n\n" + "\n".join(lines)
    )


def auto_text(auto: pd.DataFrame) -> str:
    """Automatic SB vs the sweep's best."""
    if auto.empty:
        return "This profile runs no automatic SB search."
    lines = [
        f"- SP {r['sp']:g} ({r['comparison']}): picked SB {r['auto_sb']:g} with {r['auto_runs']} slicings "
        f"on a grid of {r['auto_grid']} points; the sweep's best is SB {r['sweep_sb']:g} "
        f"({r['sweep_runs']} runs); perplexity gap {r['ppl_gap_pct']:+.1f}%."
        for _, r in auto.iterrows()
    ]
    return "The automatic search sees only held-out calibration text, never the test split:\n\n" + "\n".join(lines)


def _delta_se(acc: pd.DataFrame | None, r: pd.Series) -> float | None:
    """The standard error (points) of the zero-shot row of ``acc`` matching headline row ``r``, if known."""
    if acc is None or acc.empty or "se_delta_points" not in acc.columns:
        return None
    m = acc[
        (acc["model"] == r["model"])
        & (acc["cal_dataset"] == r["cal_dataset"])
        & (acc["sp"] == r["sp"])
        & (acc["method"] == f"dynamic ({r['comparison']})")
    ]
    v = m["se_delta_points"].iloc[0] if len(m) else None
    return None if v is None or pd.isna(v) else float(v)


def zero_shot_text(head: pd.DataFrame, acc: pd.DataFrame | None = None) -> str:
    """Average accuracy of the best dynamic SB vs constant, each difference with its standard error (from ``acc``,
    :func:`dynslice.publish.report.zero_shot_table`): a difference within two standard errors of zero is called
    no measurable difference, never a gain; only one beyond is set against the paper's up to 5 points."""
    if head.empty or "acc_delta_points" not in head.columns or head["acc_delta_points"].isna().all():
        return "No zero-shot comparison in these runs."
    lines = []
    rows = head[head["acc_delta_points"].notna()]
    several = {k: rows[k].nunique() > 1 for k in ("model", "cal_dataset")}  # the paper profile: name the group
    for _, r in rows.iterrows():
        d = r["acc_delta_points"]
        se = _delta_se(acc, r)
        group = (f"{r['model']}, " if several["model"] else "") + (
            f"calibration {r['cal_dataset']}, " if several["cal_dataset"] else ""
        )
        head_ = (
            f"- {group}SP {r['sp']:g}, {r['comparison']}: average accuracy {r['acc_dynamic']:.3f} vs "
            f"{r['acc_constant']:.3f} "
        )
        if se is not None and abs(d) <= 2 * se:
            lines.append(
                head_ + f"({d:+.1f} ± {se:.1f} points, ±1 standard error): within two standard errors of zero, "
                "so no measurable difference at this sample size."
            )
            continue
        rel = "more than" if d > PAPER_ACC_GAIN_POINTS else "within" if d > 0 else "against"
        err = "" if se is None else f" ± {se:.1f}"
        lines.append(head_ + f"({d:+.1f}{err} points, {rel} the paper's up to {PAPER_ACC_GAIN_POINTS:g}).")
    return (
        "Average zero-shot accuracy, best dynamic SB (by perplexity, never by accuracy) against constant "
        "slicing; error bars and ± are lm-eval's standard errors, combined over the tasks:\n\n" + "\n".join(lines)
    )


def headline_text(head: pd.DataFrame, dataset: str, acc: pd.DataFrame | None = None) -> str:
    """The headline in two sentences: the largest gains found, per comparison. With ``acc`` (the zero-shot
    table), accuracy differences within two standard errors are not called a gain."""
    if head.empty:
        return "No headline comparison in these runs."
    col = f"ppl_{dataset}_change_pct"
    parts = []
    for comparison, g in head.groupby("comparison", sort=False):
        best = g.loc[g[col].idxmin()]
        where = f"(SP {best['sp']:g}, SB {best['best_sb']:g})"
        if best[col] < 0:
            parts.append(f"At **{comparison}**, the best gain is {-best[col]:.1f}% lower {dataset} perplexity {where}.")
        else:
            parts.append(
                f"At **{comparison}**, dynamic slicing gains nothing: at best {best[col]:+.1f}% {dataset} "
                f"perplexity {where}."
            )
    has_acc = "acc_delta_points" in head.columns and head["acc_delta_points"].notna().any()
    noisy = False
    if has_acc:
        rows = head[head["acc_delta_points"].notna()]
        ses = [_delta_se(acc, r) for _, r in rows.iterrows()]
        noisy = all(se is not None and abs(r["acc_delta_points"]) <= 2 * se for (_, r), se in zip(rows.iterrows(), ses))
        parts.append(
            f"Average accuracy moves by {head['acc_delta_points'].min():+.1f} to "
            f"{head['acc_delta_points'].max():+.1f} points"
            + (
                f", each within two standard errors (up to {max(ses):.1f} points) of zero: no measurable change."
                if noisy
                else "."
            )
        )
    top = -float(head[col].min())
    rel = "more than" if top > PAPER_PPL_GAIN_PCT else "within" if top > 0 else "against"
    claim = f"The perplexity gain is {rel} the paper's up to {PAPER_PPL_GAIN_PCT:g}% over SliceGPT"
    if has_acc and not noisy:
        pts = float(head["acc_delta_points"].max())
        acc_rel = "more than" if pts > PAPER_ACC_GAIN_POINTS else "within" if pts > 0 else "against"
        claim += f", the accuracy gain {acc_rel} its up to {PAPER_ACC_GAIN_POINTS:g} points"
    parts.append(claim + " (the paper measured much larger models).")
    return " ".join(parts) + f"\n\n*{BEST_SB_NOTE}*"


def within_noise(change: float, numerical: float, seed_sd: float | None) -> bool:
    """Whether a difference is inside the noise: no larger than the numerical spread measured for it, or than two
    calibration-seed standard deviations."""
    return abs(change) <= numerical or (seed_sd is not None and abs(change) <= 2 * seed_sd)


def noise_text(head: pd.DataFrame, dataset: str, noise: Mapping[str, Any], documents: int | None = None) -> str:
    """Each headline difference next to its numerical spread and its calibration-seed spread; "within noise" where
    it is no larger than either (``noise``: the record of ``bench/bench_numerics.py``)."""
    if head.empty:
        return "No headline comparison in these runs."
    col = f"ppl_{dataset}_change_pct"
    classes = noise["classes"]
    numerical = float(noise["tolerances"]["by_quantity"]["ppl_change_pct"]["largest_seen"])
    ppl_rel = float(noise["tolerances"]["by_quantity"]["ppl_sliced"]["largest_seen"])
    paired = noise["seed_spread"]["paired_change"].get(dataset)
    seed_sd = None if paired is None else float(paired["change_sd_points"])
    seed_note = (
        ""
        if paired is None
        else f" A different calibration seed moves the dynamic-vs-constant difference by sd {seed_sd:.1f} points "
        f"({dataset}, SP {paired['sp']:g}, {paired['budget']} budget, {paired['seeds']} seeds, notebook 06)."
    )
    lines = []
    for _, r in head.iterrows():
        d = float(r[col])
        verdict = "within noise" if within_noise(d, numerical, seed_sd) else "beyond both spreads"
        lines.append(f"- SP {r['sp']:g}, {r['comparison']}: {d:+.1f}% ({verdict}).")
    text = (
        f"**The noise under these numbers.** Recomputed under other thread counts and SIMD levels, and on "
        f"another CPU, a sliced model's perplexity moved by up to {100 * ppl_rel:.2f}% and a % change by up to "
        f"{numerical:.2f} points ({classes['ppl_sliced']['numbers']} perplexities, bench/results/"
        f"numerics_noise.json); run_all.sh pins the arithmetic, so on the CPU kind of the reference its bits "
        f"are reproduced exactly.{seed_note} A difference no larger than the numerical spread or two seed "
        f"standard deviations is within noise:\n\n" + "\n".join(lines)
    )
    if documents and "acc_delta_points" in head.columns and head["acc_delta_points"].notna().any():
        acc = []
        for _, r in head[head["acc_delta_points"].notna()].iterrows():
            p1, p2 = float(r["acc_dynamic"]), float(r["acc_constant"])
            se = 100 * ((p1 * (1 - p1) + p2 * (1 - p2)) / documents) ** 0.5
            d = float(r["acc_delta_points"])
            verdict = "within noise" if abs(d) <= 2 * se else "beyond two standard errors"
            acc.append(f"- SP {r['sp']:g}, {r['comparison']}: {d:+.1f} points, standard error {se:.1f} ({verdict}).")
        text += (
            f"\n\nZero-shot accuracy at {documents} documents per model has a sampling standard error of its "
            "own, far larger than its numerical spread:\n\n" + "\n".join(acc)
        )
    return text
