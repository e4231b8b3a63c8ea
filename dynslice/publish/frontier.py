"""The frontier as a reader sees it (notebook 07): the winner of each size with its margin, the figure, the table
of every point and the generated answer. Reads ``frontier.json`` (:func:`dynslice.experiment.frontier.run` writes
it, with its summary); runs nothing.

"Within noise": a winner's margin over the runner-up is within noise when it is below the measured numerical noise
of slicing (:func:`noise_rel`: twice the largest relative perplexity change of a sliced model seen across thread
counts, SIMD levels and machines, ``dynslice/measured/numerics_noise.json``) or when their seed spreads overlap
(mean ± sd over the calibration seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dynslice.experiment.profiles.frontier import LABELS, METHODS, FrontierConfig

STAGES = ("before", "after")
STAGE_LABELS = {"before": "before RFT", "after": "after RFT"}


# --------------------------------------------------------------------------------------------------- noise
def noise() -> dict[str, float]:
    """The measured numerical noise of a sliced model's perplexity: ``largest_seen`` (relative) and the
    reproduction check's tolerance ``rel`` (its margin x the largest seen)."""
    from dynslice.publish.repro import measured_noise

    q = measured_noise()["tolerances"]["by_quantity"]["ppl_sliced"]
    return {"largest_seen": float(q["largest_seen"]), "rel": float(q["rel"])}


def noise_rel() -> float:
    return noise()["rel"]


def within_noise(best: Mapping[str, Any], runner_up: Mapping[str, Any], rel_noise: float) -> bool:
    """Whether ``best`` (``{"mean", "sd"}``, lower is better) beats ``runner_up`` by no more than the noise: a
    relative margin below ``rel_noise``, or overlapping mean ± sd intervals (a missing sd counts as 0)."""
    margin = (runner_up["mean"] - best["mean"]) / best["mean"]
    overlap = best["mean"] + (best.get("sd") or 0.0) >= runner_up["mean"] - (runner_up.get("sd") or 0.0)
    return margin < rel_noise or overlap


# ------------------------------------------------------------------------------------------------ the tables
def _rows(record: dict[str, Any], size: int) -> list[dict[str, Any]]:
    return [s for s in record["summary"] if s["size"] == size]


def ranking(record: dict[str, Any], size: int, stage: str, dataset: str) -> list[dict[str, Any]]:
    """The methods at ``size`` from best to worst mean perplexity (``stage``, ``dataset``)."""
    return sorted(_rows(record, size), key=lambda s: (s["ppl"][stage][dataset]["mean"], METHODS.index(s["method"])))


def winners(record: dict[str, Any], rel_noise: float | None = None) -> list[dict[str, Any]]:
    """Per size, stage and corpus: the best method, its perplexity, the runner-up, the margin and the verdict."""
    rel_noise = noise_rel() if rel_noise is None else rel_noise
    cfg = FrontierConfig.from_dict(record["config"])
    out = []
    for size in cfg.sizes:
        for stage in STAGES:
            for d in cfg.ppl_datasets:
                order = ranking(record, size, stage, d)
                if not order:
                    continue
                best = order[0]
                b = best["ppl"][stage][d]
                row = {
                    "size": size,
                    "removed": best["target_fraction"],
                    "stage": stage,
                    "dataset": d,
                    "best": best["method"],
                    "ppl": b["mean"],
                    "sd": b["sd"],
                    "runner_up": None,
                    "margin_pct": None,
                    "within_noise": None,
                }
                if len(order) > 1:
                    n = order[1]["ppl"][stage][d]
                    row.update(
                        runner_up=order[1]["method"],
                        margin_pct=100 * (n["mean"] / b["mean"] - 1),
                        within_noise=within_noise(b, n, rel_noise),
                    )
                out.append(row)
    return out


def _pm(v: Mapping[str, Any]) -> str:
    return f"{v['mean']:.2f}" + (f" ± {v['sd']:.2f}" if v.get("sd") is not None else "")


def winner_table(record: dict[str, Any], rel_noise: float | None = None):
    """A DataFrame of :func:`winners` as printed: one row per size, stage and corpus."""
    import pandas as pd

    rows = []
    for w in winners(record, rel_noise):
        rows.append(
            {
                "size": f"{w['size']} layers ({100 * w['removed']:.1f}%)",
                "stage": STAGE_LABELS[w["stage"]],
                "corpus": w["dataset"],
                "best": LABELS[w["best"]],
                "ppl": _pm({"mean": w["ppl"], "sd": w["sd"]}),
                "runner-up": "" if w["runner_up"] is None else LABELS[w["runner_up"]],
                "margin": "" if w["margin_pct"] is None else f"{w['margin_pct']:.1f}%",
                "verdict": "" if w["within_noise"] is None else ("within noise" if w["within_noise"] else "clear"),
            }
        )
    return pd.DataFrame(rows)


def points_table(record: dict[str, Any]):
    """A DataFrame of every method and size: actual fraction removed, parameters, perplexity before and after RFT
    (mean ± sd over seeds), and the zero-shot accuracies (± lm-eval's standard error) where they ran."""
    import pandas as pd

    cfg = FrontierConfig.from_dict(record["config"])
    rows = [
        {
            "size": "dense",
            "method": "dense",
            "removed": "0.0%",
            "params (M)": f"{record['dense']['params'] / 1e6:.2f}",
            **{f"ppl {d} before": f"{record['dense']['ppl'][d]:.2f}" for d in cfg.ppl_datasets},
            **_acc(record["dense"].get("tasks")),
        }
    ]
    for s in record["summary"]:
        first = next(
            (
                p
                for p in record["points"]
                if p["method"] == s["method"] and p["size"] == s["size"] and p["seed"] == cfg.seeds[0]
            ),
            None,
        )
        row = {
            "size": f"{s['size']} ({100 * s['target_fraction']:.1f}%)",
            "method": LABELS[s["method"]],
            "removed": f"{100 * s['fraction_removed']:.1f}%",
            "params (M)": f"{s['params'] / 1e6:.2f}",
        }
        for stage in STAGES:
            for d in cfg.ppl_datasets:
                row[f"ppl {d} {stage}"] = _pm(s["ppl"][stage][d])
        row.update(_acc(None if first is None else first["after"].get("tasks")))
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def _acc(tasks: Mapping[str, Any] | None) -> dict[str, str]:
    out = {}
    for task, v in (tasks or {}).items():
        if task != "average":
            se = v.get("stderr")
            out[f"acc {task}"] = f"{v['value']:.3f}" + (f" ± {se:.3f}" if se is not None else "")
    return out


def write_tables(record: dict[str, Any], stem: str | Path) -> tuple[Path, ...]:
    """``<stem>.{md,tex}`` (every point) and ``<stem>_winners.{md,tex}`` (the best method per size)."""
    from dynslice.publish.report import write_table

    n = noise()
    stem = Path(stem)
    points = write_table(
        points_table(record),
        stem,
        caption="Compression frontier: every method at matched sizes (total parameters removed, embeddings, head "
        "and shortcut matrices counted), wiki/news perplexity mean ± sd over calibration seeds before and after "
        "recovery fine-tuning (RFT); accuracy of the first seed after RFT ± lm-eval standard error",
    )
    wins = write_table(
        winner_table(record, n["rel"]),
        stem.with_name(stem.name + "_winners"),
        caption=f"Best method per size; 'within noise': margin below the measured numerical noise of slicing "
        f"({100 * n['rel']:.0f}%) or overlapping seed spreads (mean ± sd)",
    )
    return (*points, *wins)


# ---------------------------------------------------------------------------------------------------- figure
def figure(record: dict[str, Any]):
    """Perplexity against the fraction of total parameters removed, one panel per corpus (full text width), one
    colour and marker per method; dashed: before RFT, solid: after; error bars: sd over the calibration seeds;
    the dense model as a dotted line. Log scale (deleting many layers costs orders of magnitude)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from dynslice.publish.plots import TEXT, new_figure, style

    cfg = FrontierConfig.from_dict(record["config"])
    fig, axes = new_figure(TEXT, 2.9, 1, len(cfg.ppl_datasets))
    markers = {"constant": "s", "lr": "o", "shortgpt": "h", "delete_slice": "D"}
    with style():
        for ax, d in zip(axes[0], cfg.ppl_datasets, strict=True):
            for i, m in enumerate(cfg.methods):
                rows = sorted((s for s in record["summary"] if s["method"] == m), key=lambda s: s["size"])
                x = [100 * s["fraction_removed"] for s in rows]
                for stage, ls, fill in (("before", "--", "none"), ("after", "-", f"C{i}")):
                    ax.errorbar(
                        x,
                        [s["ppl"][stage][d]["mean"] for s in rows],
                        yerr=[s["ppl"][stage][d]["sd"] or 0.0 for s in rows],
                        color=f"C{i}",
                        ls=ls,
                        marker=markers[m],
                        mfc=fill,
                        ms=4,
                        capsize=2,
                        elinewidth=0.8,
                        label=f"{LABELS[m]}, {STAGE_LABELS[stage]}",
                    )
            ax.axhline(record["dense"]["ppl"][d], color="k", lw=0.8, ls=":", label="dense model")
            ax.set_yscale("log")  # plain numbers as tick labels (no superscripts below the smallest font)
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{d}")
            ax.set_xlabel("total parameters removed (%)")
            ax.set_ylabel(f"{d} perplexity (log scale; mean ± sd)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=3)
    return fig


def figure_note(record: dict[str, Any]) -> str:
    """A reading of :func:`figure`: per size, the methods after RFT from best to worst on the first corpus."""
    cfg = FrontierConfig.from_dict(record["config"])
    d = cfg.ppl_datasets[0]
    parts = []
    for size in cfg.sizes:
        order = ranking(record, size, "after", d)
        if order:
            parts.append(
                f"{100 * order[0]['target_fraction']:.1f}% removed: "
                + ", ".join(f"{LABELS[s['method']]} {s['ppl']['after'][d]['mean']:.1f}" for s in order)
            )
    return (
        f"After RFT, {d} perplexity from best to worst at each size (mean over {len(cfg.seeds)} seeds): "
        + "; ".join(parts)
        + f". Dense: {record['dense']['ppl'][d]:.2f}. Dashed lines are the same models before RFT."
    )


# ---------------------------------------------------------------------------------------------------- answer
def _recovery(record: dict[str, Any], method: str, d: str) -> list[float]:
    """Per size, the share of the perplexity lost to compression that RFT wins back (in log perplexity)."""
    dense = math.log(record["dense"]["ppl"][d])
    out = []
    for s in sorted((s for s in record["summary"] if s["method"] == method), key=lambda s: s["size"]):
        before, after = math.log(s["ppl"]["before"][d]["mean"]), math.log(s["ppl"]["after"][d]["mean"])
        out.append((before - after) / (before - dense) if before > dense else float("nan"))
    return out


def _sizes_text(sizes: Sequence[str]) -> str:
    return sizes[0] if len(sizes) == 1 else ", ".join(sizes[:-1]) + " and " + sizes[-1]


def answer(record: dict[str, Any], rel_noise: float | None = None) -> str:
    """One paragraph generated from the record: who wins where (after and before RFT), what RFT recovers per
    method, how sizes were matched, the noise, and what it does not say about 7-8B models."""
    n = noise() if rel_noise is None else {"rel": rel_noise, "largest_seen": rel_noise / 2}
    cfg = FrontierConfig.from_dict(record["config"])
    d = cfg.ppl_datasets[0]
    wins = [w for w in winners(record, n["rel"]) if w["dataset"] == d]
    parts = []
    for stage in ("after", "before"):
        by_method: dict[str, list[str]] = {}
        for w in (w for w in wins if w["stage"] == stage):
            tag = f"{100 * w['removed']:.0f}%"
            if w["within_noise"]:
                tag += f" (within noise of {LABELS[w['runner_up']]}, {w['margin_pct']:.1f}%)"
            elif w["margin_pct"] is not None:
                tag += f" (by {w['margin_pct']:.0f}% over {LABELS[w['runner_up']]})"
            by_method.setdefault(w["best"], []).append(tag)
        said = "; ".join(f"{LABELS[m]} wins at {_sizes_text(t)} removed" for m, t in by_method.items())
        parts.append(f"{'After' if stage == 'after' else 'Before'} RFT, on {d} perplexity: {said}.")
    rec = []
    for m in cfg.methods:
        r = [x for x in _recovery(record, m, d) if math.isfinite(x)]
        if r:
            rec.append(f"{LABELS[m]} {100 * min(r):.0f}–{100 * max(r):.0f}%")
    rec = rec or ["none measurable (no compressed model is worse than the dense one)"]
    parts.append(
        f"RFT ({record['rft']['steps']} LoRA steps of {record['rft']['batch_size'] * record['rft']['grad_accum']} × "
        f"{record['rft']['seqlen']} tokens) wins back this share of the log-perplexity lost to compression, "
        "smallest to largest over the sizes: " + ", ".join(rec) + "."
        f" RFT trains on the {record['rft']['dataset']} training split and the dense model is not fine-tuned, so "
        f"part of a gain on {record['rft']['dataset']} may be adaptation to that corpus; "
        + ("the other corpora are outside it." if len(cfg.ppl_datasets) > 1 else "no other corpus checks it.")
    )
    fr = [s["fraction_removed"] - s["target_fraction"] for s in record["summary"]]
    parts.append(
        f"Sizes are matched to whole-layer deletion (the coarsest method): every slicing takes the SP whose total "
        f"parameter count is closest to the target, off by at most {100 * max(abs(x) for x in fr):.2f} points; "
        f"error bars are the sd over {len(cfg.seeds)} calibration seeds, and the numerical noise of slicing is "
        f"{100 * n['largest_seen']:.1f}% of perplexity at most (margins below {100 * n['rel']:.0f}% are called "
        "within noise)."
    )
    parts.append(
        f"This is one {record['dense_params'] / 1e6:.0f}M-parameter model whose embedding matrix alone is "
        f"{100 * record['dims']['vocab'] * record['dims']['hidden'] / record['dense_params']:.0f}% of its "
        "parameters and which slicing unties from the head (one more copy), so slicing pays a fixed cost that a "
        "7–8B model (embeddings a few % of it) barely pays, and "
        f"its RFT is a few minutes of CPU, not the paper-scale fine-tuning; the ranking here says which method "
        "degrades least on a small model at these sizes, not how the paper's Llama-3-8B or Mistral-7B rank, which "
        "needs the same profile run on them."
    )
    return " ".join(parts)
