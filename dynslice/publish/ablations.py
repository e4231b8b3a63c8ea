"""The ablations' results as a reader sees them (notebook 06): summaries with error bars, the gap tests, the
generated answer, the table and the figure. Reads ``ablations.json`` (:func:`dynslice.experiment.ablations.run`
writes it, with its summaries and gap tests); runs nothing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dynslice.experiment.profiles.ablation import METHODS, AblationConfig
from dynslice.experiment.statistics import gap_tests, summarize


# ------------------------------------------------------------------------------------------------ the answer
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
    from dynslice.publish.report import write_table

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
    """Per SP, two panels at the full text width. Left: perplexity vs parameters, one marker per method (filled:
    params budget, hollow: width budget), error bars = sd over seeds or permutations; markers within 0.6 M
    parameters of each other are spread horizontally (the exact counts are in the table). Right: the
    equal-parameter methods side by side, sorted. Both on a linear scale up to 3x constant slicing's perplexity:
    failures beyond it (inverted LR) are named in the panel instead. One legend below the panels."""
    from dynslice.publish.plots import TEXT, dodge, new_figure, style

    cfg = AblationConfig.from_dict(record["config"])
    d = dataset or cfg.ppl_datasets[0]
    fig, axes = new_figure(TEXT, 3.1 * len(cfg.sp) + 0.5, len(cfg.sp), 2, gridspec_kw={"width_ratios": [1.0, 1.0]})
    dense = _find(record["summary"], None, None, "dense")
    with style():
        for (ax, bars), sp in zip(axes, cfg.sp, strict=True):
            rows = [s for s in record["summary"] if s["sp"] in (sp, None)]  # None: the dense model, in every panel
            rows.sort(key=lambda s: (list(MARKERS).index(s["method"]), s["budget"] or ""))
            const = next((s["ppl"][d]["mean"] for s in rows if s["method"] == "constant"), None)
            cap = 3 * const if const else float("inf")
            off = [s for s in rows if s["ppl"][d]["mean"] > cap]
            rows = [s for s in rows if s["ppl"][d]["mean"] <= cap]
            x = [s["params"] / 1e6 for s in rows]
            xs = [a + b for a, b in zip(x, dodge(x, within=0.6, step=0.6), strict=True)]
            seen = set()
            for s, xi in zip(rows, xs, strict=True):
                m, v = s["method"], s["ppl"][d]
                color = f"C{list(MARKERS).index(m)}"
                ax.errorbar(
                    xi,
                    v["mean"],
                    yerr=v["sd"] or 0.0,
                    fmt=MARKERS[m],
                    color=color,
                    mfc="none" if s["budget"] == "width" else color,
                    mew=1.0,
                    ms=5,
                    capsize=2,
                    elinewidth=0.8,
                    label=LABELS[m] if m not in seen else None,
                )
                seen.add(m)
            _off_note(ax, [f"{LABELS[s['method']]} ({s['budget']}): {s['ppl'][d]['mean']:.0f}" for s in off])
            ax.set_title(f"(a) SP = {sp:g}: filled equal params, hollow equal mean width")
            ax.set_xlabel("parameters (millions; points < 0.6 M apart spread out)")
            ax.set_ylabel(f"{d} perplexity (mean ± sd)")
            ax.set_ylim(0, None)
            _bars(bars, record, sp, d, dense)
        handles, labels = axes[0][0].get_legend_handles_labels()
        h2, l2 = axes[0][1].get_legend_handles_labels()
        fig.legend(handles + h2, labels + l2, loc="outside lower center", ncols=5)
    return fig


def _off_note(ax, off: list[str]) -> None:
    """Name the points too far off scale to draw (inverted LR's perplexity is in the thousands)."""
    from dynslice.publish.plots import FONT

    if off:
        ax.text(
            0.98, 0.98, "off scale:\n" + "\n".join(off), transform=ax.transAxes, ha="right", va="top",
            fontsize=FONT["small"], bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.8"},
        )  # fmt: skip


def _bars(ax, record: dict[str, Any], sp: float, d: str, dense: dict | None) -> None:
    """Equal-parameter methods at ``sp``, sorted by perplexity, with their spread; failures named, not drawn."""
    rows = sorted(
        (s for s in record["summary"] if s["sp"] == sp and s["budget"] == "params"), key=lambda s: s["ppl"][d]["mean"]
    )
    const = next((s["ppl"][d]["mean"] for s in rows if s["method"] == "constant"), None)
    cap = 3 * const if const else float("inf")
    shown = [s for s in rows if s["ppl"][d]["mean"] <= cap]
    off = [f"{LABELS[s['method']]}: {s['ppl'][d]['mean']:.0f}" for s in rows if s["ppl"][d]["mean"] > cap]
    ys = range(len(shown))
    ax.barh(
        list(ys),
        [s["ppl"][d]["mean"] for s in shown],
        xerr=[s["ppl"][d]["sd"] or 0.0 for s in shown],
        color=[f"C{list(MARKERS).index(s['method'])}" for s in shown],
        capsize=2,
        error_kw={"elinewidth": 0.8},
    )
    ax.set_yticks(list(ys), [LABELS[s["method"]] + (f" (n={s['n']})" if s["n"] > 1 else "") for s in shown])
    ax.invert_yaxis()
    ax.grid(axis="y", visible=False)
    if dense:
        ax.axvline(dense["ppl"][d]["mean"], color="k", lw=0.8, ls="--", label="dense model")
    _off_note(ax, off)
    ax.set_xlabel(f"{d} perplexity (mean ± sd over n runs)")
    ax.set_title(f"(b) SP = {sp:g}, equal parameters, sorted")
