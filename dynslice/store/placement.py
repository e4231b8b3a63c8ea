"""Where a loaded model runs its forward passes (LR, perplexity, zero-shot): on the GPU when it fits there, else in
host RAM with its decoder layers offloaded to the GPU as they run (accelerate's ``dispatch_model``), so that the LR
and the evaluation of a model larger than the GPU still work, slowly, rather than fail.

Slicing has its own placement (:func:`dynslice.store.memory.plan`): resident on the GPU, in host RAM one layer
computed on the GPU at a time, or streamed from disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynslice.core.adapters import get_adapter
from dynslice.core.params import ArchDims, dense_params

GIB = 1 << 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

#: The share of the free GPU memory a placement may fill.
HEADROOM = 0.9
#: GPU memory kept free for a forward pass's activations and logits (batch × seqlen × vocab in fp32 at the paper's
#: sizes is about 1 GiB for Llama-3's vocabulary at batch 1 × 2048).
FORWARD_RESERVE = 2 * GIB


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def available_host_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (the physical memory when that is unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_gpu_bytes(device: str) -> int:
    """Free memory of a CUDA device (0 for the CPU)."""
    if device == "cpu" or not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def dense_bytes(config: Any, dtype: str) -> int:
    """Bytes of a dense model's weights, from its config."""
    return dense_params(ArchDims.from_config(config)) * DTYPE_BYTES[dtype]


def fits(n_bytes: int, device: str, gpu_bytes: int | None = None) -> bool:
    """Whether ``n_bytes`` of weights and one forward pass fit the device (the CPU always does: its pages are
    memory-mapped or swapped, not refused)."""
    if device == "cpu":
        return True
    free = available_gpu_bytes(device) if gpu_bytes is None else gpu_bytes
    return n_bytes + FORWARD_RESERVE <= HEADROOM * free


def weights_budget(gpu_bytes: int) -> int:
    """The bytes of weights a layer-by-layer load may put on a GPU with ``gpu_bytes`` free: the headroom's share,
    less the forward reserve."""
    return max(0, int(HEADROOM * gpu_bytes) - FORWARD_RESERVE)


def fits_device(config: Any, dtype: str, device: str, gpu_bytes: int | None = None) -> bool:
    """:func:`fits` for the dense model of ``config`` in ``dtype``."""
    return fits(dense_bytes(config, dtype), device, gpu_bytes)


def offload_map(model: nn.Module, device: str, gpu_bytes: int) -> dict[str, Any]:
    """The device map that keeps as many whole decoder layers on ``device`` as ``gpu_bytes`` allows (less the
    forward reserve) and offloads the rest to host RAM, never splitting a layer."""
    from accelerate import infer_auto_device_map

    index = torch.device(device).index or 0
    layer_classes = sorted({type(layer).__name__ for layer in get_adapter(model).layers})
    return infer_auto_device_map(
        model, max_memory={index: weights_budget(gpu_bytes), "cpu": 1 << 50}, no_split_module_classes=layer_classes
    )


def place(model: nn.Module, device: str, gpu_bytes: int | None = None) -> nn.Module:
    """Put a model (in host RAM) where its forward passes run: all on ``device`` when it fits, else dispatched
    with :func:`offload_map` (offloaded layers are copied to the GPU for their forward and dropped after)."""
    if device == "cpu":
        return model
    free = available_gpu_bytes(device) if gpu_bytes is None else gpu_bytes
    if fits(model_bytes(model), device, free):
        return model.to(device)
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=offload_map(model, device, free), main_device=device)


def release() -> None:
    """Hand freed memory back before the next model is read: Python's cycles, the CUDA cache, and glibc's heap
    (blocks below its mmap threshold stay resident after ``free`` until ``malloc_trim``; without it a sweep's
    resident set creeps up by tens of MiB a run)."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
