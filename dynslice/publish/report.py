"""Tables from run records: the sweep table, best dynamic SB vs constant, automatic SB vs the sweep, zero-shot.

Records are the JSON files :func:`dynslice.experiment.pipeline.run` writes. :func:`records_frame` flattens them into a
pandas
DataFrame with one row per run; the headline functions compare rows and return DataFrames; :func:`write_table`
writes one as Markdown and LaTeX (atomically).

Two comparisons are kept apart and labelled: ``budget == "width"`` is the paper's comparison (dynamic and constant
slicing at equal *mean width*, i.e. mean slice fraction SP), ``budget == "params"`` compares them at equal
*parameter count*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dynslice.core.search import best_sb_key
from dynslice.experiment.config import AUTO, RunConfig
from dynslice.experiment.protocol import best_sb_dataset
from dynslice.store.outputs import atomic_write

COMPARISON = {"width": "equal mean width (paper)", "params": "equal parameters"}
KEY = ["model", "cal_dataset", "budget", "sp"]


def kind(rec: Mapping[str, Any]) -> str:
    """``dense``, ``constant`` (SB = SP), ``auto`` (SB searched) or ``dynamic`` (fixed SB < SP)."""
    cfg = rec["config"]
    if cfg["sp"] == 0:
        return "dense"
    if cfg["sb"] == AUTO:
        return "auto"
    return "constant" if math.isclose(cfg["sb"], cfg["sp"]) else "dynamic"


def records_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record: identity (model, cal_dataset, budget, sp, sb, kind), params, ppl_<ds>, acc_<task>."""
    rows = []
    for rec in records:
        cfg = rec["config"]
        alloc = rec.get("allocation") or {}
        row: dict[str, Any] = {
            "model": cfg["model"],
            "cal_dataset": cfg["cal_dataset"],
            "protocol": cfg.get("protocol", "dynslice"),
            "budget": cfg["budget"],
            "sp": float(cfg["sp"]),
            "sb": float(rec["sb"]),
            "kind": kind(rec),
            "zero_shot": bool(cfg["tasks"]),
            "params": rec["params"]["total"],
            "params_dense": rec["params"]["dense"],
            "fraction_removed": rec["params"]["fraction_removed"],
            "mean_slice": alloc.get("mean_effective_fraction", 0.0),
            "time_s": sum(float(v) for k, v in rec.get("timings_s", {}).items() if k != "load"),
            "eval_time_s": float(rec.get("timings_s", {}).get("eval", 0.0)),
            "key": Path(rec["path"]).stem if "path" in rec else "",
            "path": rec.get("path", ""),
        }
        for ds, value in rec["ppl"].items():
            row[f"ppl_{ds}"] = value
        for task, res in (rec.get("tasks") or {}).items():
            row[f"acc_{task}"] = res["value"]
            row[f"se_{task}"] = res.get("stderr")
        if row.get("se_average") is None and rec.get("tasks"):
            row["se_average"] = average_stderr(rec["tasks"])
        if "auto_sb" in rec:
            row.update(
                auto_n_evals=rec["auto_sb"]["n_evals"],
                auto_grid_size=rec["auto_sb"]["grid_size"],
                auto_time_s=rec["auto_sb"]["time_s"],
            )
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(
            ["model", "cal_dataset", "sp", "budget", "sb"], ascending=[True, True, True, True, False]
        )
    return frame.reset_index(drop=True)


def average_stderr(tasks: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The standard error of the unweighted average accuracy over ``tasks`` (lm-eval's per-task ``stderr``,
    tasks independent): sqrt(sum se_i^2) / k. ``None`` when a task has none."""
    ses = [res.get("stderr") for task, res in tasks.items() if task != "average"]
    if not ses or any(se is None for se in ses):
        return None
    return math.sqrt(sum(float(se) ** 2 for se in ses)) / len(ses)


def ppl_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("ppl_")]


def acc_columns(frame: pd.DataFrame) -> list[str]:
    cols = [c for c in frame.columns if c.startswith("acc_") and c != "acc_average"]
    return cols + (["acc_average"] if "acc_average" in frame.columns else [])


def pct_change(new: float, old: float) -> float:
    """``100·(new - old)/old``: negative means ``new`` is lower (better, for perplexity)."""
    if old == 0 or not math.isfinite(old):
        raise ValueError(f"old: {old!r} must be a finite non-zero perplexity")
    return 100.0 * (new - old) / old


# --------------------------------------------------------------------------------------------------- headlines
def pick_best(rows: pd.DataFrame, col: str) -> pd.Series:
    """The row with the lowest ``col``; ties go to the larger SB (:func:`dynslice.core.search.best_sb_key`)."""
    if rows.empty:
        raise ValueError(f"rows: no candidate rows to choose the best {col} from")
    return rows.iloc[
        min(range(len(rows)), key=lambda i: best_sb_key(float(rows[col].iloc[i]), float(rows["sb"].iloc[i])))
    ]


def _constants(frame: pd.DataFrame) -> dict[tuple, pd.Series]:
    """Constant-slicing rows keyed by (model, cal_dataset, sp); they serve both budgets (SB = SP is the same run)."""
    out = {}
    for _, row in frame[frame["kind"] == "constant"].iterrows():
        key = (row["model"], row["cal_dataset"], row["sp"])
        if key not in out or (row["zero_shot"] and not out[key]["zero_shot"]):
            out[key] = row
    return out


def best_vs_constant(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Best fixed-SB dynamic run vs constant slicing per (model, cal_dataset, budget, sp), chosen on ``dataset``
    under dynslice's protocol and on the group's own calibration corpus under ``reference``
    (:func:`dynslice.experiment.protocol.best_sb_dataset`).

    Rows: per model, corpus and SP, the paper's comparison (width) first. Columns: the key, ``comparison`` (label
    of the budget), ``best_sb``, ``params_constant``, ``params_dynamic``,
    and for every perplexity corpus ``ppl_<ds>_constant``, ``ppl_<ds>_dynamic`` and ``ppl_<ds>_change_pct``
    (negative = dynamic better). ``n_sb`` counts the dynamic SB values compared. Zero-shot copies of runs are
    not candidates (they repeat a sweep run with tasks added).
    """
    col = f"ppl_{dataset}"
    if col not in frame.columns:
        raise ValueError(f"dataset: {dataset!r} has no perplexity in these records ({', '.join(ppl_columns(frame))})")
    consts = _constants(frame)
    dyn = frame[(frame["kind"] == "dynamic") & ~frame["zero_shot"]]
    rows = []
    for key, group in dyn.groupby(KEY, sort=True):
        model, cal, budget, sp = key
        const = consts.get((model, cal, sp))
        protocol = group["protocol"].iloc[0] if "protocol" in group.columns else "dynslice"
        choose = f"ppl_{best_sb_dataset(protocol, cal, dataset)}"
        group = group[group[choose].notna()] if choose in group.columns else group.iloc[0:0]
        if const is None or group.empty:
            continue
        best = pick_best(group, choose)
        row = {
            "model": model,
            "cal_dataset": cal,
            "budget": budget,
            "comparison": COMPARISON[budget],
            "sp": sp,
            "best_sb": best["sb"],
            "n_sb": len(group),
            "params_constant": int(const["params"]),
            "params_dynamic": int(best["params"]),
        }
        for pc in ppl_columns(frame):
            if pd.notna(best.get(pc)) and pd.notna(const.get(pc)):
                row[f"{pc}_constant"] = const[pc]
                row[f"{pc}_dynamic"] = best[pc]
                row[f"{pc}_change_pct"] = pct_change(best[pc], const[pc])
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], r["cal_dataset"], r["sp"], list(COMPARISON).index(r["budget"])))
    return pd.DataFrame(rows)


def _se(row: Mapping[str, Any]) -> dict[str, float | None]:
    """``se_average`` of a frame row (``None`` when the record has no standard errors)."""
    v = row.get("se_average")
    return {"se_average": None if v is None or pd.isna(v) else float(v)}


def _se_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
    """The standard error of 100·(average accuracy of ``a`` − of ``b``) in points (independent samples)."""
    sa, sb = _se(a)["se_average"], _se(b)["se_average"]
    return None if sa is None or sb is None else 100.0 * math.sqrt(sa**2 + sb**2)


def zero_shot_table(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Accuracy rows: dense, then per (model, cal_dataset, sp) constant and the zero-shot run(s) of the best SB.

    ``method`` is ``dense``, ``constant`` or ``dynamic (<comparison>)``; ``delta_points`` is the average accuracy
    minus constant's, in percentage points (100·Δacc); ``se_average`` is the average accuracy's standard error
    (:func:`average_stderr`) and ``se_delta_points`` that of ``delta_points``.
    """
    acc = acc_columns(frame)
    if not acc:
        return pd.DataFrame()
    zs = frame[frame["zero_shot"]]
    best = best_vs_constant(frame, dataset) if f"ppl_{dataset}" in frame.columns else pd.DataFrame()
    rows = []
    for _, row in zs[zs["kind"] == "dense"].iterrows():
        rows.append(
            {
                "model": row["model"],
                "cal_dataset": "",
                "sp": 0.0,
                "method": "dense",
                "sb": None,
                "params": int(row["params"]),
                **{c: row[c] for c in acc},
                **_se(row),
            }
        )
    consts = zs[zs["kind"] == "constant"]
    for _, c in consts.iterrows():
        base = {"model": c["model"], "cal_dataset": c["cal_dataset"], "sp": c["sp"]}
        rows.append(
            {
                **base,
                "method": "constant",
                "sb": c["sp"],
                "params": int(c["params"]),
                **{a: c[a] for a in acc},
                **_se(c),
            }
        )
        for _, b in (
            best[
                (best["model"] == c["model"]) & (best["cal_dataset"] == c["cal_dataset"]) & (best["sp"] == c["sp"])
            ].iterrows()
            if not best.empty
            else []
        ):
            match = zs[
                (zs["kind"] == "dynamic")
                & (zs["model"] == c["model"])
                & (zs["budget"] == b["budget"])
                & (zs["cal_dataset"] == c["cal_dataset"])
                & (zs["sp"] == c["sp"])
                & (zs["sb"] == b["best_sb"])
            ]
            if match.empty:
                continue
            d = match.iloc[0]
            rows.append(
                {
                    **base,
                    "method": f"dynamic ({COMPARISON[b['budget']]})",
                    "sb": d["sb"],
                    "params": int(d["params"]),
                    **{a: d[a] for a in acc},
                    "delta_points": 100.0 * (d["acc_average"] - c["acc_average"]) if "acc_average" in acc else None,
                    **_se(d),
                    "se_delta_points": _se_diff(d, c),
                }
            )
    return pd.DataFrame(rows)


def auto_vs_sweep(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Automatic SB vs the sweep's best, per (model, cal_dataset, budget, sp).

    Columns: ``auto_sb``, ``auto_ppl``, ``auto_runs`` (evaluations), ``auto_grid`` (grid size it searched),
    ``auto_time_s``; ``sweep_sb``, ``sweep_ppl`` (best fixed SB including constant), ``sweep_runs``,
    ``sweep_time_s`` (summed run times, perplexity only: a constant run that also ran the zero-shot tasks counts
    the grid's mean evaluation time); ``ppl_gap_pct`` = auto vs sweep best (positive = auto worse).
    """
    col = f"ppl_{dataset}"
    autos = frame[frame["kind"] == "auto"]
    rows = []
    consts = _constants(frame)
    for _, a in autos.iterrows():
        grid = frame[
            (frame["kind"] == "dynamic")
            & (frame["model"] == a["model"])
            & (frame["cal_dataset"] == a["cal_dataset"])
            & (frame["budget"] == a["budget"])
            & (frame["sp"] == a["sp"])
            & ~frame["zero_shot"]
        ]
        const = consts.get((a["model"], a["cal_dataset"], a["sp"]))
        cands = grid if const is None else pd.concat([grid, const.to_frame().T])
        cands = cands[cands[col].notna()]
        if cands.empty:
            continue
        best = pick_best(cands, col)
        # the sweep's cost as a perplexity-only sweep: a constant run that also ran the tasks is charged the
        # grid's mean evaluation time instead of its own
        sweep_time = float(grid["time_s"].sum())
        if const is not None:
            const_eval = (
                float(grid["eval_time_s"].mean()) if const["zero_shot"] and len(grid) else float(const["eval_time_s"])
            )
            sweep_time += float(const["time_s"]) - float(const["eval_time_s"]) + const_eval
        rows.append(
            {
                "model": a["model"],
                "cal_dataset": a["cal_dataset"],
                "budget": a["budget"],
                "comparison": COMPARISON[a["budget"]],
                "sp": a["sp"],
                "auto_sb": a["sb"],
                "auto_ppl": a[col],
                "auto_runs": int(a["auto_n_evals"]),
                "auto_grid": int(a["auto_grid_size"]),
                "auto_time_s": float(a["time_s"]),
                "sweep_sb": float(best["sb"]),
                "sweep_ppl": float(best[col]),
                "sweep_runs": len(cands),
                "sweep_time_s": sweep_time,
                "ppl_gap_pct": pct_change(float(a[col]), float(best[col])),
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------ writers
def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if hasattr(value, "item"):  # numpy scalar
        return _fmt(value.item(), digits)
    return str(value)


def _cells(frame: pd.DataFrame, digits: int | Mapping[str, int]) -> list[list[str]]:
    def d(col: str) -> int:
        return digits.get(col, 2) if isinstance(digits, Mapping) else digits

    cols = list(frame.columns)
    return [[_fmt(v, d(c)) for c, v in zip(cols, row, strict=True)] for row in frame.itertuples(index=False)]


def to_markdown(frame: pd.DataFrame, digits: int | Mapping[str, int] = 2) -> str:
    """A GitHub Markdown table (numbers right-aligned)."""
    if frame.empty:
        return "_(no rows)_\n"
    header = [str(c) for c in frame.columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _cells(frame, digits)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(frame: pd.DataFrame, digits: int | Mapping[str, int] = 2, caption: str = "", label: str = "") -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    spec = "".join("r" if n else "l" for n in numeric)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(str(c)) for c in frame.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in _cells(frame, digits)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(
    frame: pd.DataFrame, stem: str | Path, *, caption: str = "", digits: int | Mapping[str, int] = 2
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (caption as a first line) and ``<stem>.tex``; returns both paths."""
    stem = Path(stem)
    md = (f"{caption}\n\n" if caption else "") + to_markdown(frame, digits)
    label = "tab:" + stem.name.replace("_", "-")
    return (
        atomic_write(stem.with_suffix(".md"), md),
        atomic_write(stem.with_suffix(".tex"), to_latex(frame, digits, caption, label)),
    )


# ------------------------------------------------------------------------------------------ the paper's tables
SWEEP_COLUMNS = ["model", "cal_dataset", "budget", "sp", "sb", "kind", "params", "fraction_removed", "mean_slice"]


def sweep_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every sweep run (zero-shot copies of dynamic runs left out) with its perplexities."""
    rows = frame[~frame["zero_shot"] | frame["kind"].isin(["dense", "constant"])]
    return rows[SWEEP_COLUMNS + ppl_columns(frame)].reset_index(drop=True)


def headline_table(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Best dynamic SB vs constant per SP and comparison: % perplexity change and accuracy points.

    :func:`best_vs_constant` joined with the average accuracies of :func:`zero_shot_table` (``acc_constant``,
    ``acc_dynamic``, ``acc_delta_points`` = 100·Δ; empty where the best SB ran no tasks).
    """
    head = best_vs_constant(frame, dataset)
    if head.empty:
        return head
    acc = zero_shot_table(frame, dataset)
    if not acc.empty and "acc_average" in acc.columns:
        key = ["model", "cal_dataset", "sp"]
        const = acc[acc["method"] == "constant"][key + ["acc_average"]].rename(columns={"acc_average": "acc_constant"})
        dyn = acc[acc["method"].str.startswith("dynamic")].copy()
        dyn["comparison"] = dyn["method"].str.slice(len("dynamic ("), -1)
        dyn = dyn[key + ["comparison", "sb", "acc_average"]].rename(
            columns={"acc_average": "acc_dynamic", "sb": "best_sb"}
        )
        head = head.merge(const, on=key, how="left").merge(dyn, on=key + ["comparison", "best_sb"], how="left")
        head["acc_delta_points"] = 100 * (head["acc_dynamic"] - head["acc_constant"])
    keep = ["model", "cal_dataset", "comparison", "sp", "best_sb", "params_constant", "params_dynamic"]
    keep += [c for c in head.columns if c.endswith("_change_pct")]
    keep += [c for c in ("acc_constant", "acc_dynamic", "acc_delta_points") if c in head.columns]
    return head[keep]


def _json_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """``frame`` as JSON-ready rows (NaN -> None)."""
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in frame.astype(object).to_dict(orient="records")
    ]


def write_tables(frame: pd.DataFrame, results: str | Path, dataset: str) -> dict[str, pd.DataFrame]:
    """Write every paper table of ``frame`` under ``<results>/tables`` and the JSON summaries next to it.

    Tables: ``sweep``, ``headline`` (also ``headline.json``), ``auto_sb`` and ``zero_shot`` (also
    ``zero_shot.json``), each skipped when the records hold no rows for it, so any subset of runs works.
    Returns the tables by name.
    """
    from dynslice.experiment.protocol import BEST_SB_NOTE
    from dynslice.store.jsonio import write_json

    results = Path(results)
    tables = results / "tables"
    out = {
        "sweep": sweep_table(frame),
        "headline": headline_table(frame, dataset),
        "auto_sb": auto_vs_sweep(frame, dataset),
        "zero_shot": zero_shot_table(frame, dataset),
    }
    acc4 = {c: 4 for c in frame.columns if c.startswith(("acc_", "se_"))} | {"acc_constant": 4, "acc_dynamic": 4}
    specs = {
        "sweep": ("Perplexity of every sweep run (constant: SB = SP)", {"fraction_removed": 4, "mean_slice": 4}),
        "headline": (
            (
                f"Best dynamic SB vs constant slicing (SB chosen on {dataset} perplexity): % perplexity "
                "change (negative = better) and accuracy points (positive = better). " + BEST_SB_NOTE
            ),
            acc4,
        ),
        "auto_sb": (
            f"Automatic SB vs the sweep's best (perplexity on {dataset})",
            {"auto_time_s": 0, "sweep_time_s": 0},
        ),
        "zero_shot": (
            "Zero-shot accuracy: dense, constant (SB = SP) and best dynamic SB per SP. " + BEST_SB_NOTE,
            acc4,
        ),
    }
    for name, table in out.items():
        if table.empty:
            continue
        caption, digits = specs[name]
        write_table(table, tables / name, caption=caption, digits=digits)
        if name in ("headline", "zero_shot"):
            write_json(results / f"{name}.json", _json_rows(table))
    return out


def lr_agreement(scores: Mapping[tuple[str, str], Mapping[str, Any]]) -> pd.DataFrame:
    """Spearman rank correlation of per-layer LR between every pair of corpora, per model.

    ``scores`` maps ``(model, corpus)`` to an LR file's content (its ``"lr"`` list).
    """
    rows = []
    models = sorted({m for m, _ in scores}, key=list(dict.fromkeys(m for m, _ in scores)).index)
    for model in models:
        corpora = [c for m, c in scores if m == model]
        ranks = pd.DataFrame({c: scores[(model, c)]["lr"] for c in corpora}).rank()
        corr = ranks.corr()  # Spearman = Pearson on ranks
        for i, a in enumerate(corpora):
            for b in corpora[i + 1 :]:
                rows.append({"model": model, "corpus A": a, "corpus B": b, "spearman": float(corr.loc[a, b])})
    return pd.DataFrame(rows)


def allocation_steps(lr_record: Any, sp: float, sb: float, hidden: int, round_interval: int):
    """The paper's Figure 1 as a table: per layer LR, normalised n, n/mean(n), FS (%), width, slice applied (%).

    ``lr_record`` is an LR record (``dynslice lr``'s JSON) or anything :func:`~dynslice.store.records.lr_input`
    accepts; its raw scores go through the one orientation function before they reach the allocator.
    Returns ``(table, allocation)``.
    """
    import numpy as np

    from dynslice.core.allocate import slice_fractions
    from dynslice.experiment.widths import allocation
    from dynslice.store.records import lr_input

    inp = lr_input(lr_record)
    r = np.asarray(lr_record["lr"] if isinstance(lr_record, Mapping) else lr_record, dtype=float)
    n = np.asarray(inp.redundancy, dtype=float)
    alloc = allocation(RunConfig(sp=sp, sb=sb, round_interval=round_interval, rounding="total"), hidden, inp)
    table = pd.DataFrame(
        {
            "layer": range(len(r)),
            "LR": r,
            "normalised n": n,
            "n / mean(n)": n / n.mean(),
            "FS (%)": 100 * slice_fractions(n, sp, sb),
            "width": alloc.widths,
            "sliced after rounding (%)": 100 * np.array(alloc.effective_fractions),
        }
    )
    return table, alloc
