"""The one orchestrator: the steps of a run, each a function of one :class:`~dynslice.experiment.config.RunConfig`.

    check -> LR score -> widths -> rotate-and-slice (in RAM or streamed) -> evaluate -> save -> run record

Every CLI command, the sweep and the notebooks call these functions, so a flag reaches the engine through the CLI,
this module and the core only:

- :func:`check_run` validates what a config cannot check alone (model spec, task names, context length), before
  any work;
- :func:`lr_record` is the LR score of the dense model, as ``dynslice lr`` writes it;
- :func:`~dynslice.experiment.widths.allocation` is the one place where SP and SB become widths;
- :func:`slice_dense` (in RAM) and :func:`slice_streamed` (layer by layer from safetensors) slice;
- :func:`evaluate_model` measures perplexity and zero-shot accuracy; :func:`save` writes a sliced model;
- :func:`run` chains them into one run record; :func:`slice_to_folder` is ``dynslice slice``.

:class:`Workbench` holds what many runs of one model share (its config, tokenizer, LR scores, calibration batches),
never the dense model: each step reads a fresh copy from the checkpoint, so a sweep holds one model at a time. It is
an explicit object, never global state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynslice.core.adapters import count_parameters
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, dense_params, sliced_params, validate_widths
from dynslice.core.search import find_best_sb
from dynslice.core.slicing import slice_model
from dynslice.experiment import numerics
from dynslice.experiment.config import RunConfig
from dynslice.experiment.numerics import versions
from dynslice.experiment.protocol import differences
from dynslice.experiment.widths import allocation
from dynslice.measure import data
from dynslice.measure.evaluate import dataset_perplexity, perplexity, zero_shot
from dynslice.store.jsonio import read_json, write_json
from dynslice.store.memory import available_gpu_bytes
from dynslice.store.models import (
    architecture_of,
    check_spec,
    checkpoint_folder,
    checkpoint_spec,
    load_model,
    load_tokenizer,
    model_config,
    parse_dtype,
)
from dynslice.store.placement import place, release
from dynslice.store.records import LRInput

RECORD_VERSION = 1


@dataclass
class Workbench:
    """What the runs of one model share: its config, tokenizer, LR scores and calibration batches.

    It never holds the dense model. Every step that needs it (LR, slicing, the dense evaluation) reads a fresh copy
    from the checkpoint (:func:`~dynslice.store.models.checkpoint_spec`: safetensors, memory-mapped; a GGUF is
    exported there once) and drops it when done, so a sweep holds one model at a time and its peak memory is one
    run's (:func:`dynslice.store.memory.plan_run`), whatever the number of runs.
    """

    model_spec: str
    dtype: str = "fp32"
    device: str = "cpu"
    stream: str = "auto"  # slicing placement: "auto" streams when the model does not fit in RAM; "on" / "off" force
    _tokenizer: Any = field(default=None, repr=False)
    _config: Any = field(default=None, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, cfg: RunConfig) -> Workbench:
        """The workbench of ``cfg``'s model, dtype and device (nothing is loaded yet)."""
        return cls(cfg.model, cfg.dtype, cfg.device)

    def load(self, device: str | None = None) -> nn.Module:
        """A fresh copy of the model, read from its checkpoint onto ``device`` (default: the workbench's): whole on
        a GPU when it fits there with a forward pass, else read layer by layer, as many on the GPU as fit and the
        rest in host RAM, offloaded to the GPU as they run (:func:`~dynslice.store.models.load_model`). The caller
        owns it: slicing it in place leaves the checkpoint untouched."""
        release()  # what the previous model left in the heap, before the next one is read
        if "source" not in self._memo:
            self._memo["source"] = checkpoint_spec(self.model_spec)
        target = self.device if device is None else device
        gpu_bytes = available_gpu_bytes(target) if target != "cpu" else None
        return load_model(self._memo["source"], self.dtype, target, gpu_bytes=gpu_bytes)

    @property
    def config(self) -> Any:
        """The model's config, read once (without the weights)."""
        if self._config is None:
            from dynslice.core.adapters import supported_architectures

            try:
                config = model_config(self.model_spec)
            except ValueError:
                raise  # already one line naming the spec (a hub id that cannot be reached, say)
            except Exception:  # noqa: BLE001 - an unreadable model: loading it names the problem in one line
                config = None
            if config is None or architecture_of(config) not in supported_architectures():
                config = self.load().config  # loading names the problem (or the architecture's) in one line
            self._config = config
        return self._config

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_spec)
        return self._tokenizer

    def dims(self) -> ArchDims:
        return ArchDims.from_config(self.config)

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
        """:func:`lr_record` of the dense model, cached per corpus, sampler, size, metric and seed."""
        key = (
            "lr",
            cfg.lr_dataset,
            cfg.lr_split,
            cfg.lr_sampler,
            cfg.lr_nsamples,
            cfg.lr_seqlen,
            cfg.lr_stride,
            cfg.lr_last_layer,
            cfg.lr_precision,
            cfg.lr_metric,
            cfg.seed,
        )
        return self._cached(key, lambda: lr_record(self, cfg))

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

    def plan(self, cfg: RunConfig) -> Any:
        """The memory plan of slicing with ``cfg`` (:func:`placement`), made once per calibration size."""
        key = ("plan", cfg.cal_nsamples, cfg.cal_seqlen, cfg.batch_size, cfg.sp, self.stream)
        return self._cached(key, lambda: placement(cfg, self.stream, config=self.config)[0])

    def sliced(self, cfg: RunConfig, widths: list[int]) -> nn.Module:
        """A sliced model, as the memory plan places it: a fresh dense copy read from the checkpoint and sliced in
        place (on the GPU when it fits there, else in host RAM one layer on the GPU at a time), or streamed layer by
        layer from the checkpoint into a temporary folder and read back. Never a second copy of the dense model."""
        plan = self.plan(cfg)
        if plan is not None and plan.mode == "stream":
            import tempfile

            from dynslice.store.io import load_sliced

            with tempfile.TemporaryDirectory(prefix="dynslice-sliced-") as tmp:
                out = Path(tmp) / "model"
                info = slice_streamed(cfg, checkpoint_folder(cfg.model), self.calibration(cfg), widths, out)
                gpu_bytes = available_gpu_bytes(cfg.device) if cfg.device != "cpu" else None
                model = load_sliced(out, dtype=parse_dtype(cfg.dtype), device=cfg.device, gpu_bytes=gpu_bytes)
            model.dynslice_info = info  # the streaming's own timings
            return model
        on_gpu = plan is not None and plan.weights_on == "gpu"
        model = slice_dense(self.load(cfg.device if on_gpu else "cpu"), cfg, self.calibration(cfg), widths)
        return model if on_gpu else place(model, cfg.device)


# ------------------------------------------------------------------------------------------- checks, once
def check_tasks(tasks: Sequence[str]) -> None:
    """Zero-shot task names, checked before any model is loaded (the config checks the dataset names)."""
    from dynslice.measure.evaluate import METRIC

    unknown = [t for t in tasks if t not in METRIC]
    if unknown:
        raise ValueError(f"tasks: {unknown} are not known tasks; known tasks are {', '.join(sorted(METRIC))}")


def check_context(config: Any, cfg: RunConfig, *fields: str) -> None:
    """Refuse sequence lengths (the named fields of ``cfg``) beyond the model's context."""
    ctx = getattr(config, "max_position_embeddings", None)
    for name in fields:
        value = getattr(cfg, name)
        if ctx and value is not None and value > ctx:
            raise ValueError(f"{name}: {value} is beyond the model's context of {ctx} tokens (allowed 2..{ctx})")


def check_run(cfg: RunConfig, command: str = "run", *, dense_only: bool = True) -> None:
    """What a config cannot check by itself, before any model is loaded: the model spec (a dense one unless
    ``dense_only`` is false), dtype and device, and the task names."""
    check_tasks(cfg.tasks)
    check_spec(command, cfg.model, cfg.dtype, cfg.device, dense=dense_only)


# ------------------------------------------------------------------------------------------- the steps
def lr_record(bench: Workbench, cfg: RunConfig) -> dict[str, Any]:
    """Step 1: the LR score of the dense model on ``cfg``'s LR data, as ``dynslice lr`` writes it (scores, their
    normalised redundancy, what data gave them, and the model's width and depth)."""
    t = time.perf_counter()
    batch = bench.lr_batch(cfg)
    model = bench.load()  # a fresh dense copy, dropped once scored
    score = layer_redundancy(
        model,
        batch,
        metric=cfg.lr_metric,
        batch_size=cfg.batch_size,
        last_layer=cfg.lr_last_layer,
        precision=cfg.lr_precision,
    )
    del model
    dims = bench.dims()
    return {
        **score.to_json(),
        "model": bench.model_spec,
        "hidden": dims.hidden,
        "num_layers": dims.layers,
        "dataset": cfg.lr_dataset,
        "split": cfg.lr_split,
        "sampler": cfg.lr_sampler,
        "windows": int(batch["input_ids"].shape[0]),
        "nsamples": cfg.lr_nsamples,
        "seqlen": cfg.lr_seqlen,
        "stride": cfg.lr_stride,
        "last_layer": cfg.lr_last_layer,
        "precision": cfg.lr_precision,
        "seed": cfg.seed,
        "time_s": time.perf_counter() - t,
    }


def slice_dense(
    model: nn.Module,
    cfg: RunConfig,
    calibration: dict[str, torch.Tensor],
    widths: Sequence[int],
    *,
    progress: bool = True,
) -> nn.Module:
    """Step 3, in RAM: rotate and slice ``model`` in place on the ``calibration`` batch with ``cfg``'s settings
    (SliceGPT with per-layer widths, :func:`dynslice.core.slicing.slice_model`)."""
    return slice_model(
        model,
        calibration,
        list(widths),
        batch_size=cfg.batch_size,
        device=cfg.device,
        embedding_mean=cfg.embedding_mean,
        progress=progress,
    )


def slice_streamed(
    cfg: RunConfig,
    folder: str | Path,
    calibration: dict[str, torch.Tensor],
    widths: Sequence[int],
    out: str | Path,
    *,
    tokenizer: Any = None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> Any:
    """Step 3, streamed: the same slicing, reading one layer at a time from the safetensors files in ``folder`` and
    writing the sliced model to ``out`` as each layer is done (:mod:`dynslice.store.stream`). Returns its
    :class:`~dynslice.core.slicing.SliceInfo` (widths, timings)."""
    from dynslice.store.stream import slice_streaming

    if cfg.embedding_mean:
        raise ValueError("embedding_mean: not supported while streaming; slice in RAM (--stream off)")
    return slice_streaming(
        folder,
        calibration,
        list(widths),
        out,
        dtype=cfg.dtype,
        base_model=cfg.model,
        batch_size=cfg.batch_size,
        device=cfg.device,
        tokenizer=tokenizer,
        extra={"config": cfg.to_json(), **(extra or {})},
        overwrite=overwrite,
    )


def evaluate_model(model: nn.Module, tokenizer, cfg: RunConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Step 4: perplexities on ``cfg.ppl_datasets`` and zero-shot accuracies on ``cfg.tasks``."""
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


def evaluation_record(model: nn.Module, tokenizer, cfg: RunConfig) -> dict[str, Any]:
    """Step 4 as ``dynslice eval`` records it, for any model (dense or sliced): perplexity, accuracy, size."""
    t = time.perf_counter()
    ppl, tasks = evaluate_model(model, tokenizer, cfg)
    widths = getattr(getattr(model, "dynslice_info", None), "widths", None)
    return {
        "config": {k: v for k, v in cfg.to_json().items() if not k.startswith(("sp", "sb"))},
        "versions": versions(),
        "model": cfg.model,
        "ppl": ppl,
        "tasks": tasks,
        "params": {"total": count_parameters(model)},
        "widths": None if widths is None else list(widths),
        "timings_s": {"eval": round(time.perf_counter() - t, 3)},
        "numerics": numerics.describe(cfg.device),
    }


def save(
    model: nn.Module,
    cfg: RunConfig,
    out: str | Path,
    tokenizer: Any = None,
    *,
    extra: dict | None = None,
    overwrite: bool = False,
) -> None:
    """Step 5: write a sliced model folder (safetensors, its config and widths, ``cfg`` in its metadata); it
    replaces only a previous dynslice model (:func:`dynslice.store.io.save_sliced`)."""
    from dynslice.store.io import save_sliced

    save_sliced(model, out, cfg.model, tokenizer, extra={"config": cfg.to_json(), **(extra or {})}, overwrite=overwrite)


# ------------------------------------------------------------------------------------------- dynslice slice
def placement(cfg: RunConfig, stream: str = "auto", *, config: Any = None) -> tuple[Any, Any]:
    """``(plan, config)``: the memory plan of slicing ``cfg``'s model (in RAM or streamed) and the model config it
    was read from (once: a GGUF's takes seconds; pass ``config`` when it is known), or ``(None, None)`` for a model
    whose architecture cannot be sliced or whose config cannot be read (loading it names the reason)."""
    from dynslice.core.adapters import supported_architectures
    from dynslice.store.memory import plan_for_spec
    from dynslice.store.models import config_of

    try:
        config = config_of(cfg.model) if config is None else config
    except Exception:  # noqa: BLE001 - an unreadable model: loading it names the problem
        if stream == "on":
            raise
        return None, None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(name in supported_architectures() for name in archs):
        if stream == "on":
            raise ValueError(
                f"stream: {cfg.model} is not a supported architecture "
                f"({', '.join(supported_architectures())}); it cannot be streamed"
            )
        return None, None
    plan = plan_for_spec(
        cfg.model,
        cfg.cal_nsamples,
        cfg.cal_seqlen,
        cfg.dtype,
        device=cfg.device,
        batch_size=cfg.batch_size,
        sp=cfg.sp,
        stream=stream,
        config=config,
    )
    return plan, config


def slice_to_folder(
    cfg: RunConfig,
    out: str | Path,
    *,
    widths: Sequence[int] | None = None,
    lr: LRInput | None = None,
    stream: str = "auto",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> None:
    """``dynslice slice``: slice ``cfg``'s dense model and save it to ``out``, in RAM or streamed (``stream``:
    ``auto`` streams when the model does not fit in RAM).

    The widths are ``widths`` when given, else :func:`allocation` of ``lr`` (an LR file), else of the LR score
    computed on ``cfg``'s LR data, as :func:`run` does (constant slicing needs none). Every input is checked
    before the model is loaded.
    """
    check_run(cfg, "slice")
    plan, config = placement(cfg, stream)  # printed once every input has been checked, just before the work starts
    bench = Workbench.of(cfg)
    if config is None:
        config = bench.load().config  # loading names why the model cannot be planned or sliced
    check_context(config, cfg, "cal_seqlen")
    dims = ArchDims.from_config(config)
    extra: dict[str, Any] = {}
    if widths is not None:
        widths = list(validate_widths(widths, dims.layers, dims.hidden))
    elif lr is not None or cfg.sb == cfg.sp:
        alloc = allocation(cfg, dims, lr)  # a bad LR file or an infeasible SB fails here, before any work
        widths, extra["allocation"] = list(alloc.widths), alloc.to_json()
    elif plan is not None and plan.mode == "stream":
        raise ValueError("lr: dynamic widths (sb != sp) while streaming need --lr, an LR file from `dynslice lr`")
    else:
        check_context(config, cfg, "lr_seqlen")  # the LR score is computed below, as a run computes it
    if plan is not None:
        log(plan.describe())
    if plan is not None and plan.mode == "stream":
        folder = checkpoint_folder(cfg.model)
        cal = bench.calibration(cfg)
        slice_streamed(cfg, folder, cal, widths, out, tokenizer=bench.tokenizer, extra=extra, overwrite=overwrite)
        return
    if widths is None:
        alloc = allocation(cfg, dims, bench.lr(cfg))
        widths, extra["allocation"] = list(alloc.widths), alloc.to_json()
    model = slice_dense(bench.load(), cfg, bench.calibration(cfg), widths)
    save(model, cfg, out, bench.tokenizer, extra=extra, overwrite=overwrite)


# ------------------------------------------------------------------------------------------- one run
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


def choose_sb(bench: Workbench, cfg: RunConfig, lr: dict[str, Any]) -> dict[str, Any]:
    """Fibonacci search of SB on held-out calibration chunks (:func:`~dynslice.core.search.find_best_sb`); records
    every SB tried."""
    heldout = bench.heldout(cfg)
    costs: list[float] = []

    def objective(sb: float) -> float:
        t = time.perf_counter()
        try:
            alloc = allocation(cfg, bench.dims(), lr, sb=sb)
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
    bench = bench or Workbench.of(cfg)
    if (bench.model_spec, bench.dtype, bench.device) != (cfg.model, cfg.dtype, cfg.device):
        raise ValueError(
            f"bench: built for {bench.model_spec}/{bench.dtype}/{bench.device}, "
            f"run asks for {cfg.model}/{cfg.dtype}/{cfg.device}"
        )
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "config": cfg.to_json(),
        "versions": versions(),
        "protocol": differences(cfg.to_json()),
        "model": cfg.model,
        "architecture": architecture_of(bench.config),
        "sp": cfg.sp,
        "sb": cfg.sb,
        "budget": cfg.budget,
    }
    if cfg.dense:
        t = time.perf_counter()
        eval_model, widths = bench.load(), None
        timings["load"] = time.perf_counter() - t
        record.update(widths=[bench.dims().hidden] * bench.dims().layers, lr=None)
    else:
        # LR -> (SB search) -> widths -> slice
        t = time.perf_counter()
        lr = bench.lr(cfg)
        timings["lr"] = lr["time_s"]
        sb = cfg.sb
        if cfg.auto_sb:
            search = choose_sb(bench, cfg, lr)
            timings["auto_sb"] = time.perf_counter() - t - timings["lr"]
            record["auto_sb"] = search
            sb = search["best_sb"]
        alloc = allocation(cfg, bench.dims(), lr, sb=sb)
        widths = list(alloc.widths)
        t = time.perf_counter()
        eval_model = bench.sliced(cfg, widths)
        timings["slice"] = time.perf_counter() - t
        keep = (
            "metric",
            "lr",
            "normalized",
            "dataset",
            "tokens",
            "split",
            "sampler",
            "windows",
            "last_layer",
            "precision",
        )
        record.update(
            sb=sb,
            widths=widths,
            allocation=alloc.to_json(),
            lr={k: lr[k] for k in keep},
            slice_timings_s=eval_model.dynslice_info.timings_s,
        )
        if cfg.save_dir:  # only ever replaces a previous dynslice model (checked by the CLI)
            save(eval_model, cfg, cfg.save_dir, bench.tokenizer, extra={"allocation": alloc.to_json()}, overwrite=True)
    record["params"] = _param_record(bench, widths, eval_model)
    # evaluate
    t = time.perf_counter()
    record["ppl"], record["tasks"] = evaluate_model(eval_model, bench.tokenizer, cfg)
    timings["eval"] = time.perf_counter() - t
    record["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    record["numerics"] = numerics.describe(cfg.device)
    if out is not None:
        write_json(out, record)
    return record
