"""One run, end to end: model -> LR score -> widths -> rotate-and-slice -> perplexity + zero-shot -> run JSON.

:class:`Workbench` holds what many runs of one model share (the dense model, its tokenizer, LR scores, calibration
batches) so that a sweep loads and scores the dense model once. It is an explicit object, never global state.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynslice.core.adapters import count_parameters, get_adapter
from dynslice.core.allocate import allocate
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, dense_params, sliced_params
from dynslice.core.search import find_best_sb
from dynslice.core.slicing import slice_model
from dynslice.experiment import numerics
from dynslice.experiment.config import RunConfig
from dynslice.experiment.numerics import versions
from dynslice.experiment.protocol import differences
from dynslice.measure import data
from dynslice.measure.evaluate import dataset_perplexity, perplexity, zero_shot
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.models import load
from dynslice.store.records import lr_input

RECORD_VERSION = 1


@dataclass
class Workbench:
    """Per-model caches shared by the runs of a sweep: the dense model and tokenizer, LR scores, calibration data."""

    model_spec: str
    dtype: str = "fp32"
    device: str = "cpu"
    _model: nn.Module | None = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model, self._tokenizer = load(self.model_spec, self.dtype, self.device)
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            _ = self.model
        return self._tokenizer

    def dims(self) -> ArchDims:
        return ArchDims.from_config(self.model.config)

    def _cached(self, key: tuple, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def calibration(self, cfg: RunConfig) -> dict[str, torch.Tensor]:
        """Calibration batch: random windows of the train stream, or the authors' document-joining sampler."""
        key = ("cal", cfg.cal_dataset, cfg.cal_sampler, cfg.cal_nsamples, cfg.cal_seqlen, cfg.seed)
        sampler = data.document_batch if cfg.cal_sampler == "documents" else data.calibration_batch
        return self._cached(
            key, lambda: sampler(cfg.cal_dataset, self.tokenizer, cfg.cal_nsamples, cfg.cal_seqlen, seed=cfg.seed)
        )

    def lr_batch(self, cfg: RunConfig) -> dict[str, torch.Tensor]:
        """LR data: random windows of ``lr_split``, or the authors' sliding windows over its documents."""
        if cfg.lr_sampler == "sliding":
            return data.sliding_window_batch(
                cfg.lr_dataset,
                self.tokenizer,
                cfg.lr_seqlen,
                cfg.lr_stride,
                split=cfg.lr_split,
                nsamples=cfg.lr_nsamples,
            )
        return data.calibration_batch(
            cfg.lr_dataset, self.tokenizer, cfg.lr_nsamples, cfg.lr_seqlen, seed=cfg.seed, split=cfg.lr_split
        )

    def lr(self, cfg: RunConfig) -> dict[str, Any]:
        """LR score of the dense model (cached per corpus, size, metric and seed); includes its time."""
        key = (
            "lr",
            cfg.lr_dataset,
            cfg.lr_split,
            cfg.lr_sampler,
            cfg.lr_nsamples,
            cfg.lr_seqlen,
            cfg.lr_stride,
            cfg.lr_last_layer,
            cfg.lr_metric,
            cfg.seed,
        )

        def compute():
            t = time.perf_counter()
            batch = self.lr_batch(cfg)
            score = layer_redundancy(
                self.model, batch, metric=cfg.lr_metric, batch_size=cfg.batch_size, last_layer=cfg.lr_last_layer
            )
            return {
                **score.to_json(),
                "model": self.model_spec,
                "dataset": cfg.lr_dataset,
                "split": cfg.lr_split,
                "sampler": cfg.lr_sampler,
                "windows": int(batch["input_ids"].shape[0]),
                "nsamples": cfg.lr_nsamples,
                "seqlen": cfg.lr_seqlen,
                "stride": cfg.lr_stride,
                "last_layer": cfg.lr_last_layer,
                "seed": cfg.seed,
                "time_s": time.perf_counter() - t,
            }

        return self._cached(key, compute)

    def heldout(self, cfg: RunConfig) -> torch.Tensor:
        """Calibration-corpus chunks disjoint from the calibration windows, for choosing SB (never the eval split)."""
        key = ("heldout", cfg.cal_dataset, cfg.cal_nsamples, cfg.cal_seqlen, cfg.auto_sb_nsamples, cfg.seed)
        return self._cached(
            key,
            lambda: data.heldout_chunks(
                cfg.cal_dataset,
                self.tokenizer,
                cfg.auto_sb_nsamples,
                cfg.cal_seqlen,
                seed=cfg.seed,
                cal_nsamples=cfg.cal_nsamples,
                cal_seqlen=cfg.cal_seqlen,
            ),
        )

    def sliced(self, cfg: RunConfig, widths: list[int]) -> nn.Module:
        """A fresh sliced copy of the dense model (the dense model itself is left untouched)."""
        model = copy.deepcopy(self.model)
        return slice_model(
            model,
            self.calibration(cfg),
            widths,
            batch_size=cfg.batch_size,
            device=cfg.device,
            embedding_mean=cfg.embedding_mean,
        )


def _param_record(bench: Workbench, widths: list[int] | None, model: nn.Module) -> dict[str, Any]:
    dims = bench.dims()
    dense = dense_params(dims)
    if widths is None:
        return {"dense": dense, "total": dense, "weights": dense, "shortcuts": 0, "fraction_removed": 0.0}
    count = sliced_params(dims, widths)
    actual = count_parameters(model)
    if actual != count.total:
        raise RuntimeError(f"parameter accounting: formula gives {count.total}, the model has {actual}")
    return {
        "dense": dense,
        "total": count.total,
        "weights": count.weights,
        "shortcuts": count.shortcuts,
        "fraction_removed": 1 - count.total / dense,
        "fraction_removed_weights": 1 - count.weights / dense,
    }


def evaluate_model(model: nn.Module, tokenizer, cfg: RunConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Perplexities on ``cfg.ppl_datasets`` and zero-shot accuracies on ``cfg.tasks``."""
    ppl = {
        name: dataset_perplexity(
            model,
            tokenizer,
            name,
            seqlen=cfg.ppl_seqlen,
            protocol=cfg.ppl_protocol,
            nsamples=None if cfg.ppl_protocol == "slicegpt" else cfg.ppl_nsamples,
            max_chunks=cfg.ppl_max_chunks if cfg.ppl_protocol == "slicegpt" else None,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
        )
        for name in cfg.ppl_datasets
    }
    tasks = (
        zero_shot(model, tokenizer, list(cfg.tasks), limit=cfg.task_limit, batch_size=cfg.batch_size, seed=cfg.seed)
        if cfg.tasks
        else {}
    )
    return ppl, tasks


def _allocate(bench: Workbench, cfg: RunConfig, sb: float, lr: dict[str, Any]):
    dims = bench.dims()
    return allocate(
        lr_input(lr).redundancy,
        cfg.sp,
        sb,
        dims.hidden,
        round_interval=cfg.round_interval,
        budget=cfg.budget,
        dims=dims,
        count=cfg.count,
        rounding=cfg.rounding,
    )


def _choose_sb(bench: Workbench, cfg: RunConfig, lr: dict[str, Any]) -> dict[str, Any]:
    """Fibonacci search of SB on held-out calibration chunks (:func:`~dynslice.core.search.find_best_sb`); records every
    SB tried."""
    heldout = bench.heldout(cfg)
    costs: list[float] = []

    def objective(sb: float) -> float:
        t = time.perf_counter()
        try:
            alloc = _allocate(bench, cfg, sb, lr)
        except ValueError:  # infeasible SB (e.g. a params budget out of reach): never chosen
            return math.inf
        model = bench.sliced(cfg, list(alloc.widths))
        value = perplexity(model, heldout, batch_size=cfg.batch_size, desc=f"held-out ppl sb={sb:.2f}")
        costs.append(time.perf_counter() - t)
        return value

    result = find_best_sb(objective, cfg.sp, step=cfg.auto_sb_step, max_evals=cfg.auto_sb_max_evals)
    return {**result.to_json(), "time_s": sum(costs), "heldout_chunks": int(heldout.shape[0])}


def run(
    cfg: RunConfig, out: str | Path | None = None, *, bench: Workbench | None = None, force: bool = False
) -> dict[str, Any]:
    """Execute one run and return its record; with ``out``, write it atomically (and skip if already done).

    A record at ``out`` whose ``config`` equals ``cfg`` means the run is done: it is returned as it is unless
    ``force``.
    """
    if out is not None and Path(out).is_file() and not force:
        try:
            existing = read_json(out)
        except ValueError:
            existing = None
        if existing and existing.get("config") == cfg.to_json():
            return existing
    bench = bench or Workbench(cfg.model, cfg.dtype, cfg.device)
    if (bench.model_spec, bench.dtype, bench.device) != (cfg.model, cfg.dtype, cfg.device):
        raise ValueError(
            f"bench: built for {bench.model_spec}/{bench.dtype}/{bench.device}, "
            f"run asks for {cfg.model}/{cfg.dtype}/{cfg.device}"
        )
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model = bench.model
    timings["load"] = time.perf_counter() - t
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "config": cfg.to_json(),
        "versions": versions(),
        "protocol": differences(cfg.to_json()),
        "model": cfg.model,
        "architecture": type(model).__name__,
        "sp": cfg.sp,
        "sb": cfg.sb,
        "budget": cfg.budget,
    }
    if cfg.dense:
        record.update(widths=[get_adapter(model).hidden_size] * get_adapter(model).num_layers, lr=None)
        eval_model, widths = model, None
    else:
        t = time.perf_counter()
        lr = bench.lr(cfg)
        timings["lr"] = lr["time_s"]
        sb = cfg.sb
        if cfg.auto_sb:
            search = _choose_sb(bench, cfg, lr)
            timings["auto_sb"] = time.perf_counter() - t - timings["lr"]
            record["auto_sb"] = search
            sb = search["best_sb"]
        alloc = _allocate(bench, cfg, sb, lr)
        widths = list(alloc.widths)
        t = time.perf_counter()
        eval_model = bench.sliced(cfg, widths)
        timings["slice"] = time.perf_counter() - t
        record.update(
            sb=sb,
            widths=widths,
            allocation=alloc.to_json(),
            lr={
                k: lr[k]
                for k in (
                    "metric",
                    "lr",
                    "normalized",
                    "dataset",
                    "tokens",
                    "split",
                    "sampler",
                    "windows",
                    "last_layer",
                )
            },
            slice_timings_s=eval_model.dynslice_info.timings_s,
        )
        if cfg.save_dir:
            from dynslice.store.io import save_sliced

            save_sliced(
                eval_model, cfg.save_dir, cfg.model, bench.tokenizer, extra={"config": cfg.to_json()}, overwrite=True
            )  # only ever replaces a previous dynslice model (checked by the CLI)
    record["params"] = _param_record(bench, widths, eval_model)
    t = time.perf_counter()
    record["ppl"], record["tasks"] = evaluate_model(eval_model, bench.tokenizer, cfg)
    timings["eval"] = time.perf_counter() - t
    record["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    record["numerics"] = numerics.describe(cfg.device)
    if out is not None:
        write_json(out, record)
    return record
