"""Slice a model larger than host RAM: read one decoder layer at a time from safetensors, write each sliced layer
as soon as it is done.

Only the calibration signals, the layer being sliced and (briefly) the embedding and the head are ever in memory.
The files are opened with ``safetensors.safe_open`` (memory-mapped), so a tensor is read when it is asked for.
The maths is that of :func:`dynslice.core.slicing.slice_model` (the same
:func:`~dynslice.core.slicing.slice_layer` step);
the output folder is the one :func:`dynslice.store.io.save_sliced` writes, split into shards of ``shard_bytes`` when
larger, and :func:`dynslice.store.io.load_sliced` reads both.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dynslice import __version__
from dynslice.core.adapters import get_adapter, mark_untied
from dynslice.core.layers import RMSN
from dynslice.core.slicing import (
    Run,
    SliceInfo,
    Timings,
    capture_inputs,
    check_slice_args,
    fold_layer_norms,
    rotate_embedding,
    slice_embeddings,
    slice_layer,
)
from dynslice.store import outputs
from dynslice.store.models import parse_device, parse_dtype

INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB per output shard: the writer holds at most this much before writing


class SafetensorsSource:
    """The tensors of a local safetensors checkpoint (one file, or shards with an index), read on demand."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"model: {self.folder} holds no .safetensors weights to stream from")
        if weight_map is None:
            weight_map = {}
            for f in files:
                with safe_open(str(self.folder / f), framework="pt", device="cpu") as h:
                    weight_map.update({k: f for k in h.keys()})  # noqa: SIM118 (a safetensors handle, not a dict)
        self.weight_map: dict[str, str] = weight_map
        self.nbytes = sum((self.folder / f).stat().st_size for f in files)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` in ``dtype`` (read from the file now)."""
        if name not in self.weight_map:
            raise ValueError(f"model: tensor {name} is missing from {self.folder}")
        return self.read([name], dtype)[name]

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors ``names`` in ``dtype``. A tensor in the file's dtype stays backed by the file's pages (read when
        touched, copied when written); its mapping goes when the tensor is freed, so the file does not stay in the
        process's resident set."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ValueError(f"model: tensor {missing[0]} is missing from {self.folder}")
        out: dict[str, torch.Tensor] = {}
        for f in dict.fromkeys(self.weight_map[n] for n in names):
            with safe_open(str(self.folder / f), framework="pt", device="cpu") as h:
                for n in names:
                    if self.weight_map[n] == f:
                        t = h.get_tensor(n)
                        out[n] = t.to(dtype) if t.dtype != dtype else t  # file-backed until written
        return out

    def module_state(self, prefix: str, module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The state dict of ``module`` (its keys, without ``prefix``) read from the files."""
        state = self.read([prefix + k for k in module.state_dict()], dtype)
        return {k.removeprefix(prefix): v for k, v in state.items()}


def release_freed_heap() -> None:
    """Give the heap memory freed so far back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Tensors under glibc's mmap threshold (32 MiB: a full-width layer's q/k/v/o projections and shortcuts) come from
    the heap, which keeps freed blocks resident. Without this, each flushed shard's smaller tensors stayed in the
    resident set and a streaming run's RSS grew with the model's depth (Llama-3-8B shapes: +1 GiB from 16 to 32
    layers, ``bench/results/memory_stream_fullwidth.json``).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_streamable(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a dense model folder with safetensors weights."""
    folder = Path(folder)
    return folder.is_dir() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


class ShardWriter:
    """Writes tensors into ``model-0000k-of-0000n.safetensors`` shards of at most ``shard_bytes`` (one tensor may
    exceed it); with a single shard the file is ``model.safetensors``, as :func:`dynslice.store.io.save_sliced`
    writes."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        if not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes: {shard_bytes!r} is outside shard_bytes >= 1")
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.num_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        if self.pending and self.pending_bytes + t.nbytes > self.shard_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += t.nbytes
        self.num_parameters += t.numel()

    def add_module(self, prefix: str, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            self.add(prefix + k, v)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f".shard{len(self.shards):05d}.safetensors"
        save_file(self.pending, self.folder / name, metadata={"format": "pt", "dynslice": __version__})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0
        release_freed_heap()

    def finish(self) -> dict:
        """Name the shards, write the index when there are several, and return the ``weights`` metadata."""
        from dynslice.store.io import WEIGHTS
        from dynslice.store.ownership import sha256_file

        self.flush()
        n = len(self.shards)
        names = [WEIGHTS] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        entries, weight_map = [], {}
        for (tmp_name, keys), final in zip(self.shards, names):
            (self.folder / tmp_name).rename(self.folder / final)
            p = self.folder / final
            entries.append({"file": final, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
            weight_map.update({k: final for k in keys})
        if n == 1:
            return entries[0]
        total = sum(e["bytes"] for e in entries)
        (self.folder / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        return {"file": INDEX, "bytes": total, "shards": entries}


@torch.no_grad()
def slice_streaming(
    folder: str | os.PathLike,
    calibration: dict[str, torch.Tensor],
    widths: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "fp32",
    base_model: str | None = None,
    final_width: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    tokenizer=None,
    extra: dict | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    overwrite: bool = False,
) -> SliceInfo:
    """Rotate and slice the safetensors model in ``folder`` layer by layer, writing the sliced model to ``out_dir``.

    Arguments as in :func:`dynslice.core.slicing.slice_model` and :func:`dynslice.store.io.save_sliced`; ``dtype`` is
    the
    dtype the weights are computed and saved in. ``out_dir`` is checked and written like :func:`save_sliced` does
    (:mod:`dynslice.store.outputs`: a temporary folder, then an atomic move; ``overwrite`` replaces only a previous
    dynslice model). Returns the slice info.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from dynslice.store.io import finish_save

    torch_dtype, device = parse_dtype(dtype), parse_device(device)
    src = SafetensorsSource(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    adapter = get_adapter(model)
    names = adapter.weight_names
    d, n_layers = adapter.hidden_size, adapter.num_layers
    widths, final_width = check_slice_args(widths, final_width, batch_size, n_layers, d)
    home = torch.device("cpu")
    run = Run(device, home, Timings())

    out_dir = outputs.check_model_out(out_dir, overwrite=overwrite)
    outputs.clean_stale(out_dir)
    tmp = outputs.temp_folder(out_dir)
    try:
        writer = ShardWriter(tmp, shard_bytes)
        # Capture: the real embedding and rotary tables, pass-through layers, a weightless final norm.
        with run.timings("capture"):
            adapter.embeddings = nn.Embedding.from_pretrained(
                src.get(names.embeddings, torch_dtype), freeze=True, padding_idx=adapter.embeddings.padding_idx
            )
            _rebuild_rotary(model)
            final_norm_w = src.get(names.final_norm, torch_dtype)
            adapter.final_norm = RMSN(d, adapter.rms_eps)
            captured = capture_inputs(model, calibration, batch_size, home, adapter)

        # Position 0: the embeddings, written out and dropped.
        position = slice_embeddings(adapter, captured, widths[0], run)
        writer.add(names.embeddings, adapter.embeddings.weight)
        adapter.embeddings.to("meta")
        release_freed_heap()

        # The decoder layers: read one, fold its norms, slice it, write it, drop it.
        outs = list(widths[1:]) + [final_width]
        for i in tqdm(range(n_layers), desc="slicing (streaming)", unit="layer", disable=not progress):
            prefix = names.layer(i)
            layer = adapter.layers[i]
            layer.load_state_dict(src.module_state(prefix, layer, torch_dtype), strict=True, assign=True)
            fold_layer_norms(layer, adapter)
            new, position = slice_layer(
                adapter,
                layer,
                position,
                width_out=outs[i],
                calibration=captured.for_layer(i),
                run=run,
                output_needed=i < n_layers - 1,
            )
            writer.add_module(prefix, new)
            adapter.layers[i] = new.to("meta")
            captured.layer_kwargs[i] = []
            release_freed_heap()

        # The head: the final norm folded in; rotated when the last output is sliced.
        with run.timings("rotate"):
            tied = getattr(config, "tie_word_embeddings", False) or names.head not in src
            head = src.get(names.embeddings if tied else names.head, torch_dtype)
            head.mul_(final_norm_w)  # exact as through float64: one rounding of the product
            if final_width < d:
                head = rotate_embedding(head, position.kept, device)
            writer.add(names.head, head)
            del head, position

        weights = writer.finish()
        info = SliceInfo(widths, final_width, run.timings.summary())
        mark_untied(config)
        config.to_json_file(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        finish_save(
            tmp,
            out_dir,
            base_model=base_model or str(folder),
            architecture=type(model).__name__,
            widths=widths,
            final_width=final_width,
            dtype=torch_dtype,
            weights=weights,
            num_parameters=writer.num_parameters,
            has_tokenizer=tokenizer is not None,
            extra={**(extra or {}), "streamed": True},
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _rebuild_rotary(model: nn.Module) -> None:
    """Rebuild the rotary tables (non-persistent buffers) of a model built on ``meta``; the decoder layers are
    still on ``meta`` then, so only modules with ``inv_freq`` are rebuilt."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq") and any(b.is_meta for b in child.buffers(recurse=False)):
                setattr(parent, name, type(child)(config=child.config))
