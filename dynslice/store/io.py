"""Save and load sliced models: ``model.safetensors`` + ``config.json`` + ``dynslice.json`` (+ tokenizer files).

``dynslice.json`` records the widths, the base model spec, the dtype, the dynslice version, a unique save id and
the exact byte size and SHA-256 of every file of the save (``file_hashes``: weights, ``config.json``, tokenizer
files), which loading checks and which proves to a later ``--overwrite`` what dynslice wrote there. Loading
rebuilds the sliced structure from the config and the widths, then loads the weights with safetensors (no pickle,
so nothing untrusted is ever unpickled). No PCA is recomputed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from dynslice import __version__
from dynslice.store import outputs, ownership
from dynslice.store.jsonio import read_json, write_json

SLICED_META = "dynslice.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def save_sliced(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model: str,
    tokenizer=None,
    extra: dict | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a sliced model to ``out_dir`` through a temporary folder, then move it in place atomically.

    Args:
        model: a model returned by :func:`dynslice.core.slicing.slice_model` (has ``dynslice_info``).
        out_dir: target folder, missing or empty; afterwards it is itself a model spec.
        base_model: the spec the model was sliced from (recorded; its tokenizer is used if none is saved).
        tokenizer: saved beside the weights when given, so the folder is self-contained.
        extra: additional JSON-safe metadata (e.g. sp, sb, calibration) stored under ``"extra"``.
        overwrite: allow replacing a previous dynslice model folder (never anything else; see
            :func:`dynslice.store.outputs.check_model_out`).
    """
    from safetensors.torch import save_file

    info = getattr(model, "dynslice_info", None)
    if info is None:
        raise ValueError(
            "model: not a sliced model (no dynslice_info); slice it with dynslice.core.slicing.slice_model"
        )
    out_dir = outputs.check_model_out(out_dir, overwrite=overwrite)
    outputs.clean_stale(out_dir)
    tmp = outputs.temp_folder(out_dir)
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt", "dynslice": __version__})
        model.config.to_json_file(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        path = tmp / WEIGHTS
        weights = {"file": WEIGHTS, "bytes": path.stat().st_size, "sha256": ownership.sha256_file(path)}
        finish_save(
            tmp,
            out_dir,
            base_model=base_model,
            architecture=type(model).__name__,
            widths=info.widths,
            final_width=info.final_width,
            dtype=next(model.parameters()).dtype,
            weights=weights,
            num_parameters=sum(p.numel() for p in model.parameters()),
            has_tokenizer=tokenizer is not None,
            extra=extra or {},
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def finish_save(
    tmp: Path,
    out_dir: Path,
    *,
    base_model: str,
    architecture: str,
    widths,
    final_width: int,
    dtype: torch.dtype,
    weights: dict,
    num_parameters: int,
    has_tokenizer: bool,
    extra: dict,
) -> None:
    """Write ``dynslice.json`` (listing every file written into ``tmp``) and move ``tmp`` to ``out_dir``.

    Shared by :func:`save_sliced` and :func:`dynslice.store.stream.slice_streaming`, so both write the same format.
    """
    files = sorted(
        p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and p.name != outputs.INCOMPLETE_MARKER
    )
    listed = {entry["file"]: entry for entry in weights.get("shards") or [weights]}
    hashes = {
        rel: {"bytes": listed[rel]["bytes"], "sha256": listed[rel]["sha256"]}
        if rel in listed
        else dict(zip(("bytes", "sha256"), ownership.fingerprint(tmp / rel), strict=True))
        for rel in files
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "dynslice_version": __version__,
        "base_model": base_model,
        "architecture": architecture,
        "widths": [int(w) for w in widths],
        "final_width": int(final_width),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": weights,
        "num_parameters": int(num_parameters),
        "has_tokenizer": has_tokenizer,
        "files": [*files, SLICED_META],
        "save_id": ownership.new_id(),
        "file_hashes": hashes,
        "extra": extra,
    }
    write_json(tmp / SLICED_META, meta)
    outputs.publish_folder(tmp, out_dir)


#: The schema of ``dynslice.json``: field -> (JSON type, required). Checked by :func:`validate_sliced_meta`.
META_SCHEMA: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "format_version": (int, True),
    "dynslice_version": (str, False),
    "base_model": (str, True),
    "architecture": (str, False),
    "widths": (list, True),
    "final_width": (int, True),
    "dtype": (str, False),
    "weights": (dict, True),
    "num_parameters": (int, False),
    "has_tokenizer": (bool, False),
    "files": (list, False),
    "extra": (dict, False),
    "save_id": (str, False),
    "file_hashes": (dict, False),
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_JSON_TYPE = {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "true or false"}


def _inside(folder: Path, name: object, field: str, meta_path: Path) -> Path:
    """``folder / name`` if it names a file inside ``folder`` (no absolute path, no ``..``, no link outside)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"model: {meta_path} field {field} must be a non-empty file name")
    rel = Path(name)
    root = folder.resolve()
    target = (folder / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not target.is_relative_to(root):
        raise ValueError(f"model: {meta_path} field {field} = {name!r} points outside the model folder {folder}")
    return folder / rel


def _check_weights_entry(w: object, field: str, folder: Path, meta_path: Path) -> None:
    """One weights file entry ``{"file", "bytes", "sha256"}``: types, a 64-hex-digit hash, a path inside."""
    if not isinstance(w, dict):
        raise ValueError(f"model: {meta_path} field {field} must be an object")
    for key, kind in (("file", str), ("bytes", int), ("sha256", str)):
        if not isinstance(w.get(key), kind) or isinstance(w.get(key), bool):
            raise ValueError(f"model: {meta_path} field {field}.{key} = {w.get(key)!r} must be {_JSON_TYPE[kind]}")
    if w["bytes"] < 0 or len(w["sha256"]) != 64 or any(c not in "0123456789abcdef" for c in w["sha256"]):
        raise ValueError(f"model: {meta_path} field {field} has a negative size or a sha256 that is not 64 hex digits")
    _inside(folder, w["file"], f"{field}.file", meta_path)


def validate_sliced_meta(meta: object, folder: Path) -> dict:
    """Check a parsed ``dynslice.json`` against :data:`META_SCHEMA`; every path must lie inside ``folder``."""
    meta_path = folder / SLICED_META
    if not isinstance(meta, dict):
        raise ValueError(f"model: {meta_path} must hold a JSON object")
    for key, (kind, required) in META_SCHEMA.items():
        if key not in meta:
            if required:
                raise ValueError(f"model: {meta_path} lacks the field {key!r}")
            continue
        v = meta[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ValueError(f"model: {meta_path} field {key} = {v!r} must be {_JSON_TYPE[kind]}")
    version = meta["format_version"]
    if not 1 <= version <= FORMAT_VERSION:
        if version > FORMAT_VERSION:
            raise ValueError(
                f"model: {meta_path} has format {version}; this dynslice reads up to "
                f"{FORMAT_VERSION}. Upgrade dynslice."
            )
        raise ValueError(f"model: {meta_path} field format_version = {version} is outside 1..{FORMAT_VERSION}")
    widths = meta["widths"]
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"model: {meta_path} field widths must be a non-empty list of integers >= 1")
    if meta["final_width"] < 1:
        raise ValueError(f"model: {meta_path} field final_width = {meta['final_width']} must be >= 1")
    if meta.get("dtype", "float32") not in DTYPE_NAMES:
        raise ValueError(f"model: {meta_path} field dtype = {meta['dtype']!r} is not one of {', '.join(DTYPE_NAMES)}")
    w = meta["weights"]
    if "shards" in w:  # a sharded (streamed) save: weights.file is the index, each shard is checked
        if not isinstance(w["shards"], list) or not w["shards"]:
            raise ValueError(f"model: {meta_path} field weights.shards must be a non-empty list")
        if not isinstance(w.get("file"), str):
            raise ValueError(f"model: {meta_path} field weights.file = {w.get('file')!r} must be a string")
        _inside(folder, w["file"], "weights.file", meta_path)
        for i, shard in enumerate(w["shards"]):
            _check_weights_entry(shard, f"weights.shards[{i}]", folder, meta_path)
    else:
        _check_weights_entry(w, "weights", folder, meta_path)
    for i, name in enumerate(meta.get("files", [])):
        _inside(folder, name, f"files[{i}]", meta_path)
    for name, entry in meta.get("file_hashes", {}).items():
        _check_weights_entry(
            {"file": name, **entry} if isinstance(entry, dict) else entry, f"file_hashes[{name!r}]", folder, meta_path
        )
    if "file_hashes" in meta and "config.json" not in meta["file_hashes"]:
        raise ValueError(f"model: {meta_path} field file_hashes lists no config.json")
    return meta


def read_sliced_meta(path: str | os.PathLike) -> dict:
    """The ``dynslice.json`` of a saved sliced model, validated against :data:`META_SCHEMA`."""
    path = Path(path)
    if outputs.looks_incomplete(path):
        raise ValueError(f"model: {path} is an incomplete model (a save that was interrupted); save it again")
    meta_path = path / SLICED_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"model: {path} has no {SLICED_META}; it is not a saved sliced model")
    return validate_sliced_meta(read_json(meta_path), path)


def load_sliced(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
    *,
    gpu_bytes: int | None = None,
) -> nn.Module:
    """Load a model saved by :func:`save_sliced`; logits match those before saving exactly (same dtype).

    ``verify`` checks the weights file's size and SHA-256 against ``dynslice.json`` first, so a truncated or
    swapped file gives a clear error instead of garbage. On a GPU ``device`` with ``gpu_bytes`` free, a model that
    does not fit there with a forward pass is read tensor by tensor straight to where it will run: as many whole
    decoder layers on the GPU as fit, the rest in host RAM, offloaded to the GPU as they run
    (:func:`dynslice.store.placement.offload_map`); the host never holds the whole model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from dynslice.core.slicing import build_sliced_structure

    path = Path(path)
    meta = read_sliced_meta(path)
    meta_path = path / SLICED_META
    files = meta["weights"].get("shards") or [meta["weights"]]  # a streamed save may be sharded
    for i, entry in enumerate(files):
        field = f"weights.shards[{i}].file" if "shards" in meta["weights"] else "weights.file"
        weights = _inside(path, entry["file"], field, meta_path)
        if not weights.is_file():
            raise FileNotFoundError(f"model: {weights} is missing")
        size = weights.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(
                f"model: {weights} is {size} bytes but {meta_path} records {entry['bytes']}; "
                "the file is truncated or from another save"
            )
        if verify and ownership.sha256_file(weights) != entry["sha256"]:
            raise ValueError(f"model: {weights} does not match the SHA-256 recorded in {SLICED_META}")
    weight_files = {entry["file"] for entry in files}
    for name, entry in meta.get("file_hashes", {}).items():  # config.json, tokenizer files: they change the model
        if name in weight_files:
            continue
        target = _inside(path, name, f"file_hashes[{name!r}]", meta_path)
        if target.is_symlink() or not target.is_file():
            raise ValueError(f"model: {target} is missing (recorded in {SLICED_META})")
        if ownership.fingerprint(target) != (entry["bytes"], entry["sha256"]):
            raise ValueError(
                f"model: {target} was changed after the save (its size or SHA-256 differs from "
                f"{SLICED_META}); restore it or save the model again"
            )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model: {path / 'config.json'} could not be read ({str(e).splitlines()[0]})") from None
    saved_dtype = getattr(torch, meta.get("dtype", "float32"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    build_sliced_structure(model, meta["widths"], meta["final_width"])
    device_map = None
    if torch.device(device).type == "cuda" and gpu_bytes is not None:
        from dynslice.store.placement import fits, model_bytes, offload_map

        if not fits(
            model_bytes(model) * (saved_dtype if dtype is None else dtype).itemsize // saved_dtype.itemsize,
            str(device),
            gpu_bytes,
        ):
            device_map = offload_map(model, str(device), gpu_bytes)
    state = {}
    for entry in files:
        weights = path / entry["file"]
        try:
            if device_map is None:
                state.update(load_file(weights))
            else:
                state.update(_read_placed(weights, device_map, dtype))
        except SafetensorError as e:
            raise ValueError(f"model: {weights} could not be read as safetensors ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        detail = "; ".join(
            f"{name}: {keys[:3]}{'...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad))
            if keys
        )
        raise ValueError(f"model: {weights} does not match the widths in {SLICED_META} ({detail})")
    model.load_state_dict(state, strict=True, assign=True)
    _rebuild_buffers(model)
    if device_map is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map, main_device=str(device))
    else:
        if dtype is not None:
            model.to(dtype)
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _read_placed(weights: Path, device_map: dict, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, each read straight to the device ``device_map`` gives its module
    (the longest module prefix of its name) and cast to ``dtype``."""
    from safetensors import safe_open

    def target(name: str) -> str:
        best = max((m for m in device_map if m == "" or name == m or name.startswith(m + ".")), key=len)
        where = device_map[best]
        return f"cuda:{where}" if isinstance(where, int) else str(where)

    out = {}
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_tensor(name)
            out[name] = (t if dtype is None else t.to(dtype)).to(target(name))
    return out


def _rebuild_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (the rotary tables) are not in the state dict: rebuild their modules off ``meta``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and hasattr(child, "inv_freq"):
                setattr(parent, name, type(child)(config=child.config))
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"model: buffer {name} was not restored when loading")
