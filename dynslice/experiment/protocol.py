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
``lr_nsamples``        32                   ``None``: every window
``lr_seqlen``          512                  1024
``lr_stride``          (unused)             256
``lr_last_layer``      ``raw``              ``final_norm`` (HF ``hidden_states[-1]`` is after the final norm)
``lr_precision``       ``fp32``             ``authors_fp16``: the cosine in fp16 without upcast, NaN -> 0.5
``cal_sampler``        ``windows``          ``documents``: SliceGPT's document-joining sampler, empty rows
                                            dropped, the tokenizer's BOS first (train split)
``cal_nsamples``       32                   128
``cal_seqlen``         512                  2048
``ppl_protocol``       ``slicegpt``         ``documents``: the same sampler on the validation split, exp of the
                                            mean of per-sample mean NLLs
``ppl_seqlen``         512                  2048
``ppl_nsamples``       (unused)             128 (at most)
``embedding_mean``     ``False``            ``True``: each embedding row's mean subtracted before slicing
``rounding``           ``total``            ``reference``: ``round((1 - FS_i) * D)`` per layer
``round_interval``     8                    1
``dtype``              ``fp32``             ``fp16``
=====================  ===================  ===================================================================

Two rules act across runs rather than in one, and are the protocol's too: which perplexity chooses a table's best
SB (:data:`BEST_SB_ON`), and the zero-shot protocol, which a profile sets (``zero_shot: {every_sb: true, limit:
1000}`` in ``paper.yaml``, as the authors ran it).

:data:`DEVIATIONS` says, for each, what the authors do, what dynslice does, why, and which switch restores the
authors' choice; :func:`deviations_markdown` renders it (the README and the notebooks show it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynslice.experiment.config import LATER_FIELDS, PROTOCOLS, protocol_defaults

#: Which perplexity chooses the best SB of a (model, calibration corpus, budget, SP) group, per protocol: the run's
#: first perplexity corpus (``first_ppl_dataset``: one corpus for every calibration set), or the group's own
#: calibration corpus (``calibration_set``: the authors calibrate and evaluate each run on one dataset,
#: ``experiments/run_slicegpt_perplexity.py:57-61,207-225``, and compare SBs per dataset).
BEST_SB_ON: dict[str, str] = {"dynslice": "first_ppl_dataset", "reference": "calibration_set"}

#: The note every "best SB" table of the paper carries.
BEST_SB_NOTE = (
    "Best SB as in the paper: the SB with the lowest perplexity on evaluation data, so the 'best' numbers are "
    "optimistic. Under the reference protocol each calibration set's best SB is chosen on that set's own "
    "perplexity (as the authors do); under dynslice's, on the first perplexity corpus for every calibration set. "
    "The automatic search (sb: auto) chooses SB on held-out calibration data instead and never sees the "
    "evaluation split."
)


def best_sb_dataset(protocol: str, cal_dataset: str, first_ppl_dataset: str) -> str:
    """The perplexity corpus that chooses a group's best SB under ``protocol`` (:data:`BEST_SB_ON`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return cal_dataset if BEST_SB_ON[protocol] == "calibration_set" else first_ppl_dataset


def differences(config: dict[str, Any]) -> dict[str, Any]:
    """What a run record says about its protocol: its name, every setting that differs from ``dynslice``'s
    protocol (``{setting: {"value", "dynslice"}}``), and every setting overridden against its own protocol.
    ``config`` is a run record's config (:meth:`RunConfig.to_json`, which leaves out a later field at its earlier
    value)."""
    config = {**LATER_FIELDS, **config}
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
    """One deliberate difference between dynslice's protocol and the authors' code (``authors`` cites where)."""

    topic: str
    authors: str
    dynslice: str
    why: str
    switch: str
    effect: str  # key of the measured effect in bench/results/protocol_smollm2.json ("" when not measurable)
    unmeasured: str = ""  # why the effect is not measured, shown in its place


#: Where the authors' code is (RazvanDu/DynamicSlicing; its SliceGPT fork under src/slicegpt/).
AUTHORS_REPO = "RazvanDu/DynamicSlicing"

DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        "LR data",
        "PG-19 validation, every book in 1024-token windows every 256 tokens, tail windows included "
        "(`calculate_LR.py:45-75`, `short_hf.py:127-134`)",
        "random windows of the LR corpus's train split (32 x 512)",
        "evaluation splits stay untouched; equal-length windows weigh every token once",
        "`lr_split: validation`, `lr_sampler: sliding`, `lr_nsamples: null`, `lr_seqlen: 1024`, `lr_stride: 256`",
        "lr_data",
    ),
    Deviation(
        "Last layer's LR",
        "compared after the final norm (HF `hidden_states[-1]`, `short_hf.py:76-78`)",
        "the last layer's raw output",
        "the final norm rescales every token: it would measure the norm, not the layer",
        "`lr_last_layer: final_norm`",
        "lr_last_layer",
    ),
    Deviation(
        "LR arithmetic",
        "the cosine in fp16 without upcast (`metrics_BI.py:17-21`): a product of norms above 65504 overflows, so "
        "the token's cosine is 0 or NaN, and NaN counts as 0.5; each window's sum is fp16 (`short_hf.py:84-88`)",
        "the cosine in fp32, clamped to [-1, 1], summed in fp64",
        "the overflow replaces real cosines wherever activations are large (SmolLM2, Llama-3, Mistral)",
        "`lr_precision: authors_fp16`",
        "lr_precision",
    ),
    Deviation(
        "Embedding mean",
        "each embedding row's mean subtracted (SliceGPT's LayerNorm fusion, `layernorm_fusion.py`), also on "
        "RMSNorm models",
        "not subtracted",
        "RMSNorm does not remove the mean, so the subtraction changes the model; dynslice's folding is exact",
        "`embedding_mean: true`",
        "embedding_mean",
    ),
    Deviation(
        "Calibration sampler",
        "SliceGPT's document-joining sampler on train, empty rows dropped, BOS first (`data_utils.py:93-138`)",
        "random windows of the joined train stream, no BOS",
        "uniform coverage of the stream, no document-start bias",
        "`cal_sampler: documents`",
        "cal_sampler",
    ),
    Deviation(
        "Calibration tokenisation",
        "each joined piece becomes token strings, the sample is decoded to text and tokenised again (BOS added, "
        "cut at the sample length) (`data_utils.py:108-132`)",
        "the ids of the separately encoded pieces, concatenated (BOS first, cut at the sample length)",
        "no decode and re-encode round trip: a sample holds exactly the tokens that were counted",
        "none (`dynslice.measure.data.join_documents`)",
        "cal_tokenisation",
    ),
    Deviation(
        "Sizes",
        "LR on every window; calibration 128 x 2048; perplexity 2048 tokens, at most 128 samples "
        "(`experiments/run_slicegpt_perplexity.py:62-89`)",
        "LR 32 x 512; calibration 32 x 512; perplexity 512 tokens",
        "sized for a CPU; `protocol: reference` sets the authors' sizes",
        "`lr_nsamples: null`, `cal_nsamples: 128`, `cal_seqlen: 2048`, `ppl_seqlen: 2048`, `ppl_nsamples: 128`",
        "",
        "not measured: 128 x 2048 calibration per slicing is hours on this CPU",
    ),
    Deviation(
        "Perplexity",
        "validation split of the calibration set, document-joining sampler, mean of per-sample mean NLLs "
        "(`experiments/run_slicegpt_perplexity.py:207-225`)",
        "test split in consecutive chunks, mean over all tokens",
        "the test-split protocol of SliceGPT/SparseGPT tables; every token weighs the same",
        "`ppl_protocol: documents`",
        "ppl_protocol",
    ),
    Deviation(
        "Rounding",
        "`round((1 - FS_i) * D)` per layer, interval 1 (`experiments/mean_cut_accuracy_experiments.py:83-104`, "
        "`src/slicegpt/rotate.py:32-37`)",
        "multiples of 8 whose sum equals the constant run's total width",
        "hardware-friendly widths, and exactly the constant baseline's size",
        "`rounding: reference`, `round_interval: 1`",
        "rounding",
    ),
    Deviation(
        "dtype",
        "fp16 (`short_hf.py:34`, `experiments/run_slicegpt_perplexity.py:54`)",
        "fp32 unless a profile or `--dtype` says otherwise (the paper profile sets fp16)",
        "fp32 is the arithmetic the tests compare against; fp16 overflows and is slow on CPU",
        "`dtype: fp16`",
        "",
        "not measured: a 4 x 256 SmolLM2 forward in fp16 takes about 75 s on this CPU",
    ),
    Deviation(
        "Batch sizes",
        "LR one window per forward (`calculate_LR.py:46-50`); calibration 1, perplexity 8 "
        "(`experiments/run_slicegpt_perplexity.py:68,86`); lm-eval 1 (HFLM's default, `:307-308`)",
        "one `batch_size` for every forward (8; the paper profile 16)",
        "padding is masked, so a batch only reorders floating-point sums",
        "`batch_size: 1`",
        "batch_size",
    ),
    Deviation(
        "Best SB",
        "each calibration set's best SB, chosen on that set's own perplexity "
        "(`experiments/mean_cut_accuracy_experiments.py:69-128`)",
        "chosen on the first perplexity corpus for every calibration set",
        "one yardstick for every calibration set",
        "`protocol: reference` (`BEST_SB_ON`)",
        "",
        "a choice between runs; it changes no run",
    ),
    Deviation(
        "Zero-shot",
        "the six tasks at every SB with `limit=1000` (`README.md`, `experiments/run_slicegpt_perplexity.py:315-322`), "
        "lm-eval at git commit 9b0b15b1 (January 2024, before 0.4.1; `requirements.txt`), batch size 1",
        "dense, constant and the best SB, every document, the installed lm-eval (>= 0.4.8), batch size `batch_size`",
        "whole task sets have smaller standard errors; tasks at every SB cost as much as the sweep",
        "`zero_shot: {every_sb: true, limit: 1000}` (the paper profile)",
        "",
        "not measured: the six tasks need the hub",
    ),
    Deviation(
        "C4",
        "the first train shard (calibration) and validation shard (perplexity) whole "
        "(`src/slicegpt/data_utils.py:27-35`)",
        "a seeded sample of the same shards: 5000 train and 500 validation documents",
        "tokenising a whole 356k-document shard to draw 128 samples is slow",
        "none (`dynslice.measure.data.C4_TRAIN_DOCS`, `C4_EVAL_DOCS`)",
        "",
        "not measured: C4 needs the hub",
    ),
)


def _fmt_effect(effects: dict[str, Any] | None, d: Deviation) -> str:
    if not effects or d.effect not in effects:
        return d.unmeasured or "not measured"
    e = effects[d.effect]
    text = f"{e['delta_ppl']:+.2f} ({e['ppl_dynslice']:.2f} -> {e['ppl_reference']:.2f})"
    if e.get("within_noise"):
        text += ", within noise"
    return text + (f"; {e['extra']}" if e.get("extra") else "")


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
        f"| {d.topic} | {d.authors} | {d.dynslice} | {d.why} | {d.switch} | {_fmt_effect(effects, d)} |"
        for d in DEVIATIONS
    ]
    return "\n".join(rows)
