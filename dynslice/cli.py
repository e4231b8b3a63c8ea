"""Command line: ``dynslice lr | allocate | slice | eval | run | plan | sweep | launch | submit``.

Every command checks its outputs before any work, writes atomically, never replaces a file it did not write, and
on invalid input exits with status 2 and a one-line error that names the bad parameter (Ctrl-C: status 130).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dynslice.store.paths import configure_hf_cache

if TYPE_CHECKING:
    from dynslice.experiment.config import RunConfig

#: Marks a flag whose default is its RunConfig field's (or its protocol's).
_FIELD_DEFAULT = object()


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (usage is left to ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _at_least(low: int, none: bool = False, high: int | None = None):
    """argparse type: an integer >= ``low`` (and <= ``high``; ``none``: or the word ``none``, for ``None``)."""
    allowed = f">= {low}" + ("" if high is None else f" and <= {high}")

    def parse(text: str) -> int | None:
        if none and text == "none":
            return None
        try:
            value = int(text) if len(text) <= 100 else None
        except ValueError:
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer {allowed}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {allowed}")
        return value

    parse.__name__ = f"integer {allowed}"
    return parse


def _finite(text: str) -> float:
    """argparse type: a finite number."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _number_or_auto(text: str) -> float | str:
    """argparse type of ``--sb``: a finite number, or ``auto``."""
    from dynslice.experiment.config import AUTO

    if text == AUTO:
        return AUTO
    try:
        return _finite(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number in [0, sp] nor '{AUTO}'") from None


def _default_text(name: str) -> str:
    """A field's default as ``--help`` shows it: its value, or each protocol's for a protocol setting."""
    from dynslice.experiment.config import PROTOCOL_SETTINGS, PROTOCOLS, default_of

    if name in PROTOCOL_SETTINGS:
        return "the protocol's: " + ", ".join(f"{v} ({p})" for p, v in zip(PROTOCOLS, PROTOCOL_SETTINGS[name]))
    value = default_of(name)
    return " ".join(value) if isinstance(value, tuple) else str(value)


def _field_arg(p, name: str, *flags: str, default: object = _FIELD_DEFAULT, **overrides) -> None:
    """Add RunConfig field ``name`` to ``p`` with the type, choices, default and help of its
    :class:`~dynslice.experiment.config.Option`.

    Without ``flags`` the field's own spellings are used and the value lands in ``args.<name>``; with ``flags``
    (another command's spelling, e.g. ``lr --dataset`` for ``lr_dataset``) argparse names it after the flag.
    ``default=argparse.SUPPRESS`` leaves an absent flag out of the namespace, so that RunConfig's own default (or
    the protocol's) applies. ``overrides`` replace any argparse keyword (``type``, ``help``, ``required``, ...).
    """
    from dynslice.experiment.config import OPTIONS, default_of

    opt = OPTIONS[name]
    to_config = default is argparse.SUPPRESS  # the value goes to a RunConfig, which fills what is absent
    spec: dict = {} if flags else {"dest": name}
    flags = flags or opt.flags or (f"--{name.replace('_', '-')}",)
    spec["default"] = default_of(name) if default is _FIELD_DEFAULT else default
    shown = _default_text(name) if to_config else spec["default"]
    if isinstance(shown, tuple):
        shown = " ".join(shown)
    if opt.kind == "bool":
        spec["action"] = argparse.BooleanOptionalAction
    elif opt.kind == "names":
        spec.update(nargs="*" if default_of(name) == () else "+", metavar="NAME")
    elif opt.kind == "int":  # in a RunConfig, an optional field whose default is a number may be set to None
        spec["type"] = _at_least(
            opt.low or 0, none=to_config and opt.optional and default_of(name) is not None, high=opt.high
        )
    elif opt.kind in ("float", "sb"):
        spec["type"] = _finite if opt.kind == "float" else _number_or_auto
    text = overrides.pop("help", opt.help)
    if opt.choices and opt.cli_choices and opt.kind != "names":
        spec["choices"] = opt.choices
    elif opt.choices:  # checked after parsing, with the field's name in the error
        text += f"; one of {', '.join(opt.choices)}"
    spec.update(overrides)
    if spec.get("required"):
        spec.pop("default", None)
    elif shown not in (None, ""):
        text += f" (default: {shown})"
    p.add_argument(*flags, help=text, **spec)


def _model_args(p: argparse.ArgumentParser) -> None:
    _field_arg(p, "model", "--model", required=True)
    for name in ("dtype", "device", "seed", "batch_size"):
        _field_arg(p, name, f"--{name.replace('_', '-')}")
    p.add_argument("--overwrite", action="store_true", help="replace a previous dynslice output at --out")


#: What one ``dynslice run`` needs, unless it runs a whole profile (``--profile``).
RUN_REQUIRED = ("model", "sp", "sb", "out")


def _run_args(p: argparse.ArgumentParser) -> None:
    """Every RunConfig field as a flag of ``dynslice run`` (absent flags keep the field's default), or
    ``--profile`` to run every run of a profile (as ``dynslice sweep``)."""
    from dynslice.experiment.config import OPTIONS

    for name in OPTIONS:
        _field_arg(p, name, default=argparse.SUPPRESS)
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous dynslice output at --out (and at --save-model)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rerun and replace the record even if --out already holds this config's record",
    )
    p.add_argument("--out", default=argparse.SUPPRESS, help="the run record (JSON); required without --profile")
    p.add_argument(
        "--profile",
        default=None,
        help=f"instead of one run: every run of a profile ({_profile_names()} or a YAML file), as `dynslice sweep`",
    )
    p.add_argument("--root", default="results", help="with --profile: records go to <root>/<profile>/runs/")


def _parser() -> argparse.ArgumentParser:
    from dynslice.core.allocate import ORIENTATION
    from dynslice.core.checks import MAX_HIDDEN

    lr_file_metrics = tuple(ORIENTATION)  # the metrics an LR file may state (``redundancy``: already oriented)
    p = _Parser(prog="dynslice", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    lr = sub.add_parser("lr", help="Layer Redundancy score of a dense model")
    _model_args(lr)
    _field_arg(lr, "lr_dataset", "--dataset")
    _field_arg(lr, "lr_nsamples", "--nsamples", help="LR windows")
    _field_arg(lr, "lr_seqlen", "--seqlen")
    _field_arg(lr, "lr_metric", "--metric")
    lr.add_argument("--out", required=True)

    al = sub.add_parser("allocate", help="per-layer widths from an LR file")
    al.add_argument("--lr", required=True, help='LR JSON written by `dynslice lr`, {"lr": [...]} or a bare list')
    al.add_argument(
        "--lr-metric",
        default=None,
        choices=lr_file_metrics,
        help="metric of a hand-written LR file that does not state one",
    )
    _field_arg(al, "sp", "--sp", required=True)
    _field_arg(al, "sb", "--sb", type=_finite, required=True, help="slicing base SB, a number in [0, sp]")
    _field_arg(al, "round_interval", "--round-interval", type=int)  # the allocator names its range (1..64)
    for name in ("rounding", "budget", "count"):
        _field_arg(al, name, f"--{name}")
    al.add_argument("--model", default=None, help="model spec (its config is needed for --budget params)")
    al.add_argument(
        "--hidden",
        type=_at_least(1, high=MAX_HIDDEN),
        default=None,
        help="dense width D, for an LR file that does not record it",
    )
    al.add_argument("--overwrite", action="store_true", help="replace a previous dynslice record at --out")
    al.add_argument("--out", required=True)

    sl = sub.add_parser("slice", help="rotate-and-slice a model and save it")
    _model_args(sl)
    g = sl.add_mutually_exclusive_group(required=True)
    g.add_argument("--widths", help="widths JSON written by `dynslice allocate` (or a JSON list)")
    _field_arg(g, "sp", "--sp", default=None)
    _field_arg(sl, "sb", "--sb", type=_finite, default=None, help="slicing base SB, a number in [0, sp] (default: sp)")
    sl.add_argument("--lr", default=None, help="LR JSON; computed on the calibration data when omitted")
    sl.add_argument(
        "--lr-metric",
        default=None,
        choices=lr_file_metrics,
        help="metric of a hand-written LR file that does not state one",
    )
    _field_arg(sl, "round_interval", "--round-interval", type=int)
    for name in ("rounding", "budget", "cal_dataset", "cal_nsamples", "cal_seqlen"):
        _field_arg(sl, name, f"--{name.replace('_', '-')}")
    sl.add_argument("--out", required=True, help="folder for the sliced model")
    sl.add_argument(
        "--stream",
        default="auto",
        choices=["auto", "on", "off"],
        help="read one layer at a time from safetensors (auto: when the model does not fit in RAM)",
    )

    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model")
    _model_args(ev)
    for name in ("ppl_datasets", "ppl_seqlen", "ppl_protocol", "ppl_max_chunks", "ppl_nsamples", "tasks", "task_limit"):
        _field_arg(ev, name)
    ev.add_argument("--out", required=True)

    rn = sub.add_parser("run", help="LR -> widths -> slice -> evaluate, one JSON record")
    _run_args(rn)

    pl = sub.add_parser(
        "plan", help="predict peak memory of a slicing (--model), or the runs and GPU-hours of a profile (--profile)"
    )
    what = pl.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model spec, or a folder holding only config.json")
    what.add_argument("--profile", help=f"a profile ({_profile_names()} or a YAML file): list its runs and their cost")
    pl.add_argument("--shards", type=_at_least(1, high=10_000), default=1, help="with --profile: the hours of N shards")
    pl.add_argument(
        "--gpu-tflops",
        type=_finite,
        default=None,
        help="with --profile: assumed effective GPU throughput (default 125; no GPU was measured)",
    )
    pl.add_argument("--list", action="store_true", help="with --profile: print every run and its predicted time")
    _field_arg(pl, "dtype", "--dtype", default="bf16")
    _field_arg(pl, "device", "--device")
    _field_arg(pl, "batch_size", "--batch-size")
    _field_arg(pl, "cal_nsamples", "--cal-nsamples", default=128)  # the paper's calibration size
    _field_arg(pl, "cal_seqlen", "--cal-seqlen", default=2048)
    _field_arg(pl, "sp", "--sp", default=0.3, help="constant slicing fraction used for the output size")
    pl.add_argument("--stream", default="auto", choices=["auto", "on", "off"])
    pl.add_argument("--host-gib", type=_finite, default=None, help="host RAM to plan for (default: available now)")
    pl.add_argument("--gpu-gib", type=_finite, default=None, help="GPU memory to plan for (default: free now)")
    pl.add_argument("--out", default=None, help="also write the plan as JSON here")
    pl.add_argument("--overwrite", action="store_true", help="replace a previous plan record at --out")

    sw = sub.add_parser("sweep", help="run a profile's runs (or one shard of them); finished runs are skipped")
    _profile_args(sw)
    sw.add_argument("--shard", default=None, help="K/N: run only shard K (from 0) of N, balanced by predicted cost")
    sw.add_argument(
        "--phase",
        default="all",
        choices=["sweep", "zero-shot", "all"],
        help="sweep runs, the best-SB zero-shot runs (after the sweep), or both in order",
    )
    sw.add_argument("--force", action="store_true", help="rerun finished runs")
    sw.add_argument("--missing", action="store_true", help="only list the runs not finished yet; run nothing")

    la = sub.add_parser("launch", help="one shard per GPU (or CPU process) on this node: the sweep, then zero-shot")
    _profile_args(la)
    where = la.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpus", help="GPU ids, e.g. 0,1,2,3, or 'all' (the visible ones)")
    where.add_argument("--processes", type=_at_least(1, high=1024), help="N shards as CPU processes")

    sb = sub.add_parser(
        "submit", help="a Slurm job array through submitit, one shard per task (pip install 'dynslice[cluster]')"
    )
    _profile_args(sb)
    sb.add_argument("--shards", type=_at_least(1, high=10_000), required=True, help="array tasks (shards)")
    sb.add_argument(
        "--cluster",
        default=None,
        choices=["slurm", "local"],
        help="default: Slurm when sbatch is found; local runs the tasks as local processes",
    )
    sb.add_argument("--partition", default=None, help="Slurm partition")
    sb.add_argument("--gpus-per-task", type=_at_least(0, high=64), default=1)
    sb.add_argument("--cpus-per-task", type=_at_least(1, high=1024), default=8)
    sb.add_argument("--mem-gb", type=_at_least(1, high=1 << 20), default=64)
    sb.add_argument("--timeout-min", type=_at_least(1, high=10**6), default=24 * 60)
    sb.add_argument("--wait", action="store_true", help="wait until every task has finished")
    return p


def _profile_names() -> str:
    from dynslice.experiment.profiles import shipped_profiles

    return ", ".join(shipped_profiles())


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help=f"{_profile_names()} or a profile YAML file")
    p.add_argument("--root", default="results", help="records go to <root>/<profile>/runs/")


def _read_widths(spec: str) -> list[int]:
    """``--widths``: a JSON list, or a file holding one (bare, or under ``"widths"`` as `allocate` writes it)."""
    import json

    from dynslice.store.jsonio import read_json

    text = spec.strip()
    if text.startswith("["):
        if len(text) > 1 << 20:
            raise ValueError(f"widths: the --widths list is {len(text)} characters; at most {1 << 20} are allowed")
        try:
            obj = json.loads(text, parse_constant=lambda c: float(c))
        except RecursionError:
            raise ValueError("widths: the --widths list nests too deeply") from None
        except ValueError as e:
            raise ValueError(f"widths: {text[:60]!r} is not a JSON list of integers ({e})") from None
        where = "the --widths list"
    else:
        from dynslice.store.records import MAX_LR_BYTES

        obj = read_json(spec, max_bytes=MAX_LR_BYTES)
        where = spec
    if isinstance(obj, dict) and "widths" not in obj and "lr" in obj:
        raise ValueError(f"widths: {where} holds LR scores, not widths; pass it as --lr")
    from dynslice.core.checks import MAX_HIDDEN, MAX_LAYERS

    widths = obj.get("widths") if isinstance(obj, dict) else obj
    if not isinstance(widths, list) or not widths:
        raise ValueError(f"widths: {where} holds no non-empty 'widths' list")
    if len(widths) > MAX_LAYERS:
        raise ValueError(f"widths: {where} has {len(widths)} widths; at most {MAX_LAYERS} layers are allowed")
    for i, w in enumerate(widths):
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_HIDDEN:
            raise ValueError(f"widths[{i}]: {w!r} in {where} is not an integer in 1..{MAX_HIDDEN}")
    return widths


def _check_model(command: str, model: str, dtype: str, device: str, *, dense: bool) -> None:
    """Validate ``--model``, ``--dtype`` and ``--device`` before any work; ``dense`` refuses sliced models."""
    from dynslice.store.models import parse_device, parse_dtype, resolve_spec

    parse_dtype(dtype)
    parse_device(device)
    r = resolve_spec(model)
    if dense and r.kind == "sliced":
        from dynslice.store.io import read_sliced_meta

        base = read_sliced_meta(r.location)["base_model"]
        raise ValueError(
            f"model: {model} is already sliced (from {base}); {command} needs a dense model, "
            f"such as its base model {base}"
        )


def _check_context(config, **seqlens: int | None) -> None:
    """Refuse sequence lengths beyond the model's context (``config.max_position_embeddings``)."""
    ctx = getattr(config, "max_position_embeddings", None)
    for name, value in seqlens.items():
        if ctx and value is not None and value > ctx:
            raise ValueError(f"{name}: {value} is beyond the model's context of {ctx} tokens (allowed 2..{ctx})")


def _check_lr_fits(a: argparse.Namespace, redundancy, dims) -> None:
    """An LR file (``--lr``) must have been computed for this model's width and have one score per layer."""
    if redundancy is None:
        return
    if redundancy.hidden not in (None, dims.hidden):
        raise ValueError(f"lr: {a.lr} was computed for width {redundancy.hidden}, but {a.model} has {dims.hidden}")
    if len(redundancy.redundancy) != dims.layers:
        raise ValueError(f"lr: {a.lr} has {len(redundancy.redundancy)} scores but {a.model} has {dims.layers} layers")


def _check_names(ppl: Sequence[str] = (), tasks: Sequence[str] = (), **datasets: str) -> None:
    """Dataset and task names, checked before any model is loaded."""
    from dynslice.experiment.config import DATASETS
    from dynslice.measure.evaluate import METRIC

    for param, name in datasets.items():
        if name not in DATASETS:
            raise ValueError(f"{param}: {name!r} is not a known dataset; choose one of {', '.join(DATASETS)}")
    for name in ppl:
        if name not in DATASETS:
            raise ValueError(f"ppl: {name!r} is not a known dataset; choose one of {', '.join(DATASETS)}")
    unknown = [t for t in tasks if t not in METRIC]
    if unknown:
        raise ValueError(f"tasks: {unknown} are not known tasks; known tasks are {', '.join(sorted(METRIC))}")


def _cmd_lr(a: argparse.Namespace) -> None:
    from dynslice.core.adapters import get_adapter
    from dynslice.core.lr import layer_redundancy
    from dynslice.measure import data
    from dynslice.store.jsonio import write_json
    from dynslice.store.models import load_model, load_tokenizer
    from dynslice.store.outputs import check_json_out

    out = check_json_out(a.out, overwrite=a.overwrite)
    _check_names(dataset=a.dataset)
    _check_model(a.command, a.model, a.dtype, a.device, dense=True)
    model = load_model(a.model, a.dtype, a.device)
    _check_context(model.config, seqlen=a.seqlen)
    tok = load_tokenizer(a.model)
    batch = data.calibration_batch(a.dataset, tok, a.nsamples, a.seqlen, seed=a.seed)
    t = time.perf_counter()
    score = layer_redundancy(model, batch, metric=a.metric, batch_size=a.batch_size)
    adapter = get_adapter(model)
    write_json(
        out,
        {
            **score.to_json(),
            "model": a.model,
            "hidden": adapter.hidden_size,
            "num_layers": adapter.num_layers,
            "dataset": a.dataset,
            "nsamples": a.nsamples,
            "seqlen": a.seqlen,
            "seed": a.seed,
            "time_s": round(time.perf_counter() - t, 3),
        },
    )


def _cmd_allocate(a: argparse.Namespace) -> None:
    from dynslice.core.allocate import allocate
    from dynslice.core.params import ArchDims
    from dynslice.store.jsonio import write_json
    from dynslice.store.outputs import check_json_out
    from dynslice.store.records import read_lr

    out = check_json_out(a.out, overwrite=a.overwrite)
    lr = read_lr(a.lr, a.lr_metric)
    dims = None
    if a.model is not None:
        from dynslice.store.models import load_model

        dims = ArchDims.from_config(load_model(a.model).config)
    elif a.budget == "params":
        raise ValueError("model: --budget params needs --model to count parameters")
    sources = {"--model": dims.hidden if dims else None, "--hidden": a.hidden, f"{a.lr}": lr.hidden}
    given = {k: v for k, v in sources.items() if v is not None}
    if len(set(given.values())) > 1:
        detail = ", ".join(f"{k} ({v})" for k, v in given.items())
        raise ValueError(f"hidden: the dense width disagrees between {detail}")
    if not given:
        raise ValueError(f"hidden: {a.lr} records no dense width (hidden); pass --model or --hidden")
    hidden = next(iter(given.values()))
    alloc = allocate(
        list(lr.redundancy),
        a.sp,
        a.sb,
        hidden,
        round_interval=a.round_interval,
        budget=a.budget,
        dims=dims,
        count=a.count,
        rounding=a.rounding,
    )
    write_json(out, {**alloc.to_json(), "lr_file": str(a.lr), "lr_metric": lr.metric, "model": a.model or lr.model})


def _cmd_slice(a: argparse.Namespace) -> None:
    from dynslice.core.allocate import _check_sp_sb, allocate, redundancy_scores
    from dynslice.core.lr import layer_redundancy
    from dynslice.core.params import ArchDims, validate_widths
    from dynslice.core.slicing import slice_model
    from dynslice.measure import data
    from dynslice.store.io import save_sliced
    from dynslice.store.models import load_model, load_tokenizer
    from dynslice.store.outputs import check_model_out
    from dynslice.store.records import read_lr

    out = check_model_out(a.out, overwrite=a.overwrite)
    widths = None
    if a.widths is not None:
        for flag, value in (("sb", a.sb), ("lr", a.lr), ("lr_metric", a.lr_metric)):
            if value is not None:
                raise ValueError(
                    f"{flag}: --{flag.replace('_', '-')} has no effect with --widths (the widths are "
                    "given); drop one of them"
                )
        widths = _read_widths(a.widths)
    _check_names(cal_dataset=a.cal_dataset)
    _check_model(a.command, a.model, a.dtype, a.device, dense=True)
    redundancy = read_lr(a.lr, a.lr_metric) if a.lr is not None else None
    placement = _slice_plan(a)  # printed once every input has been checked, just before the work starts
    if placement is not None and placement.mode == "stream":
        return _cmd_slice_stream(a, out, widths, redundancy, placement)
    model = load_model(a.model, a.dtype, a.device)
    _check_context(model.config, cal_seqlen=a.cal_seqlen)
    dims = ArchDims.from_config(model.config)
    if a.widths is None:
        _check_lr_fits(a, redundancy, dims)
    extra: dict = {
        "calibration": {"dataset": a.cal_dataset, "nsamples": a.cal_nsamples, "seqlen": a.cal_seqlen, "seed": a.seed}
    }

    def widths_from(scores: list[float]) -> list[int]:
        alloc = allocate(
            scores,
            a.sp,
            sb,
            dims.hidden,
            round_interval=a.round_interval,
            budget=a.budget,
            dims=dims,
            rounding=a.rounding,
        )
        extra["allocation"] = alloc.to_json()
        return list(alloc.widths)

    sb = None
    if a.widths is not None:
        validate_widths(widths, dims.layers, dims.hidden)
    else:  # allocate now when no LR is to be computed, so that a bad --sp/--sb fails before any work
        sb = a.sp if a.sb is None else a.sb
        if redundancy is not None:
            widths = widths_from(list(redundancy.redundancy))
        elif sb == a.sp:  # constant slicing needs no LR; any non-constant profile gives FS_i = SP when SB = SP
            widths = widths_from(list(range(dims.layers)))
        else:
            _check_sp_sb(a.sp, sb)
            widths = None
    if placement is not None:
        print(placement.describe(), file=sys.stderr)
    tok = load_tokenizer(a.model)
    cal = data.calibration_batch(a.cal_dataset, tok, a.cal_nsamples, a.cal_seqlen, seed=a.seed)
    if widths is None:
        score = layer_redundancy(model, cal, batch_size=a.batch_size)
        widths = widths_from(list(redundancy_scores(score.raw, score.metric)))
    slice_model(model, cal, widths, batch_size=a.batch_size)
    save_sliced(model, out, a.model, tok, extra=extra, overwrite=a.overwrite)


def _config_from(a: argparse.Namespace, **fixed) -> RunConfig:
    """The RunConfig of the fields in ``a`` (flags made by :func:`_field_arg`), then ``fixed``."""
    from dynslice.experiment.config import OPTIONS, RunConfig

    return RunConfig(**{**{k: v for k, v in vars(a).items() if k in OPTIONS}, **fixed})


def _cmd_eval(a: argparse.Namespace) -> None:
    from dynslice.core.adapters import count_parameters
    from dynslice.experiment.numerics import describe as describe_numerics
    from dynslice.experiment.pipeline import evaluate_model, versions
    from dynslice.store.jsonio import write_json
    from dynslice.store.models import load_model, load_tokenizer
    from dynslice.store.outputs import check_json_out

    out = check_json_out(a.out, overwrite=a.overwrite)
    _check_names(ppl=a.ppl_datasets, tasks=a.tasks)
    _check_model(a.command, a.model, a.dtype, a.device, dense=False)
    cfg = _config_from(a, sp=0.0, sb=0.0)
    model = load_model(a.model, a.dtype, a.device)
    _check_context(model.config, ppl_seqlen=a.ppl_seqlen)
    tok = load_tokenizer(a.model)
    t = time.perf_counter()
    ppl, tasks = evaluate_model(model, tok, cfg)
    widths = getattr(getattr(model, "dynslice_info", None), "widths", None)
    write_json(
        out,
        {
            "config": {k: v for k, v in cfg.to_json().items() if not k.startswith(("sp", "sb"))},
            "versions": versions(),
            "model": a.model,
            "ppl": ppl,
            "tasks": tasks,
            "params": {"total": count_parameters(model)},
            "widths": None if widths is None else list(widths),
            "timings_s": {"eval": round(time.perf_counter() - t, 3)},
            "numerics": describe_numerics(a.device),
        },
    )


def _cmd_run(a: argparse.Namespace) -> None:
    if a.profile is not None:
        given = sorted(k for k in vars(a) if k not in ("command", "overwrite", "force", "profile", "root"))
        if given:
            raise ValueError(
                f"profile: --profile runs every run of the profile; leave out "
                f"{', '.join('--' + k.replace('_', '-') for k in given)}"
            )
        from dynslice.experiment.profiles import load_profile

        _run_profile(a.command, load_profile(a.profile), a.root, "all", None, a.force)
        return
    missing = [f"--{k}" for k in RUN_REQUIRED if k not in vars(a)]
    if missing:
        raise ValueError(f"run: {', '.join(missing)} required (or --profile NAME to run a whole profile)")
    from dynslice.experiment.pipeline import Workbench, run
    from dynslice.store.jsonio import read_json
    from dynslice.store.models import load_model, load_tokenizer
    from dynslice.store.outputs import check_json_out, check_model_out, is_dynslice_record

    cfg = _config_from(a)
    out = Path(a.out) if a.out and a.out.strip() else None
    done = (
        out is not None
        and not a.force
        and out.is_file()
        and is_dynslice_record(out)
        and read_json(out).get("config") == cfg.to_json()
    )
    if done:
        return  # this config's record is already there: nothing to do
    out = check_json_out(a.out, overwrite=a.overwrite or a.force)
    if cfg.save_dir is not None:
        check_model_out(cfg.save_dir, overwrite=a.overwrite, param="save_model")
    _check_names(tasks=cfg.tasks)  # the datasets are checked by the config
    _check_model(a.command, cfg.model, cfg.dtype, cfg.device, dense=True)
    model = load_model(cfg.model, cfg.dtype, cfg.device)
    _check_context(model.config, lr_seqlen=cfg.lr_seqlen, cal_seqlen=cfg.cal_seqlen, ppl_seqlen=cfg.ppl_seqlen)
    bench = Workbench(cfg.model, cfg.dtype, cfg.device, _model=model, _tokenizer=load_tokenizer(cfg.model))
    run(cfg, out, bench=bench, force=True)


def _config_of(spec: str):
    """The model config of a spec, read without the weights (a folder with just config.json is enough)."""
    from transformers import AutoConfig

    from dynslice.store.models import resolve_spec, tiny_random_model

    r = resolve_spec(spec)
    if r.kind == "sliced":
        raise ValueError(f"model: {spec} is already sliced; plan the slicing of its base model")
    if r.kind == "tiny":
        return tiny_random_model().config
    kw = {"gguf_file": r.gguf_file} if r.gguf_file else {}
    return AutoConfig.from_pretrained(r.location, **kw)


def _memory_plan(
    a: argparse.Namespace,
    stream: str,
    nsamples: int,
    seqlen: int,
    sp: float = 0.3,
    host_gib: float | None = None,
    gpu_gib: float | None = None,
    weights_needed: bool = True,
):
    import torch

    from dynslice.store.memory import GIB, Shapes, plan
    from dynslice.store.models import resolve_spec
    from dynslice.store.stream import is_streamable

    try:
        dev_type = torch.device(a.device).type  # a plan may be made for a GPU this machine does not have
    except (RuntimeError, TypeError):
        dev_type = None
    if dev_type not in ("cpu", "cuda"):
        raise ValueError(f"device: {a.device!r} is not cpu or cuda[:N]")
    r = resolve_spec(a.model)
    # a plan may be made from a bare config.json, before the weights are downloaded
    streamable = r.kind == "hub" or (r.kind == "dir" and (not weights_needed or is_streamable(r.location)))
    for name, v in (("host-gib", host_gib), ("gpu-gib", gpu_gib)):
        if v is not None and not v > 0:
            raise ValueError(f"{name}: {v} is outside {name} > 0")
    return plan(
        Shapes.from_config(_config_of(a.model)),
        nsamples,
        seqlen,
        a.dtype,
        device=str(a.device),
        batch_size=a.batch_size,
        sp=sp,
        stream=stream,
        streamable=streamable,
        host_bytes=None if host_gib is None else int(host_gib * GIB),
        gpu_bytes=None if gpu_gib is None else int(gpu_gib * GIB),
    )


def _slice_plan(a: argparse.Namespace):
    """The placement plan of `dynslice slice` (in RAM or streamed), or None for a model of an architecture that
    cannot be sliced (loading it gives the reason). The caller prints it just before the work starts."""
    from dynslice.core.adapters import supported_architectures

    try:
        archs = getattr(_config_of(a.model), "architectures", None) or []
    except Exception:  # noqa: BLE001 - an unreadable model: loading it below names the problem
        if a.stream == "on":
            raise
        return None
    if archs and not any(name in supported_architectures() for name in archs):
        if a.stream == "on":
            raise ValueError(
                f"stream: {a.model} is not a supported architecture "
                f"({', '.join(supported_architectures())}); it cannot be streamed"
            )
        return None
    sp = a.sp if a.sp is not None else 0.3
    return _memory_plan(a, a.stream, a.cal_nsamples, a.cal_seqlen, sp)


def _cmd_slice_stream(a: argparse.Namespace, out: Path, widths: list[int] | None, redundancy, placement) -> None:
    """`dynslice slice` reading one layer at a time from the safetensors files (inputs already checked)."""
    from dynslice.core.allocate import _check_sp_sb, allocate
    from dynslice.core.params import ArchDims, validate_widths
    from dynslice.measure import data
    from dynslice.store.models import load_tokenizer, resolve_spec
    from dynslice.store.stream import slice_streaming

    r = resolve_spec(a.model)
    config = _config_of(a.model)
    dims = ArchDims.from_config(config)
    _check_context(config, cal_seqlen=a.cal_seqlen)
    extra: dict = {
        "calibration": {"dataset": a.cal_dataset, "nsamples": a.cal_nsamples, "seqlen": a.cal_seqlen, "seed": a.seed}
    }
    if widths is not None:
        validate_widths(widths, dims.layers, dims.hidden)
    else:
        sb = a.sp if a.sb is None else a.sb
        _check_sp_sb(a.sp, sb)
        _check_lr_fits(a, redundancy, dims)
        if redundancy is not None:
            scores = list(redundancy.redundancy)
        elif sb != a.sp:
            raise ValueError("lr: dynamic widths (sb != sp) while streaming need --lr, an LR file from `dynslice lr`")
        else:  # constant slicing needs no LR
            scores = list(range(dims.layers))
        alloc = allocate(
            scores,
            a.sp,
            sb,
            dims.hidden,
            round_interval=a.round_interval,
            budget=a.budget,
            dims=dims,
            rounding=a.rounding,
        )
        widths = list(alloc.widths)
        extra["allocation"] = alloc.to_json()
    folder = r.location
    if r.kind == "hub":
        from huggingface_hub import snapshot_download

        folder = snapshot_download(r.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    print(placement.describe(), file=sys.stderr)
    tok = load_tokenizer(a.model)
    cal = data.calibration_batch(a.cal_dataset, tok, a.cal_nsamples, a.cal_seqlen, seed=a.seed)
    slice_streaming(
        folder,
        cal,
        widths,
        out,
        dtype=a.dtype,
        base_model=a.model,
        batch_size=a.batch_size,
        device=a.device,
        tokenizer=tok,
        extra=extra,
        overwrite=a.overwrite,
    )


def _cmd_plan(a: argparse.Namespace) -> None:
    from dynslice.store.jsonio import write_json
    from dynslice.store.outputs import check_json_out

    if a.out:
        check_json_out(a.out, overwrite=a.overwrite)
    if a.profile is not None:
        from dynslice.scale.cost import describe, profile_plan

        plan = profile_plan(a.profile, shards=a.shards, gpu_tflops=a.gpu_tflops)
        print(describe(plan, list_runs=a.list))
        if a.out:
            write_json(a.out, plan)
        return
    if not 0 <= a.sp < 1:
        raise ValueError(f"sp: {a.sp} is outside 0 <= sp < 1")
    p = _memory_plan(a, a.stream, a.cal_nsamples, a.cal_seqlen, a.sp, a.host_gib, a.gpu_gib, weights_needed=False)
    print(p.describe())
    if a.out:
        write_json(
            a.out,
            {
                **p.to_json(),
                "model": a.model,
                "cal_nsamples": a.cal_nsamples,
                "cal_seqlen": a.cal_seqlen,
                "batch_size": a.batch_size,
                "sp": a.sp,
            },
        )


def _cmd_sweep(a: argparse.Namespace) -> None:
    from dynslice.experiment.profiles import load_profile, run_name
    from dynslice.experiment.sweep import missing_text, profile_missing
    from dynslice.scale.shard import parse_shard, shard_from_env

    profile = load_profile(a.profile)
    shard = parse_shard(a.shard) if a.shard is not None else shard_from_env()
    if a.missing:
        missing, total = profile_missing(profile, a.root)
        print(missing_text(missing, total))
        for c in missing:
            print(f"  {c.model}  {run_name(c)}  {c.key()}")
        return
    _run_profile(a.command, profile, a.root, a.phase, shard, a.force)


def _run_profile(command: str, profile, root: str, phase: str, shard: tuple[int, int] | None, force: bool) -> None:
    """Run ``phase`` of a loaded profile (``dynslice sweep``, ``dynslice run --profile``); name infeasible runs."""
    from dynslice.experiment.numerics import PINNED_ENV, is_pinned
    from dynslice.experiment.sweep import run_phase
    from dynslice.scale.shard import picker

    if profile.numerics == "pinned" and not is_pinned():
        print(
            f"dynslice {command}: note: profile {profile.name} is published with pinned arithmetic; this process "
            f"is not pinned (export {' '.join(f'{k}={v}' for k, v in PINNED_ENV.items())} before starting, as "
            "run_all.sh does), so its records are checked with the measured tolerances, not bit for bit",
            file=sys.stderr,
        )
    results = run_phase(profile, root, phase, pick=picker(shard), force=force)
    if any(r.infeasible for r in results):
        print(
            f"dynslice {command}: {sum(len(r.infeasible) for r in results)} runs are infeasible (noted under "
            f"{Path(root) / profile.name / 'infeasible'})",
            file=sys.stderr,
        )


def _cmd_launch(a: argparse.Namespace) -> None:
    from dynslice.scale.launch import launch, parse_gpus

    gpus = parse_gpus(a.gpus) if a.gpus is not None else None
    if launch(a.profile, a.root, gpus=gpus, processes=a.processes) != 0:
        raise RuntimeError("a shard failed (its log is named above); rerun the same command to finish it")


def _cmd_submit(a: argparse.Namespace) -> None:
    from dynslice.scale.cluster import submit

    params: dict = {"timeout_min": a.timeout_min, "cpus_per_task": a.cpus_per_task, "mem_gb": a.mem_gb}
    if a.cluster != "local":
        params["gpus_per_node"] = a.gpus_per_task
        if a.partition:
            params["slurm_partition"] = a.partition
    submit(a.profile, a.root, a.shards, cluster=a.cluster, params=params, wait=a.wait)


COMMANDS = {
    "lr": _cmd_lr,
    "allocate": _cmd_allocate,
    "slice": _cmd_slice,
    "eval": _cmd_eval,
    "run": _cmd_run,
    "plan": _cmd_plan,
    "sweep": _cmd_sweep,
    "launch": _cmd_launch,
    "submit": _cmd_submit,
}


def _one_line(command: str, kind: str, message: object) -> str:
    text = " ".join(str(message).split()) or type(message).__name__
    return f"{command}: {kind}: {text}"


def _interrupt_tracker() -> tuple[list[int], object]:
    """Route SIGINT through a handler that remembers it, so that an interrupt which a library turns into another
    exception (e.g. one that lands inside an import) is still reported as an interrupt."""
    seen: list[int] = []

    def on_sigint(signum, _frame):
        seen.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: leave the default handler
        previous = None
    return seen, previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynslice`` command: 0 done, 2 bad input, 1 failure, 130 interrupted."""
    # Ctrl-C is caught from the start: building the parser imports torch (through the run configuration).
    seen, previous = _interrupt_tracker()
    command = "dynslice"
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2), already printed
            return e.code if isinstance(e.code, int) else 2
        command = f"dynslice {args.command}"
        configure_hf_cache()
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(_interrupted(command), file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if seen:
            print(_interrupted(command), file=sys.stderr)
            return 130
        print(_one_line(command, "error", e), file=sys.stderr)
        return 2
    except Exception as e:  # a failure that is not the input's fault: one line, the traceback on request
        if seen:
            print(_interrupted(command), file=sys.stderr)
            return 130
        if os.environ.get("DYNSLICE_DEBUG"):
            raise
        print(
            _one_line(command, "failed", f"{type(e).__name__}: {e} (set DYNSLICE_DEBUG=1 for the traceback)"),
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        from dynslice.store import outputs

        outputs.release_claims()
    if getattr(args, "out", None):
        print(f"wrote {Path(args.out)}")
    return 0


def entry() -> None:
    """The ``dynslice`` console command and ``python -m dynslice``: :func:`main`, then exit with its code.

    After Ctrl-C the process leaves at once with 130. CPython remembers a KeyboardInterrupt that passed through
    Python code run from C++ (pybind11's ``exec``, used while torch imports) and would otherwise kill itself with
    SIGINT at shutdown, even though :func:`main` handled the interrupt.
    """
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


def _interrupted(command: str) -> str:
    # on a line of its own: a progress bar may be half-drawn when Ctrl-C comes
    return f"\n{command}: interrupted; nothing half-written was left at the output"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
