"""Save and load sliced models: ``model.safetensors`` + ``config.json`` + ``dynslice.json`` (+ tokenizer files).

``dynslice.json`` records the widths, the base model spec, the dtype, the dynslice version and the exact byte size
and SHA-256 of the weights file. Loading rebuilds the sliced structure from the config and the widths, then loads the
weights with safetensors (no pickle, so nothing untrusted is ever unpickled). No PCA is recomputed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dynslice import __version__
from dynslice.jsonio import read_json, write_json

SLICED_META = "dynslice.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_sliced(model: nn.Module, out_dir: str | os.PathLike, base_model: str, tokenizer=None,
                extra: dict | None = None) -> Path:
    """Write a sliced model to ``out_dir`` (created; replaced atomically if it exists).

    Args:
        model: a model returned by :func:`dynslice.slicing.slice_model` (has ``dynslice_info``).
        out_dir: target folder; afterwards it is itself a model spec.
        base_model: the spec the model was sliced from (recorded; its tokenizer is used if none is saved).
        tokenizer: saved beside the weights when given, so the folder is self-contained.
        extra: additional JSON-safe metadata (e.g. sp, sb, calibration) stored under ``"extra"``.
    """
    from safetensors.torch import save_file

    info = getattr(model, "dynslice_info", None)
    if info is None:
        raise ValueError("model: not a sliced model (no dynslice_info); slice it with dynslice.slicing.slice_model")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt", "dynslice": __version__})
        model.config.to_json_file(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        dtype = next(model.parameters()).dtype
        meta = {
            "format_version": FORMAT_VERSION,
            "dynslice_version": __version__,
            "base_model": base_model,
            "architecture": type(model).__name__,
            "widths": list(info.widths),
            "final_width": info.final_width,
            "dtype": str(dtype).removeprefix("torch."),
            "weights": {"file": WEIGHTS, "bytes": (tmp / WEIGHTS).stat().st_size, "sha256": _sha256(tmp / WEIGHTS)},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "has_tokenizer": tokenizer is not None,
            "extra": extra or {},
        }
        write_json(tmp / SLICED_META, meta)
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            out_dir.rename(backup)
            tmp.rename(out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_sliced_meta(path: str | os.PathLike) -> dict:
    """The ``dynslice.json`` of a saved sliced model, validated."""
    path = Path(path)
    meta_path = path / SLICED_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"model: {path} has no {SLICED_META}; it is not a saved sliced model")
    meta = read_json(meta_path)
    missing = {"format_version", "widths", "final_width", "base_model", "weights"} - set(meta)
    if missing:
        raise ValueError(f"model: {meta_path} lacks {sorted(missing)}")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"model: {meta_path} has format {meta['format_version']}; this dynslice reads up to "
                         f"{FORMAT_VERSION}. Upgrade dynslice.")
    return meta


def load_sliced(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                verify: bool = True) -> nn.Module:
    """Load a model saved by :func:`save_sliced`; logits match those before saving exactly (same dtype).

    ``verify`` checks the weights file's size and SHA-256 against ``dynslice.json`` first, so a truncated or
    swapped file gives a clear error instead of garbage.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from dynslice.slicing import build_sliced_structure

    path = Path(path)
    meta = read_sliced_meta(path)
    files = meta["weights"].get("shards") or [meta["weights"]]  # a streamed save may be sharded
    for entry in files:
        weights = path / entry["file"]
        if not weights.is_file():
            raise FileNotFoundError(f"model: {weights} is missing")
        size = weights.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"model: {weights} is {size} bytes but {SLICED_META} records {entry['bytes']}; "
                             "the file is truncated or from another save")
        if verify and _sha256(weights) != entry["sha256"]:
            raise ValueError(f"model: {weights} does not match the SHA-256 recorded in {SLICED_META}")
    config = AutoConfig.from_pretrained(path)
    saved_dtype = getattr(torch, meta.get("dtype", "float32"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    build_sliced_structure(model, meta["widths"], meta["final_width"])
    state = {}
    for entry in files:
        weights = path / entry["file"]
        try:
            state.update(load_file(weights))
        except SafetensorError as e:
            raise ValueError(f"model: {weights} could not be read as safetensors ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        detail = "; ".join(f"{name}: {keys[:3]}{'...' if len(keys) > 3 else ''}" for name, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad)) if keys)
        raise ValueError(f"model: {weights} does not match the widths in {SLICED_META} ({detail})")
    model.load_state_dict(state, strict=True, assign=True)
    _rebuild_buffers(model)
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _rebuild_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (the rotary tables) are not in the state dict: rebuild their modules off ``meta``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and hasattr(child, "inv_freq"):
                setattr(parent, name, type(child)(config=child.config))
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"model: buffer {name} was not restored when loading")
