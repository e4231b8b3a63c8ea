"""The two protocols of a run, described in one place: ``dynslice`` (ours) and ``reference`` (the authors' code).

``reference`` does what the authors' code does (RazvanDu/DynamicSlicing: ``calculate_LR.py`` and ``short_hf.py``
for LR, its SliceGPT fork for calibration, slicing and perplexity); ``dynslice`` is this library's own, more
careful protocol. A protocol only sets defaults (:data:`dynslice.experiment.config.PROTOCOL_SETTINGS`, next to the run
configuration's definition): a run config (profile key or CLI flag) may override any setting, and the run record
lists every setting that differs from ``dynslice`` and from the chosen protocol (:func:`differences`).

=====================  ===================  ===================================================================
setting                dynslice             reference (the authors' code)
=====================  ===================  ===================================================================
``lr_split``           ``train``            ``validation`` (PG-19 validation)
``lr_sampler``         ``random``           ``sliding``: every document tokenised with BOS, a window every
                                            ``lr_stride`` tokens, short tail windows included
``lr_seqlen``          512                  1024
``lr_stride``          (unused)             256
``lr_last_layer``      ``raw``              ``final_norm`` (HF ``hidden_states[-1]`` is after the final norm)
``cal_sampler``        ``windows``          ``documents``: SliceGPT's document-joining sampler, empty rows
                                            dropped, the tokenizer's BOS first (train split)
``ppl_protocol``       ``slicegpt``         ``documents``: the same sampler on the validation split, exp of the
                                            mean of per-sample mean NLLs (at most 128 samples)
``embedding_mean``     ``False``            ``True``: each embedding row's mean subtracted before slicing
``rounding``           ``total``            ``reference``: ``round((1 - FS_i) * D)`` per layer
``round_interval``     8                    1
``dtype``              ``fp32``             ``fp16``
=====================  ===================  ===================================================================

:data:`DEVIATIONS` says, for each, what the authors do, what dynslice does, why, and which switch restores the
authors' choice; :func:`deviations_markdown` renders it (the README and the notebooks show it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynslice.experiment.config import protocol_defaults

#: The note every "best SB" table of the paper carries.
BEST_SB_NOTE = (
    "Best SB as in the paper: the SB with the lowest perplexity on the same evaluation data that this table "
    "reports, so the 'best' numbers are optimistic. The automatic search (sb: auto) chooses SB on held-out "
    "calibration data instead and never sees the evaluation split."
)


def differences(config: dict[str, Any]) -> dict[str, Any]:
    """What a run record says about its protocol: its name, every setting that differs from ``dynslice``'s
    protocol (``{setting: {"value", "dynslice"}}``), and every setting overridden against its own protocol."""
    protocol = config.get("protocol", "dynslice")
    ours, chosen = protocol_defaults("dynslice"), protocol_defaults(protocol)
    return {
        "name": protocol,
        "differs_from_dynslice": {
            k: {"value": config[k], "dynslice": v} for k, v in ours.items() if k in config and config[k] != v
        },
        "overrides": {
            k: {"value": config[k], protocol: v} for k, v in chosen.items() if k in config and config[k] != v
        },
    }


@dataclass(frozen=True)
class Deviation:
    """One deliberate difference between dynslice's protocol and the authors' code."""

    topic: str
    authors: str
    dynslice: str
    why: str
    switch: str
    effect: str  # key of the measured effect in bench/results/protocol_smollm2.json ("" when not measurable)


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        "LR data",
        "PG-19 validation, every book in 1024-token windows every 256 tokens (tail windows included)",
        "random windows of the LR corpus's train split",
        "evaluation splits stay untouched; equal-length windows weigh every token once",
        "`lr_split: validation`, `lr_sampler: sliding`, `lr_seqlen: 1024`, `lr_stride: 256`",
        "lr_data",
    ),
    Deviation(
        "Last layer's LR",
        "compared after the final norm (HF `hidden_states[-1]`)",
        "the last layer's raw output",
        "the final norm rescales every token: it would measure the norm, not the layer",
        "`lr_last_layer: final_norm`",
        "lr_last_layer",
    ),
    Deviation(
        "Embedding mean",
        "each embedding row's mean subtracted (SliceGPT's LayerNorm fusion), also on RMSNorm models",
        "not subtracted",
        "RMSNorm does not remove the mean, so the subtraction changes the model; dynslice's folding is exact",
        "`embedding_mean: true`",
        "embedding_mean",
    ),
    Deviation(
        "Calibration sampler",
        "SliceGPT's document-joining sampler on train, empty rows dropped, BOS first, 128 x 2048",
        "random windows of the joined train stream, no BOS",
        "uniform coverage of the stream, no document-start bias",
        "`cal_sampler: documents`",
        "cal_sampler",
    ),
    Deviation(
        "Perplexity",
        "validation split, document-joining sampler (at most 128 x 2048), mean of per-sample mean NLLs",
        "test split in consecutive chunks, mean over all tokens",
        "the test-split protocol of SliceGPT/SparseGPT tables; every token weighs the same",
        "`ppl_protocol: documents`",
        "ppl_protocol",
    ),
    Deviation(
        "Rounding",
        "`round((1 - FS_i) * D)` per layer (interval 1)",
        "multiples of 8 whose sum equals the constant run's total width",
        "hardware-friendly widths, and exactly the constant baseline's size",
        "`rounding: reference`, `round_interval: 1`",
        "rounding",
    ),
    Deviation(
        "dtype",
        "fp16",
        "fp32 on CPU, bf16 on GPU",
        "bf16 does not overflow; fp16 is slow on CPU",
        "`dtype: fp16`",
        "dtype",
    ),
)


def _fmt_effect(effects: dict[str, Any] | None, key: str) -> str:
    if not effects or key not in effects:
        return "not measured"
    e = effects[key]
    return f"{e['delta_ppl']:+.2f} ({e['ppl_dynslice']:.2f} -> {e['ppl_reference']:.2f})"


def load_effects(path: str | Path | None = None) -> dict[str, Any] | None:
    """The measured effects of ``bench/bench_protocol.py`` (``None`` when the file is absent)."""
    path = Path(path) if path else Path(__file__).resolve().parents[2] / "bench/results/protocol_smollm2.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("effects")


def deviations_markdown(effects: dict[str, Any] | None = None, short: bool = False) -> str:
    """The deviations table as Markdown (``short``: topic, authors, dynslice and switch only, for notebooks)."""
    if short:
        rows = ["| | authors' code | dynslice | switch (`protocol: reference` sets all) |", "|---|---|---|---|"]
        rows += [f"| {d.topic} | {d.authors} | {d.dynslice} | {d.switch} |" for d in DEVIATIONS]
        return "\n".join(rows + ["", BEST_SB_NOTE])
    rows = [
        "| | authors' code | dynslice | why | switch | ppl effect on SmolLM2 (dynslice -> authors') |",
        "|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {d.topic} | {d.authors} | {d.dynslice} | {d.why} | {d.switch} | {_fmt_effect(effects, d.effect)} |"
        for d in DEVIATIONS
    ]
    return "\n".join(rows)
