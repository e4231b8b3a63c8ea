"""Command line: ``dynslice lr | allocate | slice | eval | finetune | run | plan | sweep | launch | submit``.

Every command checks its outputs before any work, writes atomically, never replaces a file it did not write, and
on invalid input exits with status 2 and a one-line error that names the bad parameter (Ctrl-C: status 130).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
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
    keep = argparse.SUPPRESS  # absent: the RunConfig's default, or the protocol's
    _field_arg(lr, "protocol", default=keep)
    _field_arg(lr, "lr_dataset", "--dataset", "--lr-dataset", dest="lr_dataset", default=keep)
    _field_arg(lr, "lr_split", "--split", "--lr-split", dest="lr_split", default=keep)
    _field_arg(lr, "lr_sampler", "--sampler", "--lr-sampler", dest="lr_sampler", default=keep)
    _field_arg(lr, "lr_nsamples", "--nsamples", "--lr-nsamples", dest="lr_nsamples", default=keep, help="LR windows")
    _field_arg(lr, "lr_seqlen", "--seqlen", "--lr-seqlen", dest="lr_seqlen", default=keep)
    _field_arg(lr, "lr_stride", "--stride", "--lr-stride", dest="lr_stride", default=keep)
    _field_arg(lr, "lr_last_layer", "--last-layer", "--lr-last-layer", dest="lr_last_layer", default=keep)
    _field_arg(lr, "lr_precision", "--precision", "--lr-precision", dest="lr_precision", default=keep)
    _field_arg(lr, "lr_metric", "--metric", "--lr-metric", dest="lr_metric", default=keep)
    lr.add_argument("--out", required=True)

    al = sub.add_parser("allocate", help="per-layer widths from an LR file")
    al.add_argument("--lr", required=True, help='LR JSON written by `dynslice lr`, {"lr": [...]} or a bare list')
    al.add_argument(
        "--lr-metric",
        dest="lr_file_metric",
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
        dest="lr_file_metric",
        default=None,
        choices=lr_file_metrics,
        help="metric of a hand-written LR file that does not state one",
    )
    _field_arg(sl, "round_interval", "--round-interval", type=int)
    for name in ("rounding", "budget", "cal_dataset", "cal_nsamples", "cal_seqlen", "lr_dataset", "lr_nsamples"):
        _field_arg(sl, name, f"--{name.replace('_', '-')}")
    _field_arg(sl, "lr_seqlen", "--lr-seqlen")
    _field_arg(sl, "lr_precision", "--lr-precision")
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

    ft = sub.add_parser("finetune", help="recovery fine-tuning (LoRA, merged) of a sliced model folder")
    _finetune_args(ft)

    rn = sub.add_parser("run", help="LR -> widths -> slice -> evaluate, one JSON record")
    _run_args(rn)

    pl = sub.add_parser(
        "plan",
        help="predict peak memory of a slicing (--model), or the runs, GPU-hours and peak memory of a profile's "
        "sweep (--profile)",
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


def _finetune_args(p: argparse.ArgumentParser) -> None:
    """``dynslice finetune``: the model and output, then every FinetuneConfig field as a flag (absent flags keep the
    field's default)."""
    from dynslice.experiment.config import DTYPES
    from dynslice.experiment.finetune import OPTIONS, FinetuneConfig

    p.add_argument("--model", required=True, help="a sliced model folder (written by `dynslice slice`)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned sliced model")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights and compute dtype (default: the saved one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default: OUT.checkpoints); resumed")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints after the final save")
    p.add_argument("--overwrite", action="store_true", help="replace a previous dynslice model at --out")
    defaults = FinetuneConfig()
    for name, opt in OPTIONS.items():
        spec: dict = {"dest": f"ft_{name}", "default": argparse.SUPPRESS, "metavar": name.upper()}
        default = getattr(defaults, name)
        if opt.kind == "int":
            spec["type"] = _at_least(opt.low or 0, high=opt.high)
        elif opt.kind == "float":
            spec["type"] = _finite
        elif opt.kind == "names":
            spec.update(nargs="+", metavar="NAME")
        if opt.choices and (opt.kind == "names" or not opt.cli_choices):
            text = f"{opt.help}; one of {', '.join(opt.choices)}"
        else:
            text = opt.help
            if opt.choices:
                spec["choices"] = opt.choices
        shown = " ".join(default) if isinstance(default, tuple) else default
        p.add_argument(f"--{name.replace('_', '-')}", help=f"{text} (default: {shown})", **spec)


def _profile_names() -> str:
    from dynslice.experiment.profiles import shipped_profiles

    return ", ".join(shipped_profiles())


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help=f"{_profile_names()} or a profile YAML file")
    p.add_argument("--root", default="results", help="records go to <root>/<profile>/runs/")


def _config_from(a: argparse.Namespace, *, unset: Sequence[str] = (), **fixed) -> RunConfig:
    """The RunConfig of the fields in ``a`` (flags made by :func:`_field_arg`), then ``fixed``; a field named in
    ``unset`` whose flag was not given (``None``) keeps the RunConfig's default."""
    from dynslice.experiment.config import OPTIONS, RunConfig

    given = {k: v for k, v in vars(a).items() if k in OPTIONS and not (k in unset and v is None)}
    return RunConfig(**{**given, **fixed})


def _cmd_lr(a: argparse.Namespace) -> None:
    from dynslice.experiment import pipeline
    from dynslice.store.jsonio import write_json
    from dynslice.store.outputs import check_json_out

    out = check_json_out(a.out, overwrite=a.overwrite)
    cfg = _config_from(a)
    pipeline.check_run(cfg, a.command)
    bench = pipeline.Workbench.of(cfg)
    pipeline.check_context(bench.config, cfg, "lr_seqlen")
    write_json(out, pipeline.lr_record(bench, cfg))


def _cmd_allocate(a: argparse.Namespace) -> None:
    from dynslice.experiment.widths import allocation, dims_of
    from dynslice.store.jsonio import write_json
    from dynslice.store.outputs import check_json_out
    from dynslice.store.records import read_lr

    out = check_json_out(a.out, overwrite=a.overwrite)
    lr = read_lr(a.lr, a.lr_file_metric)
    cfg = _config_from(a, model=a.model or lr.model or "unknown")
    alloc = allocation(cfg, dims_of(lr, model=a.model, hidden=a.hidden, budget=cfg.budget), lr)
    write_json(out, {**alloc.to_json(), "lr_file": str(a.lr), "lr_metric": lr.metric, "model": a.model or lr.model})


def _cmd_slice(a: argparse.Namespace) -> None:
    from dynslice.experiment import pipeline
    from dynslice.store.outputs import check_model_out
    from dynslice.store.records import read_lr, read_widths

    out = check_model_out(a.out, overwrite=a.overwrite)
    widths = None
    if a.widths is not None:
        for flag, value in (("sb", a.sb), ("lr", a.lr), ("lr_metric", a.lr_file_metric)):
            if value is not None:
                raise ValueError(
                    f"{flag}: --{flag.replace('_', '-')} has no effect with --widths (the widths are "
                    "given); drop one of them"
                )
        widths = read_widths(a.widths)
    cfg = _config_from(a, unset=("sp", "sb"), **({"sb": a.sp} if a.sb is None and a.sp is not None else {}))
    lr = read_lr(a.lr, a.lr_file_metric) if a.lr is not None else None
    pipeline.slice_to_folder(
        cfg, out, widths=widths, lr=lr, stream=a.stream, overwrite=a.overwrite, log=lambda s: print(s, file=sys.stderr)
    )


def _cmd_eval(a: argparse.Namespace) -> None:
    from dynslice.experiment import pipeline
    from dynslice.store.jsonio import write_json
    from dynslice.store.outputs import check_json_out

    out = check_json_out(a.out, overwrite=a.overwrite)
    cfg = _config_from(a, sp=0.0, sb=0.0)
    pipeline.check_run(cfg, a.command, dense_only=False)
    bench = pipeline.Workbench.of(cfg)
    pipeline.check_context(bench.config, cfg, "ppl_seqlen")
    write_json(out, pipeline.evaluation_record(bench.load(), bench.tokenizer, cfg))


def _cmd_finetune(a: argparse.Namespace) -> None:
    from dynslice.experiment.finetune import FinetuneConfig, finetune_to_folder

    cfg = FinetuneConfig(**{k.removeprefix("ft_"): v for k, v in vars(a).items() if k.startswith("ft_")})
    finetune_to_folder(
        a.model,
        a.out,
        cfg,
        dtype=a.dtype,
        device=a.device,
        checkpoint_dir=a.checkpoint_dir,
        keep_checkpoints=a.keep_checkpoints,
        overwrite=a.overwrite,
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
    from dynslice.experiment import pipeline
    from dynslice.store.outputs import check_json_out, check_model_out, holds_record

    cfg = _config_from(a)
    if not a.force and holds_record(a.out, cfg.to_json()):
        return  # this config's record is already there: nothing to do
    out = check_json_out(a.out, overwrite=a.overwrite or a.force)
    if cfg.save_dir is not None:
        check_model_out(cfg.save_dir, overwrite=a.overwrite, param="save_model")
    pipeline.check_run(cfg, a.command)
    bench = pipeline.Workbench.of(cfg)
    pipeline.check_context(bench.config, cfg, "lr_seqlen", "cal_seqlen", "ppl_seqlen")
    pipeline.run(cfg, out, bench=bench, force=True)


def _cmd_plan(a: argparse.Namespace) -> None:
    from dynslice.store.jsonio import write_json
    from dynslice.store.memory import plan_for_spec
    from dynslice.store.outputs import check_json_out

    if a.out:
        check_json_out(a.out, overwrite=a.overwrite)
    if a.profile is not None:
        from dynslice.scale.cost import describe, profile_plan

        plan = profile_plan(a.profile, shards=a.shards, gpu_tflops=a.gpu_tflops, host_gib=a.host_gib, gpu_gib=a.gpu_gib)
        print(describe(plan, list_runs=a.list))
        if a.out:
            write_json(a.out, plan)
        return
    if not 0 <= a.sp < 1:
        raise ValueError(f"sp: {a.sp} is outside 0 <= sp < 1")
    p = plan_for_spec(
        a.model,
        a.cal_nsamples,
        a.cal_seqlen,
        a.dtype,
        device=a.device,
        batch_size=a.batch_size,
        sp=a.sp,
        stream=a.stream,
        host_gib=a.host_gib,
        gpu_gib=a.gpu_gib,
        weights_needed=False,
    )
    print(p.describe())
    if a.out:
        keep = ("model", "cal_nsamples", "cal_seqlen", "batch_size", "sp")
        write_json(a.out, {**p.to_json(), **{k: getattr(a, k) for k in keep}})


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
    "finetune": _cmd_finetune,
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
