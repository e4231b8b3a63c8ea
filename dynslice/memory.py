"""A memory model of slicing: peak host RAM, peak GPU memory and output size, from the model config alone.

It walks the engine's phases (capture and embedding, each decoder layer, the head) and adds, at each, the bytes
alive then: weights, calibration signals (kept in the model's dtype), the float64 PCA matrices, the fp32 copies a
rotation makes, one batch's forward temporaries, and, when streaming, the output shard not yet written. The peak
is the largest phase. Bytes above the process's baseline (Python, torch and transformers imported) are predicted.

Placement (:func:`plan`):

- ``memory``: the whole model in host RAM (or on the GPU, when ``device`` is a GPU and the model fits there),
  one layer computed at a time on ``device``.
- ``stream``: the weights stay on disk; one decoder layer at a time is read, sliced on ``device`` and written.
  The calibration signals stay in host RAM.

Assumptions: calibration without padding (a padded batch adds a (batch × 1 × seq × seq) mask per batch), SDPA
attention, default glibc malloc. ``tests/test_memory.py`` checks the predictions against measured peaks.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dynslice.core.checks import check_choice, check_int, check_real

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1 << 30


@dataclass(frozen=True)
class Shapes:
    """What the memory model needs from a config."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, cfg) -> Shapes:
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
        return cls(vocab=int(cfg.vocab_size), hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
                   heads=heads, kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), intermediate=int(cfg.intermediate_size),
                   tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                   qkv_bias=getattr(cfg, "model_type", "") == "qwen2")

    def layer_params(self, d_in: int | None = None, d_out: int | None = None, sliced: bool = False) -> int:
        """Parameters of one decoder layer, dense or sliced (reading ``d_in``, writing ``d_out``)."""
        d = self.hidden
        d_in = d if d_in is None else d_in
        d_out = d if d_out is None else d_out
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        n = d_in * (q + 2 * kv) + q * d_in + 2 * d_in * self.intermediate + self.intermediate * d_out
        n += (q + 2 * kv) if self.qkv_bias else 0
        if sliced:
            return n + d_in * d_in + d_in * d_out  # the two shortcut matrices
        return n + 2 * d  # the two norm scales


@dataclass(frozen=True)
class MemoryPlan:
    """The predicted placement and peaks of one slicing run (bytes)."""

    mode: str  # "memory" or "stream"
    device: str
    weights_on: str  # "host", "gpu" or "disk"
    signals_on: str  # "host" or "gpu"
    dtype: str
    peak_host_bytes: int
    peak_gpu_bytes: int
    output_bytes: int
    dense_bytes: int
    signals_bytes: int
    phase_host_bytes: dict[str, int]

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The plan in a few lines, printed before slicing starts."""
        def g(n: int) -> str:
            return f"{n / GIB:.2f} GiB"
        return "\n".join([
            (f"plan: {self.mode} (weights on {self.weights_on}, calibration signals on {self.signals_on}, "
            f"layers computed on {self.device}, {self.dtype})"),
            f"  dense weights {g(self.dense_bytes)}, calibration signals {g(self.signals_bytes)} per copy",
            (f"  predicted peak host RAM {g(self.peak_host_bytes)} above the process baseline, "
            f"peak GPU memory {g(self.peak_gpu_bytes)}"),
            f"  output folder {g(self.output_bytes)}",
        ])


def _round_down(x: float, interval: int) -> int:
    return max(interval, int(x // interval * interval))


def predict(shapes: Shapes, nsamples: int, seqlen: int, dtype: str = "bf16", *, mode: str = "memory",
            device: str = "cpu", batch_size: int = 8, widths: list[int] | None = None, sp: float = 0.3,
            shard_bytes: int = GIB, resident: bool = False) -> MemoryPlan:
    """Predict the peaks of slicing a model of ``shapes`` (see the module docstring).

    ``widths`` defaults to a constant slice of ``sp`` (rounded down to a multiple of 8); ``resident``: the model
    and the signals live on the GPU (``mode="memory"`` with a GPU device only).
    """
    check_choice("dtype", dtype, DTYPE_BYTES)
    check_choice("mode", mode, ("memory", "stream"))
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
        check_int(name, value, 1)
    check_real("sp", sp, 0, 1, high_open=True)
    gpu = device != "cpu"
    s, b = shapes, DTYPE_BYTES[dtype]
    d, v, inter = s.hidden, s.vocab, s.intermediate
    widths = list(widths) if widths is not None else [_round_down(d * (1 - sp), 8)] * s.layers
    outs = widths[1:] + [d]
    tokens, batch_tokens = nsamples * seqlen, min(batch_size, nsamples) * seqlen

    dense_layer = s.layer_params() * b
    dense = (v * d * (1 if s.tied else 2) + d + s.layers * s.layer_params()) * b
    out_tensors = [v * widths[0] * b] + [s.layer_params(widths[i], outs[i], True) * b for i in range(s.layers)]
    out_tensors.append(v * d * b)
    output = sum(out_tensors)

    sig = tokens * d * b  # one copy of the residual signals, in the model's dtype
    kwargs = 2 * tokens * s.head_dim * 4  # rotary cos/sin per batch (fp32), shared by the layers
    pca = 4 * d * d * 8 + 4096 * d * 4  # Gram, its damped copy, eigenvectors and their reordering; one fp32 chunk
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    fwd = batch_tokens * (3 * inter * b + (3 * (q + 2 * kv) + 2 * d) * b + 2 * d * 4)  # one batch's temporaries
    rot = 2 * inter * d * 4  # the largest weight in fp32 and its rotated fp32 copy
    emb_rot = v * widths[0] * b + 8192 * (d + widths[0]) * 4  # rotated embedding, one fp32 block of rows

    phases: dict[str, int] = {}
    gpu_phases: dict[str, int] = {}
    if mode == "memory":
        # Loaded from safetensors, the dense weights stay file-backed (mapped, counted as resident once touched)
        # while the rotated weights are new memory: at the end both are resident.
        phases["capture+embeddings"] = dense + sig + tokens * widths[0] * b + pca + emb_rot + kwargs
        phases["layers"] = dense + output + 2 * sig + pca + rot + fwd * (not gpu) + kwargs
        phases["save"] = dense + output
        if gpu and resident:  # moved to the GPU: host memory is freed, the GPU holds one copy of the weights
            head_copy = v * d * b if s.tied else 0
            gpu_phases = {"capture+embeddings": dense + head_copy + sig + tokens * widths[0] * b + pca + emb_rot,
                          "layers": dense + head_copy + 2 * sig + pca + rot + fwd + kwargs}
            phases = {"load": dense}
        elif gpu:
            gpu_phases["layer"] = dense_layer + 2 * rot + pca + fwd + 2 * batch_tokens * d * b
        weights_on, signals_on = ("gpu", "gpu") if (gpu and resident) else ("host", "host")
    else:
        emb = v * d * b
        pending = 0
        pend_after: list[int] = []
        for t in out_tensors:  # the shard writer: flush before the pending bytes would exceed shard_bytes
            if pending and pending + t > shard_bytes:
                pending = 0
            pending += t
            pend_after.append(pending)
        phases["capture+embeddings"] = emb + sig + tokens * widths[0] * b + pca + emb_rot + kwargs
        layer_peak = max(pend_after[i] for i in range(s.layers)) if s.layers else 0
        phases["layers"] = (dense_layer + 2 * sig + pca + rot + fwd * (not gpu) + kwargs + layer_peak
                            + out_tensors[1])
        phases["head"] = emb + pend_after[-1] + (v * d * b if d > outs[-1] else 0) + 8192 * d * 4
        if gpu:
            gpu_phases["layer"] = dense_layer + 2 * rot + pca + fwd + 2 * batch_tokens * d * b
        weights_on, signals_on = "disk", "host"
    return MemoryPlan(mode=mode, device=device, weights_on=weights_on, signals_on=signals_on, dtype=dtype,
                      peak_host_bytes=int(max(phases.values())),
                      peak_gpu_bytes=int(max(gpu_phases.values())) if gpu_phases else 0, output_bytes=int(output),
                      dense_bytes=int(dense), signals_bytes=int(sig), phase_host_bytes=phases)


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
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def plan(shapes: Shapes, nsamples: int, seqlen: int, dtype: str = "bf16", *, device: str = "cpu",
         batch_size: int = 8, widths: list[int] | None = None, sp: float = 0.3, stream: str = "auto",
         streamable: bool = True, host_bytes: int | None = None, gpu_bytes: int | None = None,
         headroom: float = 0.9) -> MemoryPlan:
    """Choose the placement: resident on the GPU when model and signals fit there (fastest), else in host RAM when
    the in-RAM peak fits in ``headroom`` × the available RAM, else streaming (when ``streamable``).

    ``stream``: ``"auto"``, ``"on"`` (force streaming) or ``"off"`` (force in-RAM).
    """
    check_choice("stream", stream, ("auto", "on", "off"))
    if stream == "on" and not streamable:
        raise ValueError("stream: 'on' needs a local folder of safetensors weights (GGUF and built-in models "
                         "are sliced in RAM)")
    kw = {"device": device, "batch_size": batch_size, "widths": widths, "sp": sp}
    host_bytes = available_host_bytes() if host_bytes is None else host_bytes
    gpu_bytes = available_gpu_bytes(device) if gpu_bytes is None else gpu_bytes
    if stream == "on":
        return predict(shapes, nsamples, seqlen, dtype, mode="stream", **kw)
    if device != "cpu":
        resident = predict(shapes, nsamples, seqlen, dtype, mode="memory", resident=True, **kw)
        if resident.peak_gpu_bytes <= headroom * gpu_bytes:
            return resident
    in_ram = predict(shapes, nsamples, seqlen, dtype, mode="memory", **kw)
    if stream == "off" or not streamable or in_ram.peak_host_bytes <= headroom * host_bytes:
        return in_ram
    return predict(shapes, nsamples, seqlen, dtype, mode="stream", **kw)
