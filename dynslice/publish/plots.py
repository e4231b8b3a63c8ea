"""The notebooks' figures, one function each; every function takes report tables and returns a Figure.

Every figure is drawn in one shared style (:data:`STYLE`, applied by :func:`style`): the exact width of one ACL
column (:data:`COLUMN`, 3.3 in) or of the full text (:data:`TEXT`, 6.9 in), fonts of at least 7 pt at that size,
TrueType fonts embedded, a layout computed to fit the page (saved without cropping, so the PDF page has the figure's
width). Titles name what a panel shows, never the run or profile; perplexity is unitless (``exp`` of the mean
negative log-likelihood per token), accuracies are fractions of documents with lm-eval's standard error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, NullFormatter

from dynslice.publish.report import ppl_columns

#: Widths (inches) a venue accepts: one ACL column, and the full text width.
COLUMN = 3.3
TEXT = 6.9
#: The smallest font size (points) any text of a figure may have.
MIN_FONT_PT = 7.0
#: Font sizes (points), named by use, so that no figure sets a size of its own.
FONT = {"text": 8.0, "small": 7.0}

#: The one style of every figure (matplotlib rcParams). Font sizes are absolute points, never relative names
#: ("small" is 0.833 x font.size), so that each can be checked against :data:`MIN_FONT_PT`.
STYLE: dict[str, Any] = {
    "figure.constrained_layout.use": True,
    "figure.constrained_layout.h_pad": 0.02,
    "figure.constrained_layout.w_pad": 0.02,
    "figure.dpi": 110,
    "savefig.dpi": 300,
    "pdf.fonttype": 42,  # TrueType, embedded
    "ps.fonttype": 42,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": FONT["text"],
    "axes.titlesize": FONT["text"],
    "axes.labelsize": FONT["text"],
    "figure.titlesize": FONT["text"],
    "figure.labelsize": FONT["text"],
    "xtick.labelsize": FONT["small"],
    "ytick.labelsize": FONT["small"],
    "legend.fontsize": FONT["small"],
    "legend.title_fontsize": FONT["small"],
    "axes.titlepad": 3.0,
    "axes.labelpad": 2.0,
    "axes.linewidth": 0.6,
    "axes.grid": True,
    "axes.axisbelow": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "grid.color": "0.88",
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.0,
    "lines.markersize": 4.0,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "legend.frameon": True,
    "legend.framealpha": 0.9,
    "legend.edgecolor": "0.8",
    "legend.borderpad": 0.3,
    "legend.handlelength": 1.6,
    "legend.labelspacing": 0.3,
    "errorbar.capsize": 2.0,
}
#: The font-size settings of :data:`STYLE` (each at least :data:`MIN_FONT_PT`).
FONT_KEYS = tuple(k for k in STYLE if k == "font.size" or k.endswith(("labelsize", "titlesize", "fontsize")))

BUDGET_COLORS = {"width": "tab:blue", "params": "tab:green"}
CONSTANT_COLOR = "tab:red"
PPL_UNIT = "perplexity (lower is better)"


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The figures' style, for the figures created inside the block."""
    with plt.rc_context(STYLE):
        yield


def use_style() -> None:
    """Make :data:`STYLE` the session's default (the notebooks' setup calls it)."""
    plt.rcParams.update(STYLE)


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    """``plt.subplots`` in :data:`STYLE` at ``width`` (:data:`COLUMN` or :data:`TEXT`) x ``height`` inches."""
    if width not in (COLUMN, TEXT):
        raise ValueError(f"figure width {width} in: use COLUMN ({COLUMN}) or TEXT ({TEXT})")
    with style():
        return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)


def _plain_log(ax, axis: str = "y") -> None:
    """Log scale with plain numbers as tick labels (no superscripts, which would fall below the smallest font)."""
    getattr(ax, f"set_{axis}scale")("log")
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def dodge(xs: Sequence[float], within: float, step: float) -> np.ndarray:
    """Offsets that spread points closer than ``within`` along x by ``step`` each, centred on their cluster, so that
    no marker hides another (the order of ``xs`` is kept within a cluster)."""
    xs = np.asarray(xs, dtype=float)
    out = np.zeros(len(xs))
    order = np.argsort(xs, kind="stable")
    clusters: list[list[int]] = []
    for i in order:
        if clusters and xs[i] - xs[clusters[-1][0]] <= within:
            clusters[-1].append(int(i))
        else:
            clusters.append([int(i)])
    for c in clusters:
        c.sort()  # the caller's order within a cluster
        for k, i in enumerate(c):
            out[i] = (k - (len(c) - 1) / 2) * step
    return out


def _pct_label(values: pd.Series | Sequence[float]) -> list[str]:
    return [f"{v:.2f}" for v in values]


# ------------------------------------------------------------------------------------------------- the figures
def lr_per_layer(scores: Mapping[tuple[str, str], Mapping[str, Any]], models: Sequence[str], corpora: Sequence[str]):
    """Raw and min-max normalised LR per layer: one row per model, one line per corpus (full text width)."""
    fig, axes = new_figure(TEXT, 1.9 * len(models) + 0.2, len(models), 2)
    with style():
        for row, model in zip(axes, models, strict=True):
            for k, corpus in enumerate(corpora):
                s = scores[(model, corpus)]
                marker = "os^Dv"[k % 5]
                row[0].plot(range(len(s["lr"])), s["lr"], marker=marker, ms=3, label=corpus)
                row[1].plot(range(len(s["normalized"])), s["normalized"], marker=marker, ms=3, label=corpus)
            who = f"{model}: " if len(models) > 1 else ""
            row[0].set(title="LR per layer", xlabel="layer index", ylabel=f"{who}LR (cosine similarity)")
            row[1].set(title="LR min-max normalised (input to the allocation)", xlabel="layer index")
            row[1].set_ylabel(f"{who}normalised LR (0 to 1)")
            row[0].legend(title="LR corpus", loc="lower right")
    return fig


def allocation_steps(steps: pd.DataFrame, sp: float, sb: float, constant_pct: float, title: str | None = None):
    """The paper's Figure 1 (full text width, 2 x 3 panels): LR, normalised, divided by the mean, FS, and the slice
    applied after rounding; the sixth cell holds the legend. Layer 0 is marked with its value in every panel (its
    LR can be ~0, which a bar alone would not show). ``title`` is accepted for compatibility and not drawn: the
    caption of the paper says what the figure shows."""
    del title
    panels = [
        ("LR", "(a) LR score", "LR (cosine similarity)", None),
        ("normalised n", "(b) min-max normalised", "n (0 to 1)", None),
        ("n / mean(n)", "(c) divided by the mean", "n / mean(n)", 1.0),
        ("FS (%)", "(d) FS = SB + (SP - SB) n / mean(n)", "slice fraction FS (%)", None),
        ("sliced after rounding (%)", "(e) slice applied after rounding", "sliced (% of width)", None),
    ]
    fig, axes = new_figure(TEXT, 3.5, 2, 3)
    flat = list(axes.flat)
    with style():
        for ax, (col, name, ylabel, ref) in zip(flat, panels, strict=False):
            pct = "%" in col
            color = "tab:orange" if pct else "tab:blue"
            ax.bar(steps["layer"], steps[col], color=color, width=0.8, label="dynamic (per layer)" if pct else None)
            v0 = float(steps[col].iloc[0])
            top = float(steps[col].max())
            ymax = 1.35 * top if top > 0 else 1.0
            ax.set_ylim(0, ymax)
            ax.plot([0], [v0], marker="o", color="k", ms=3, ls="", zorder=4, clip_on=False)
            ax.annotate(  # above the bars, with an arrow down to layer 0's value (its bar can be ~0 high)
                f"layer 0: {v0:.3g}",
                xy=(0, v0),
                xytext=(0, 0.9 * ymax),
                fontsize=FONT["small"],
                ha="left",
                va="center",
                arrowprops={"arrowstyle": "->", "lw": 0.6, "shrinkA": 0, "shrinkB": 2, "relpos": (0, 0.5)},
            )
            ax.set(title=name, xlabel="layer index", ylabel=ylabel)
            if ref is not None:
                ax.axhline(ref, color="k", ls="--", lw=0.8)
        for ax in flat[3:5]:
            ax.axhline(100 * sp, color="k", ls="--", lw=0.8, label=f"SP = {sp:g} (mean slice)")
            ax.axhline(100 * sb, color="0.4", ls=":", lw=1.0, label=f"SB = {sb:g} (least slice)")
        flat[4].axhline(constant_pct, color=CONSTANT_COLOR, lw=1.0, label="constant (SliceGPT)")
        handles, labels = flat[4].get_legend_handles_labels()
        flat[5].axis("off")
        flat[5].legend(handles, labels, loc="center", title=f"SP = {sp:g}, SB = {sb:g}")
    return fig


def ppl_vs_sb(frame: pd.DataFrame, sweep_rows: pd.DataFrame, sps: Sequence[float], budgets: Sequence[str]):
    """Perplexity over the SB grid: one panel per SP (columns) and perplexity corpus (rows), full text width; the
    legend below the panels. The automatic SB (hollow diamond) is drawn on top of the grid's points."""
    ppl_cols = ppl_columns(frame)
    fig, axes = new_figure(TEXT, 1.9 * len(ppl_cols) + 0.6, len(ppl_cols), len(sps))
    several = sweep_rows.groupby(["model", "cal_dataset"]).ngroups > 1
    with style():
        for i, pc in enumerate(ppl_cols):
            for j, sp in enumerate(sps):
                ax = axes[i][j]
                for (model, cal), g in sweep_rows.groupby(["model", "cal_dataset"]):
                    tag = f" ({model}, cal {cal})" if several else ""
                    g = g[g["sp"] == sp]
                    const = g[g["kind"] == "constant"]
                    for budget in budgets:
                        d = pd.concat([const, g[(g["kind"] == "dynamic") & (g["budget"] == budget)]]).sort_values("sb")
                        ax.plot(
                            d["sb"], d[pc], marker="o", ms=3, color=BUDGET_COLORS[budget], label=f"{budget} budget{tag}"
                        )
                    ax.plot(
                        const["sb"], const[pc], marker="*", ms=9, ls="", color=CONSTANT_COLOR, label=f"constant{tag}"
                    )
                    for _, a in g[g["kind"] == "auto"].iterrows():
                        ax.plot(
                            [a["sb"]],
                            [a[pc]],
                            marker="D",
                            ms=7,
                            ls="",
                            mfc="none",
                            mew=1.3,
                            color="k",
                            zorder=5,
                            label=f"automatic SB ({a['budget']} budget){tag}",
                        )
                for _, dn in frame[frame["kind"] == "dense"].iterrows():
                    ax.axhline(dn[pc], color="0.4", ls="--", lw=0.8, label="dense")
                grid = sorted(sweep_rows.loc[sweep_rows["sp"] == sp, "sb"].unique())
                if 1 < len(grid) <= 7:
                    ax.set_xticks(grid, [f"{v:g}" for v in grid])
                ds = pc.removeprefix("ppl_")
                ax.set(title=f"SP = {sp:g}, {ds}", xlabel="slicing base SB (fraction)")
                ax.set_ylabel(f"{ds} {PPL_UNIT}" if j == 0 else f"{ds} perplexity")
        _figure_legend(fig, axes[0][0], ncols=4)
    return fig


def _figure_legend(fig, ax, ncols: int) -> None:
    """One legend for the figure, below its panels (never over data); duplicates dropped."""
    handles, labels = [], []
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(labels)))


def ppl_vs_params(sweep_rows: pd.DataFrame, dataset: str, title: str | None = None):
    """Every run by parameter count and perplexity on ``dataset`` (one column). Runs within 0.3 M parameters of
    each other (the params-budget runs sit on the constant run's count) are spread horizontally by 0.4 M; the
    automatic SB is drawn last, as a hollow diamond around the grid point it chose. ``title`` is not drawn."""
    del title
    pc = f"ppl_{dataset}"
    fig, axes = new_figure(COLUMN, 3.0)
    ax = axes[0][0]
    order = {"dense": 0, "constant": 1, "dynamic": 2, "auto": 3}
    rows = sweep_rows.assign(_o=sweep_rows["kind"].map(order)).sort_values(["_o", "budget", "sb"], kind="stable")
    solid = rows[rows["kind"] != "auto"]
    x = solid["params"].to_numpy() / 1e6
    xs = x + dodge(x, within=0.3, step=0.4)
    dodged = pd.Series(xs, index=solid.index)
    styles = {
        "constant": {"marker": "*", "s": 70},
        "dense": {"marker": "s", "s": 22},
        "dynamic": {"marker": "o", "s": 18},
    }
    with style():
        for (k, budget), g in solid.groupby(["kind", "budget"], sort=False):
            label = k if k in ("constant", "dense") else f"dynamic, {budget} budget"
            color = CONSTANT_COLOR if k == "constant" else "0.4" if k == "dense" else BUDGET_COLORS[budget]
            ax.scatter(dodged[g.index], g[pc], color=color, label=label, edgecolor="k", linewidth=0.3, **styles[k])
        for (_, budget), g in rows[rows["kind"] == "auto"].groupby(["kind", "budget"], sort=False):
            # on the point of the grid run it chose (same SB, so the same model): at that run's dodged position
            at = []
            for _, a in g.iterrows():
                same = solid[
                    (solid["kind"] == "dynamic") & (solid["budget"] == a["budget"]) & np.isclose(solid["sb"], a["sb"])
                ]
                same = same[np.isclose(same["sp"], a["sp"]) & np.isclose(same["params"], a["params"])]
                at.append(dodged[same.index[0]] if len(same) else a["params"] / 1e6)
            ax.scatter(
                at, g[pc], marker="D", s=60, facecolor="none", edgecolor="k", linewidth=1.1, zorder=5,
                label=f"automatic SB ({budget} budget)",
            )  # fmt: skip
        for _, c in solid[solid["kind"] == "constant"].iterrows():
            ax.annotate(
                f"SP {c['sp']:g}",
                (dodged[c.name], c[pc]),
                textcoords="offset points",
                xytext=(5, 2),
                fontsize=FONT["small"],
            )
        ax.set(xlabel="parameters (millions)", ylabel=f"{dataset} {PPL_UNIT}")
        ax.legend(loc="upper right")
    return fig


def _avg_se(row: Mapping[str, Any]) -> float:
    v = row.get("se_average")
    return float("nan") if v is None or pd.isna(v) else float(v)


def zero_shot_bars(acc: pd.DataFrame, title: str | None = None):
    """Average accuracy per SP and method with ±1 standard error (lm-eval's, combined over the tasks); the dense
    model as a dashed line with its band (one column). With several models or calibration sets (the paper
    profile), each (model, calibration set, SP) is its own group of bars, labelled with what varies. ``title`` is not
    drawn."""
    del title
    fig, axes = new_figure(COLUMN, 2.6)
    ax = axes[0][0]
    sliced = acc[acc["method"] != "dense"].copy()
    groups = list(dict.fromkeys(zip(sliced["model"], sliced["cal_dataset"], sliced["sp"])))
    groups.sort(key=lambda g: (g[0], g[1], g[2]))
    several = {k: len({g[k] for g in groups}) > 1 for k in (0, 1)}
    methods = list(dict.fromkeys(sliced["method"]))
    width = 0.8 / max(len(methods), 1)
    colors = {
        m: (CONSTANT_COLOR if m == "constant" else BUDGET_COLORS["params" if "param" in m else "width"])
        for m in methods
    }
    with style():
        for k, m in enumerate(methods):
            rows = {(r["model"], r["cal_dataset"], r["sp"]): r for _, r in sliced[sliced["method"] == m].iterrows()}
            at = [i for i, g in enumerate(groups) if g in rows]
            pos = [i + (k - (len(methods) - 1) / 2) * width for i in at]
            vals = [rows[groups[i]]["acc_average"] for i in at]
            errs = [_avg_se(rows[groups[i]]) for i in at]
            ax.bar(pos, vals, width=width * 0.95, yerr=errs, color=colors[m], label=m, capsize=2,
                   error_kw={"elinewidth": 0.8})  # fmt: skip
        dense = acc[acc["method"] == "dense"]
        for _, d in dense.iterrows():
            se = _avg_se(d)
            name = f"dense {d['model']}" if len(dense) > 1 else "dense"
            ax.axhline(d["acc_average"], color="k", ls="--", lw=0.8, label=f"{name} (band: ±1 s.e.)")
            if se == se:
                ax.axhspan(d["acc_average"] - se, d["acc_average"] + se, color="0.5", alpha=0.15, lw=0)
        labels = [
            "\n".join([*([str(g[0])] if several[0] else []), *([str(g[1])] if several[1] else []), f"{g[2]:.2f}"])
            for g in groups
        ]
        ax.set_xticks(range(len(groups)), labels)
        ax.set(xlabel="mean slice fraction SP", ylabel="average accuracy (fraction, ±1 s.e.)")
        ax.set_ylim(0, 1.0)
        ax.legend(loc="upper right")
    return fig


def headline_bars(head: pd.DataFrame, dataset: str, title: str | None = None):
    """% perplexity change of the best dynamic SB vs constant per SP and comparison (below zero: dynamic wins),
    one column, legend above the axes. ``title`` is not drawn."""
    del title
    pc = f"ppl_{dataset}_change_pct"
    h = head.copy()
    h["label"] = h["comparison"] + ("" if h["cal_dataset"].nunique() == 1 else ", cal " + h["cal_dataset"])
    if h["model"].nunique() > 1:
        h["label"] = h["model"] + ": " + h["label"]
    labels = list(dict.fromkeys(h["label"]))
    sps = sorted(h["sp"].unique())
    fig, axes = new_figure(COLUMN, 2.7)
    ax = axes[0][0]
    width = 0.8 / max(len(labels), 1)
    with style():
        for k, lab in enumerate(labels):
            g = h[h["label"] == lab].set_index("sp")
            pos = [i + (k - (len(labels) - 1) / 2) * width for i, sp in enumerate(sps) if sp in g.index]
            vals = [g.loc[sp, pc] for sp in sps if sp in g.index]
            color = BUDGET_COLORS["params" if "param" in lab else "width"] if len(labels) <= 2 else f"C{k}"
            ax.bar(pos, vals, width=width * 0.95, color=color, label=lab)
            for p, v in zip(pos, vals, strict=True):
                ax.annotate(f"{v:+.1f}", (p, v), textcoords="offset points", xytext=(0, -2 if v < 0 else 2),
                            ha="center", va="top" if v < 0 else "bottom", fontsize=FONT["small"])  # fmt: skip
        ax.axhline(0, color="k", lw=0.8)
        lo = min(0.0, float(h[pc].min()))
        ax.set_ylim(1.2 * lo if lo < 0 else -1, max(2.0, 0.1 * abs(lo)))
        ax.set_xticks(range(len(sps)), [f"{v:.2f}" for v in sps])
        ax.set(xlabel="mean slice fraction SP", ylabel=f"{dataset} perplexity change\nvs constant (%)")
        fig.legend(loc="outside upper center", ncols=1, title="best dynamic SB at")
    return fig
