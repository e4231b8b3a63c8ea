"""Command line: ``dynslice lr | allocate | slice | eval | run | plan``.

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
    sl.add_argument("--budget", default="width", choices=["width", "params"])
    sl.add_argument("--cal-dataset", default="wiki")
    sl.add_argument("--cal-nsamples", type=int, default=32)
    sl.add_argument("--cal-seqlen", type=int, default=512)
    sl.add_argument("--out", required=True, help="folder for the sliced model")
    sl.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                    help="read one layer at a time from safetensors (auto: when the model does not fit in RAM)")

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
    rn.add_argument("--sp", type=float, required=True)
    rn.add_argument("--sb", required=True, help="a number in [0, sp], or 'auto'")
    rn.add_argument("--budget", default="width", choices=["width", "params"])
    rn.add_argument("--count", default="total", choices=["total", "weights"])
    rn.add_argument("--round-interval", type=int, default=8)
    rn.add_argument("--lr-dataset", default="wiki")
    rn.add_argument("--lr-nsamples", type=int, default=32)
    rn.add_argument("--lr-seqlen", type=int, default=512)
    rn.add_argument("--lr-metric", default="cosine", choices=["cosine", "bi", "angular"])
    rn.add_argument("--cal-dataset", default="wiki")
    rn.add_argument("--cal-nsamples", type=int, default=32)
    rn.add_argument("--cal-seqlen", type=int, default=512)
    rn.add_argument("--ppl", nargs="+", default=["wiki"], metavar="NAME")
    rn.add_argument("--ppl-seqlen", type=int, default=512)
    rn.add_argument("--ppl-protocol", default="slicegpt", choices=["slicegpt", "paper"])
    rn.add_argument("--ppl-max-chunks", type=int, default=None)
    rn.add_argument("--ppl-nsamples", type=int, default=None)
    rn.add_argument("--tasks", nargs="*", default=[], metavar="T")
    rn.add_argument("--limit", type=int, default=None)
    rn.add_argument("--save-model", default=None, help="also save the sliced model to this folder")
    rn.add_argument("--force", action="store_true", help="rerun even if --out already holds this config's record")
    rn.add_argument("--out", required=True)

    pl = sub.add_parser("plan", help="predict peak host RAM, GPU memory and output size from the config alone")
    pl.add_argument("--model", required=True, help="model spec, or a folder holding only config.json")
    pl.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    pl.add_argument("--device", default="cpu", help="where layers are computed: cpu or cuda[:N]")
    pl.add_argument("--batch-size", type=int, default=8)
    pl.add_argument("--cal-nsamples", type=int, default=128)
    pl.add_argument("--cal-seqlen", type=int, default=2048)
    pl.add_argument("--sp", type=float, default=0.3, help="constant slicing percentage used for the output size")
    pl.add_argument("--stream", default="auto", choices=["auto", "on", "off"])
    pl.add_argument("--host-gib", type=float, default=None, help="host RAM to plan for (default: available now)")
    pl.add_argument("--gpu-gib", type=float, default=None, help="GPU memory to plan for (default: free now)")
    pl.add_argument("--out", default=None, help="also write the plan as JSON here")
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
    if _print_plan(a).mode == "stream":
        return _cmd_slice_stream(a)
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
        alloc = allocate(lr, a.sp, sb, dims.hidden, round_interval=a.round_interval, budget=a.budget, dims=dims)
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
    cfg = RunConfig(model=a.model, dtype=a.dtype, device=a.device, seed=a.seed, sp=a.sp, sb=sb, budget=a.budget,
                    count=a.count, round_interval=a.round_interval, lr_metric=a.lr_metric, lr_dataset=a.lr_dataset,
                    lr_nsamples=a.lr_nsamples, lr_seqlen=a.lr_seqlen, cal_dataset=a.cal_dataset,
                    cal_nsamples=a.cal_nsamples, cal_seqlen=a.cal_seqlen, batch_size=a.batch_size,
                    ppl_datasets=tuple(a.ppl), ppl_protocol=a.ppl_protocol, ppl_seqlen=a.ppl_seqlen,
                    ppl_max_chunks=a.ppl_max_chunks, ppl_nsamples=a.ppl_nsamples, tasks=tuple(a.tasks),
                    task_limit=a.limit, save_dir=a.save_model)
    run(cfg, a.out, force=a.force)


def _config_of(spec: str):
    """The model config of a spec, read without the weights (a folder with just config.json is enough)."""
    from transformers import AutoConfig

    from dynslice.models import resolve_spec, tiny_random_model

    r = resolve_spec(spec)
    if r.kind == "sliced":
        raise ValueError(f"model: {spec} is already sliced; plan the slicing of its base model")
    if r.kind == "tiny":
        return tiny_random_model().config
    kw = {"gguf_file": r.gguf_file} if r.gguf_file else {}
    return AutoConfig.from_pretrained(r.location, **kw)


def _memory_plan(a: argparse.Namespace, stream: str, nsamples: int, seqlen: int, sp: float = 0.3,
                 host_gib: float | None = None, gpu_gib: float | None = None, weights_needed: bool = True):
    import torch

    from dynslice.memory import GIB, Shapes, plan
    from dynslice.models import resolve_spec
    from dynslice.stream import is_streamable

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
    return plan(Shapes.from_config(_config_of(a.model)), nsamples, seqlen, a.dtype, device=str(a.device),
                batch_size=a.batch_size, sp=sp, stream=stream, streamable=streamable,
                host_bytes=None if host_gib is None else int(host_gib * GIB),
                gpu_bytes=None if gpu_gib is None else int(gpu_gib * GIB))


def _print_plan(a: argparse.Namespace):
    """The placement plan of `dynslice slice`, printed before it starts."""
    sp = a.sp if a.sp is not None else 0.3
    p = _memory_plan(a, a.stream, a.cal_nsamples, a.cal_seqlen, sp)
    print(p.describe(), file=sys.stderr)
    return p


def _cmd_slice_stream(a: argparse.Namespace) -> None:
    """`dynslice slice` reading one layer at a time from the safetensors files."""
    from dynslice import data
    from dynslice.allocate import allocate
    from dynslice.jsonio import read_json
    from dynslice.models import load_tokenizer, resolve_spec
    from dynslice.params import ArchDims
    from dynslice.stream import slice_streaming

    r = resolve_spec(a.model)
    folder = r.location
    if r.kind == "hub":
        from huggingface_hub import snapshot_download

        folder = snapshot_download(r.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    extra: dict = {"calibration": {"dataset": a.cal_dataset, "nsamples": a.cal_nsamples, "seqlen": a.cal_seqlen,
                                   "seed": a.seed}}
    if a.widths is not None:
        widths = _read_widths(a.widths)
    else:
        sb = a.sp if a.sb is None else a.sb
        dims = ArchDims.from_config(_config_of(a.model))
        if a.lr is not None:
            lr = read_json(a.lr)["lr"]
        elif sb != a.sp:
            raise ValueError("lr: dynamic widths (sb != sp) while streaming need --lr, an LR file from `dynslice lr`")
        else:
            lr = list(range(dims.layers))
        alloc = allocate(lr, a.sp, sb, dims.hidden, round_interval=a.round_interval, budget=a.budget, dims=dims)
        widths = list(alloc.widths)
        extra["allocation"] = alloc.to_json()
    tok = load_tokenizer(a.model)
    cal = data.calibration_batch(a.cal_dataset, tok, a.cal_nsamples, a.cal_seqlen, seed=a.seed)
    slice_streaming(folder, cal, widths, a.out, dtype=a.dtype, base_model=a.model, batch_size=a.batch_size,
                    device=a.device, tokenizer=tok, extra=extra)


def _cmd_plan(a: argparse.Namespace) -> None:
    from dynslice.jsonio import write_json

    p = _memory_plan(a, a.stream, a.cal_nsamples, a.cal_seqlen, a.sp, a.host_gib, a.gpu_gib, weights_needed=False)
    print(p.describe())
    if a.out:
        write_json(a.out, {**p.to_json(), "model": a.model, "cal_nsamples": a.cal_nsamples,
                           "cal_seqlen": a.cal_seqlen, "batch_size": a.batch_size, "sp": a.sp})


COMMANDS = {"lr": _cmd_lr, "allocate": _cmd_allocate, "slice": _cmd_slice, "eval": _cmd_eval, "run": _cmd_run,
            "plan": _cmd_plan}


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
