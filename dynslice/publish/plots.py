"""The notebooks' figures, one function each; every function takes report tables and returns a Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dynslice.publish.report import ppl_columns

BUDGET_COLORS = {"width": "tab:blue", "params": "tab:green"}


def lr_per_layer(scores: Mapping[tuple[str, str], Mapping[str, Any]], models: Sequence[str], corpora: Sequence[str]):
    """Raw and min-max normalised LR per layer: one row per model, one line per corpus."""
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 2.8 * len(models)), squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for corpus in corpora:
            s = scores[(model, corpus)]
            row[0].plot(range(len(s["lr"])), s["lr"], marker="o", ms=3, label=corpus)
            row[1].plot(range(len(s["normalized"])), s["normalized"], marker="o", ms=3, label=corpus)
        row[0].set(title=f"{model}: LR (cosine in/out)", xlabel="layer", ylabel="LR")
        row[1].set(title=f"{model}: min-max normalised", xlabel="layer", ylabel="normalised LR")
        row[0].legend(title="corpus")
    fig.tight_layout()
    return fig


def allocation_steps(steps: pd.DataFrame, sp: float, sb: float, constant_pct: float, title: str):
    """The paper's Figure 1: LR, normalised, divided by the mean, FS, and the slice applied after rounding."""
    panels = [
        ("LR", "LR score", None),
        ("normalised n", "min-max normalised", None),
        ("n / mean(n)", "divided by mean", 1.0),
        ("FS (%)", "FS = SB + (SP-SB) n/mean(n)", None),
        ("sliced after rounding (%)", "sliced (%) after rounding", None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 2.8))
    for ax, (col, name, ref) in zip(axes, panels, strict=True):
        ax.bar(steps["layer"], steps[col], color="tab:blue" if "%" not in col else "tab:orange", width=0.8)
        ax.set(title=name, xlabel="layer")
        if ref is not None:
            ax.axhline(ref, color="k", ls="--", lw=0.8)
    for ax in axes[3:]:
        ax.axhline(100 * sp, color="k", ls="--", lw=0.8, label=f"SP = {sp}")
        ax.axhline(100 * sb, color="grey", ls=":", lw=0.8, label=f"SB = {sb}")
    axes[4].axhline(constant_pct, color="tab:red", lw=1, label="constant (SliceGPT)")
    axes[4].legend(fontsize=7)
    fig.suptitle(title, y=1.03)
    fig.tight_layout()
    return fig


def ppl_vs_sb(frame: pd.DataFrame, sweep_rows: pd.DataFrame, sps: Sequence[float], budgets: Sequence[str]):
    """Perplexity over the SB grid: one panel per SP (columns) and perplexity corpus (rows)."""
    ppl_cols = ppl_columns(frame)
    fig, axes = plt.subplots(len(ppl_cols), len(sps), figsize=(4 * len(sps), 3 * len(ppl_cols)), squeeze=False)
    several = sweep_rows.groupby(["model", "cal_dataset"]).ngroups > 1
    for i, pc in enumerate(ppl_cols):
        for j, sp in enumerate(sps):
            ax = axes[i][j]
            for (model, cal), g in sweep_rows.groupby(["model", "cal_dataset"]):
                tag = f"{model}, cal {cal}" if several else ""
                g = g[g["sp"] == sp]
                const = g[g["kind"] == "constant"]
                for budget in budgets:
                    d = pd.concat([const, g[(g["kind"] == "dynamic") & (g["budget"] == budget)]]).sort_values("sb")
                    ax.plot(
                        d["sb"], d[pc], marker="o", ms=4, color=BUDGET_COLORS[budget], label=f"{budget} budget {tag}"
                    )
                ax.plot(const["sb"], const[pc], marker="*", ms=14, ls="", color="tab:red", label=f"constant {tag}")
                for _, a in g[g["kind"] == "auto"].iterrows():
                    ax.plot(
                        [a["sb"]],
                        [a[pc]],
                        marker="X",
                        ms=9,
                        ls="",
                        color=BUDGET_COLORS[a["budget"]],
                        markeredgecolor="k",
                        label=f"auto SB ({a['budget']}) {tag}",
                    )
            for _, dn in frame[frame["kind"] == "dense"].iterrows():
                ax.axhline(dn[pc], color="grey", ls="--", lw=0.8, label="dense")
            ax.set(title=f"SP = {sp}", xlabel="SB", ylabel=pc.replace("ppl_", "perplexity, "))
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def ppl_vs_params(sweep_rows: pd.DataFrame, dataset: str, title: str):
    """Every run by parameter count and perplexity on ``dataset``."""
    pc = f"ppl_{dataset}"
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = {"constant": "*", "dynamic": "o", "auto": "X", "dense": "s"}
    for (kind, budget), g in sweep_rows.groupby(["kind", "budget"]):
        label = kind if kind in ("constant", "dense") else f"{kind}, {budget} budget"
        color = "tab:red" if kind == "constant" else "grey" if kind == "dense" else BUDGET_COLORS[budget]
        ax.scatter(
            g["params"] / 1e6,
            g[pc],
            marker=markers[kind],
            s=90 if kind == "constant" else 30,
            color=color,
            label=label,
            edgecolor="k",
            linewidth=0.3,
        )
    for _, c in sweep_rows[sweep_rows["kind"] == "constant"].iterrows():
        ax.annotate(
            f"SP={c['sp']:g}", (c["params"] / 1e6, c[pc]), textcoords="offset points", xytext=(6, 4), fontsize=7
        )
    ax.set(xlabel="parameters (millions)", ylabel=f"perplexity ({dataset})", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def zero_shot_bars(acc: pd.DataFrame, title: str):
    """Average accuracy per SP and method; the dense model as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sliced = acc[acc["method"] != "dense"].copy()
    sliced["SP"] = sliced["sp"].map(lambda v: f"{v:.2f}")
    sns.barplot(data=sliced, x="SP", y="acc_average", hue="method", ax=ax)
    for _, d in acc[acc["method"] == "dense"].iterrows():
        ax.axhline(d["acc_average"], color="k", ls="--", lw=0.8, label="dense")
    ax.set(ylabel="average accuracy", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def headline_bars(head: pd.DataFrame, dataset: str, title: str):
    """% perplexity change of the best dynamic SB vs constant per SP and comparison (below zero: dynamic wins)."""
    pc = f"ppl_{dataset}_change_pct"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    h = head.copy()
    h["SP"] = h["sp"].map(lambda v: f"{v:.2f}")
    h["label"] = h["comparison"] + ("" if h["cal_dataset"].nunique() == 1 else ", cal " + h["cal_dataset"])
    if h["model"].nunique() > 1:
        h["label"] = h["model"] + ": " + h["label"]
    sns.barplot(data=h, x="SP", y=pc, hue="label", ax=ax)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(ylabel=f"perplexity change vs constant (%), {dataset}", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
