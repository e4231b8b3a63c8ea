"""Command line: ``dynslice lr | allocate | slice | eval | run``.

Every command writes JSON atomically, and on invalid input exits with status 2 and a one-line error that names the
bad parameter.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dynslice.paths import configure_hf_cache


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: smollm2-135m, a hub id, a folder or a .gguf file")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=8)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynslice", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    lr = sub.add_parser("lr", help="Layer Redundancy score of a dense model")
    _model_args(lr)
    lr.add_argument("--dataset", default="wiki")
    lr.add_argument("--nsamples", type=int, default=32)
    lr.add_argument("--seqlen", type=int, default=512)
    lr.add_argument("--metric", default="cosine", choices=["cosine", "bi", "angular"])
    lr.add_argument("--out", required=True)

    al = sub.add_parser("allocate", help="per-layer widths from an LR file")
    al.add_argument("--lr", required=True, help="LR JSON written by `dynslice lr`")
    al.add_argument("--sp", type=float, required=True)
    al.add_argument("--sb", type=float, required=True)
    al.add_argument("--round-interval", type=int, default=8)
    al.add_argument("--rounding", default="total", choices=["total", "reference"])
    al.add_argument("--budget", default="width", choices=["width", "params"])
    al.add_argument("--count", default="total", choices=["total", "weights"])
    al.add_argument("--model", default=None, help="model spec (its config is needed for --budget params)")
    al.add_argument("--out", required=True)

    sl = sub.add_parser("slice", help="rotate-and-slice a model and save it")
    _model_args(sl)
    g = sl.add_mutually_exclusive_group(required=True)
    g.add_argument("--widths", help="widths JSON written by `dynslice allocate` (or a JSON list)")
    g.add_argument("--sp", type=float)
    sl.add_argument("--sb", type=float, default=None)
    sl.add_argument("--lr", default=None, help="LR JSON; computed on the calibration data when omitted")
    sl.add_argument("--round-interval", type=int, default=8)
    sl.add_argument("--rounding", default="total", choices=["total", "reference"])
    sl.add_argument("--budget", default="width", choices=["width", "params"])
    sl.add_argument("--cal-dataset", default="wiki")
    sl.add_argument("--cal-nsamples", type=int, default=32)
    sl.add_argument("--cal-seqlen", type=int, default=512)
    sl.add_argument("--out", required=True, help="folder for the sliced model")

    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model")
    _model_args(ev)
    ev.add_argument("--ppl", nargs="+", default=["wiki"], metavar="NAME")
    ev.add_argument("--ppl-seqlen", type=int, default=512)
    ev.add_argument("--ppl-protocol", default="slicegpt", choices=["slicegpt", "paper"])
    ev.add_argument("--ppl-max-chunks", type=int, default=None)
    ev.add_argument("--ppl-nsamples", type=int, default=None)
    ev.add_argument("--tasks", nargs="*", default=[], metavar="T")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--out", required=True)

    rn = sub.add_parser("run", help="LR -> widths -> slice -> evaluate, one JSON record")
    _model_args(rn)
    rn.set_defaults(dtype=None)  # the protocol's (fp32 for dynslice, fp16 for reference)
    rn.add_argument("--sp", type=float, required=True)
    rn.add_argument("--sb", required=True, help="a number in [0, sp], or 'auto'")
    rn.add_argument("--budget", default="width", choices=["width", "params"])
    rn.add_argument("--count", default="total", choices=["total", "weights"])
    rn.add_argument("--protocol", default="dynslice", choices=["dynslice", "reference"],
                    help="defaults of the settings below (dynslice.protocol); explicit flags win")
    rn.add_argument("--round-interval", type=int, default=None, help="default: the protocol's (8 or 1)")
    rn.add_argument("--rounding", default=None, choices=["total", "reference"], help="default: the protocol's")
    rn.add_argument("--lr-dataset", default="wiki")
    rn.add_argument("--lr-nsamples", type=int, default=32)
    rn.add_argument("--lr-seqlen", type=int, default=None, help="default: the protocol's (512 or 1024)")
    rn.add_argument("--lr-metric", default="cosine", choices=["cosine", "bi", "angular"])
    rn.add_argument("--cal-dataset", default="wiki")
    rn.add_argument("--cal-nsamples", type=int, default=32)
    rn.add_argument("--cal-seqlen", type=int, default=512)
    rn.add_argument("--ppl", nargs="+", default=["wiki"], metavar="NAME")
    rn.add_argument("--ppl-seqlen", type=int, default=512)
    rn.add_argument("--ppl-protocol", default=None, choices=["slicegpt", "paper", "documents"],
                    help="default: the protocol's")
    rn.add_argument("--ppl-max-chunks", type=int, default=None)
    rn.add_argument("--ppl-nsamples", type=int, default=None)
    rn.add_argument("--tasks", nargs="*", default=[], metavar="T")
    rn.add_argument("--limit", type=int, default=None)
    rn.add_argument("--save-model", default=None, help="also save the sliced model to this folder")
    rn.add_argument("--force", action="store_true", help="rerun even if --out already holds this config's record")
    rn.add_argument("--out", required=True)
    return p


def _read_widths(spec: str) -> list[int]:
    from dynslice.jsonio import read_json

    text = spec.strip()
    if text.startswith("["):
        import json

        return json.loads(text)
    obj = read_json(spec)
    widths = obj.get("widths") if isinstance(obj, dict) else obj
    if not isinstance(widths, list):
        raise ValueError(f"widths: {spec} holds no 'widths' list")
    return widths


def _cmd_lr(a: argparse.Namespace) -> None:
    from dynslice import data
    from dynslice.jsonio import write_json
    from dynslice.lr import layer_redundancy
    from dynslice.models import load

    model, tok = load(a.model, a.dtype, a.device)
    batch = data.calibration_batch(a.dataset, tok, a.nsamples, a.seqlen, seed=a.seed)
    t = time.perf_counter()
    score = layer_redundancy(model, batch, metric=a.metric, batch_size=a.batch_size)
    write_json(a.out, {**score.to_json(), "model": a.model, "dataset": a.dataset, "nsamples": a.nsamples,
                       "seqlen": a.seqlen, "seed": a.seed, "time_s": round(time.perf_counter() - t, 3)})


def _cmd_allocate(a: argparse.Namespace) -> None:
    from dynslice.allocate import allocate
    from dynslice.jsonio import read_json, write_json
    from dynslice.params import ArchDims

    lr = read_json(a.lr)
    if not isinstance(lr, dict) or "lr" not in lr:
        raise ValueError(f"lr: {a.lr} holds no 'lr' list")
    dims = None
    if a.model is not None:
        from dynslice.models import load_model

        dims = ArchDims.from_config(load_model(a.model).config)
    elif a.budget == "params":
        raise ValueError("model: --budget params needs --model to count parameters")
    hidden = dims.hidden if dims else int(lr.get("hidden") or _hidden_of(lr["model"]))
    alloc = allocate(lr["lr"], a.sp, a.sb, hidden, round_interval=a.round_interval, budget=a.budget, dims=dims,
                     count=a.count, rounding=a.rounding)
    write_json(a.out, {**alloc.to_json(), "lr_file": str(a.lr), "model": lr.get("model")})


def _hidden_of(spec: str) -> int:
    from transformers import AutoConfig

    from dynslice.models import resolve_spec

    r = resolve_spec(spec)
    kw = {"gguf_file": r.gguf_file} if r.gguf_file else {}
    return int(AutoConfig.from_pretrained(r.location, **kw).hidden_size)


def _cmd_slice(a: argparse.Namespace) -> None:
    from dynslice import data
    from dynslice.allocate import allocate
    from dynslice.io import save_sliced
    from dynslice.jsonio import read_json
    from dynslice.lr import layer_redundancy
    from dynslice.models import get_adapter, load
    from dynslice.params import ArchDims
    from dynslice.slicing import slice_model

    model, tok = load(a.model, a.dtype, a.device)
    cal = data.calibration_batch(a.cal_dataset, tok, a.cal_nsamples, a.cal_seqlen, seed=a.seed)
    extra: dict = {"calibration": {"dataset": a.cal_dataset, "nsamples": a.cal_nsamples, "seqlen": a.cal_seqlen,
                                   "seed": a.seed}}
    if a.widths is not None:
        widths = _read_widths(a.widths)
    else:
        sb = a.sp if a.sb is None else a.sb
        if a.lr is not None:
            lr = read_json(a.lr)["lr"]
        elif sb != a.sp:
            lr = list(layer_redundancy(model, cal, batch_size=a.batch_size).raw)
        else:  # constant slicing needs no LR; any non-constant profile gives FS_i = SP when SB = SP
            lr = list(range(get_adapter(model).num_layers))
        dims = ArchDims.from_config(model.config)
        alloc = allocate(lr, a.sp, sb, dims.hidden, round_interval=a.round_interval, budget=a.budget, dims=dims,
                         rounding=a.rounding)
        widths = list(alloc.widths)
        extra["allocation"] = alloc.to_json()
    slice_model(model, cal, widths, batch_size=a.batch_size)
    save_sliced(model, a.out, a.model, tok, extra=extra)


def _cmd_eval(a: argparse.Namespace) -> None:
    from dynslice.config import RunConfig
    from dynslice.jsonio import write_json
    from dynslice.models import count_parameters, load
    from dynslice.pipeline import evaluate_model, versions

    cfg = RunConfig(model=a.model, dtype=a.dtype, device=a.device, seed=a.seed, sp=0.0, sb=0.0,
                    batch_size=a.batch_size, ppl_datasets=tuple(a.ppl), ppl_seqlen=a.ppl_seqlen,
                    ppl_protocol=a.ppl_protocol, ppl_max_chunks=a.ppl_max_chunks, ppl_nsamples=a.ppl_nsamples,
                    tasks=tuple(a.tasks), task_limit=a.limit)
    model, tok = load(a.model, a.dtype, a.device)
    t = time.perf_counter()
    ppl, tasks = evaluate_model(model, tok, cfg)
    widths = getattr(getattr(model, "dynslice_info", None), "widths", None)
    write_json(a.out, {"config": {k: v for k, v in cfg.to_json().items() if not k.startswith(("sp", "sb"))},
                       "versions": versions(), "model": a.model, "ppl": ppl, "tasks": tasks,
                       "params": {"total": count_parameters(model)},
                       "widths": None if widths is None else list(widths),
                       "timings_s": {"eval": round(time.perf_counter() - t, 3)}})


def _cmd_run(a: argparse.Namespace) -> None:
    from dynslice.config import AUTO, RunConfig
    from dynslice.pipeline import run

    if a.sb == AUTO:
        sb: float | str = AUTO
    else:
        try:
            sb = float(a.sb)
        except ValueError:
            raise ValueError(f"sb: {a.sb!r} is neither a number in [0, sp] nor 'auto'") from None
    cfg = RunConfig(model=a.model, protocol=a.protocol, dtype=a.dtype, device=a.device, seed=a.seed, sp=a.sp, sb=sb,
                    budget=a.budget, count=a.count, round_interval=a.round_interval, rounding=a.rounding, lr_metric=a.lr_metric, lr_dataset=a.lr_dataset,
                    lr_nsamples=a.lr_nsamples, lr_seqlen=a.lr_seqlen, cal_dataset=a.cal_dataset,
                    cal_nsamples=a.cal_nsamples, cal_seqlen=a.cal_seqlen, batch_size=a.batch_size,
                    ppl_datasets=tuple(a.ppl), ppl_protocol=a.ppl_protocol, ppl_seqlen=a.ppl_seqlen,
                    ppl_max_chunks=a.ppl_max_chunks, ppl_nsamples=a.ppl_nsamples, tasks=tuple(a.tasks),
                    task_limit=a.limit, save_dir=a.save_model)
    run(cfg, a.out, force=a.force)


COMMANDS = {"lr": _cmd_lr, "allocate": _cmd_allocate, "slice": _cmd_slice, "eval": _cmd_eval, "run": _cmd_run}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynslice`` command."""
    args = _parser().parse_args(argv)
    configure_hf_cache()
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dynslice {args.command}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    if getattr(args, "out", None):
        print(f"wrote {Path(args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
