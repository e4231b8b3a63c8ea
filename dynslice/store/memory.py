"""A memory model of slicing: peak host RAM, peak GPU memory and output size, from the model config alone.

It walks the engine's steps (capture, the embedding PCA and rotation, then per decoder layer: attention, PCA, MLP,
PCA, rotation, projection; the head; the save) and adds, at each, the bytes alive then: weights, calibration signals
(kept in the model's dtype), the float64 PCA bases and their working matrices, the fp32 copies a rotation makes,
one batch's forward temporaries and, when streaming, the output shard not yet written. The peak is the largest step.
Bytes above the process's baseline (Python, torch and transformers imported) are predicted.

What stays resident, measured on Linux with ``/proc/self/status`` (``RssAnon``/``RssFile``) during real runs:

- ``weights="mapped"``: a safetensors checkpoint loaded by ``from_pretrained`` in its own dtype is memory-mapped.
  A page costs RAM once touched; the engine touches every page (the norm folding writes the head and the layers'
  input linears in place, which makes private copies of those pages; the embedding lookup, its rotation and the
  forwards read the rest), and the mapping lives while any tensor of the file does, so the *whole dense model stays
  resident until the end* even after a tensor is replaced by its rotated copy. The untied LM head is the dense one,
  scaled in place: it is not a new tensor.
- ``weights="anonymous"`` (GGUF, built-in models, a dtype conversion): loading holds the file's bytes and the
  converted copy for a moment; afterwards a replaced tensor is freed (the embedding after its rotation, each layer's
  dense weights as it is sliced).
- streaming maps one decoder layer's tensors at a time (one ``safe_open``): its pages, and the private copies the
  norm folding makes, stay until the layer's last dense tensor is replaced; the embedding's go once it is rotated.
- glibc malloc serves a block smaller than its dynamic mmap threshold from its heap, and a freed heap block stays
  in the resident set. The threshold rises to the size of each freed mapped block, never above 32 MiB (64-bit), so
  blocks of 32 MiB and more are always mapped and given back. The blocks below that size of the embedding PCA (the
  float64 d×d matrices) and, when the vocabulary needs more than one block, of the embedding rotation stay resident
  to the end (:data:`MMAP_THRESHOLD_MAX`). On reduced shapes (hidden 1024) this is about a fifth of the peak; on
  7B/8B shapes every such block is 64 MiB or more and none is retained.
- :data:`RUNTIME_BYTES`: code pages (MKL, oneDNN, safetensors), their work buffers and interpreter objects first
  touched while slicing.

On reduced shapes the peak of one run varies by about ±10%, now and then more (glibc reuses freed heap blocks in an
order that differs from run to run); ``bench/memory_model.py`` compares the median of repeated fresh-process runs.

Placement (:func:`plan`):

- ``memory``: the whole model in host RAM (or on the GPU, when ``device`` is a GPU and the model fits there),
  one layer computed at a time on ``device``.
- ``stream``: the weights stay on disk; one decoder layer at a time is read, sliced on ``device`` and written.
  The calibration signals stay in host RAM.

Assumptions: calibration without padding (a padded batch adds a (batch × 1 × seq × seq) mask per batch), SDPA
attention, default glibc malloc, ``final_width`` = hidden (the head is not sliced). ``tests/test_memory.py`` checks
the predictions against measured peaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dynslice.core.checks import check_choice, check_int, check_real
from dynslice.core.slicing import EMBEDDING_CHUNK_ROWS, forms_in_input_basis
from dynslice.store.placement import available_gpu_bytes, available_host_bytes, weights_budget

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1 << 30
MIB = 1 << 20
#: glibc's ceiling for its dynamic mmap threshold on 64-bit Linux: larger blocks are always mapped, and unmapped
#: when freed; smaller ones may come from the heap, which keeps them resident after they are freed.
MMAP_THRESHOLD_MAX = 32 * MIB
#: Code pages (MKL, oneDNN, safetensors), their cached work buffers and interpreter objects first touched while
#: slicing (measured: 26-28 MiB beyond the tensors alive, whatever the model).
RUNTIME_BYTES = 28 * MIB
#: float64 d×d matrices alive during a PCA: the Gram matrix, its damped copy, the eigenvectors and LAPACK's
#: workspace (about two more); the basis kept afterwards is one of them.
PCA_MATRICES = 5
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


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
    checkpoint_dtype: str | None = None  # "fp32"/"bf16"/"fp16" as the config records it, None when unknown

    @classmethod
    def from_config(cls, cfg) -> Shapes:
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
        return cls(
            vocab=int(cfg.vocab_size),
            hidden=int(cfg.hidden_size),
            layers=int(cfg.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate=int(cfg.intermediate_size),
            tied=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=getattr(cfg, "model_type", "") == "qwen2",
            checkpoint_dtype=_DTYPE_NAMES.get(str(getattr(cfg, "dtype", None)).removeprefix("torch.")),
        )

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
    weights: str = "mapped"  # how the loaded dense weights are held in RAM ("mapped" or "anonymous")

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The plan in a few lines, printed before slicing starts."""

        def g(n: int) -> str:
            return f"{n / GIB:.2f} GiB"

        return "\n".join(
            [
                (
                    f"plan: {self.mode} (weights on {self.weights_on}, calibration signals on {self.signals_on}, "
                    f"layers computed on {self.device}, {self.dtype})"
                ),
                (
                    f"  dense weights {g(self.dense_bytes)}"
                    + (f" ({self.weights})" if self.weights_on == "host" else "")
                    + f", calibration signals {g(self.signals_bytes)} per copy"
                ),
                (
                    f"  predicted peak host RAM {g(self.peak_host_bytes)} above the process baseline, "
                    f"peak GPU memory {g(self.peak_gpu_bytes)}"
                ),
                f"  output folder {g(self.output_bytes)}",
            ]
        )


def round_down(x: float, interval: int) -> int:
    """``x`` rounded down to a multiple of ``interval``, at least ``interval`` (a width is never 0)."""
    return max(interval, int(x // interval * interval))


def _heap(*blocks: int) -> int:
    """The bytes of ``blocks`` that glibc serves from its heap (and keeps resident once they are freed)."""
    return sum(n for n in blocks if n < MMAP_THRESHOLD_MAX)


def _reusing(kept: int, *blocks: int) -> int:
    """Resident bytes once ``blocks`` are allocated next to ``kept`` freed-but-resident heap bytes: the heap serves
    its blocks from the freed ones first, so only what exceeds them is new; larger blocks are mapped anew."""
    heap = _heap(*blocks)
    return sum(blocks) - heap + max(kept, heap)


@dataclass(frozen=True)
class _Step:
    """Sizes (bytes) shared by the steps of one prediction."""

    s: Shapes
    b: int  # bytes per weight / signal element
    sig: int  # one copy of the residual signals at the full hidden size
    batch_tokens: int
    cpu: bool  # the PCA, rotations and forwards run in host RAM

    @property
    def mat(self) -> int:
        return self.s.hidden * self.s.hidden * 8

    def signals(self, width: int) -> int:
        return self.sig // self.s.hidden * width

    def embedding(self, w0: int, kept: int) -> int:
        """The embedding step beyond the weights held: PCA, then rotation into a new (vocab × w0) tensor a block of
        rows at a time (an fp32 copy of the block and its fp32 product), then the projection of the signals;
        ``kept``: the heap blocks the PCA leaves resident, from the rotation on."""
        s, b = self.s, self.b
        if not self.cpu:  # the PCA and the rotation run on the GPU; the rotated rows come back one block at a time
            return self.sig + s.vocab * w0 * b + self.signals(w0) + kept
        rows = min(s.vocab, EMBEDDING_CHUNK_ROWS)
        pca = self.sig + PCA_MATRICES * self.mat
        rotate = self.sig + self.mat + _reusing(kept, s.vocab * w0 * b, rows * s.hidden * 4, rows * w0 * 4)
        project = self.sig + self.mat + _reusing(kept, s.vocab * w0 * b, self.signals(w0))
        return max(pca, rotate, project)

    def layer(self, d_in: int, d_out: int, last: bool, dense: str) -> int:
        """One decoder layer beyond the bytes held outside it: its weights (dense and rotated), signals, bases and
        working memory at each step. ``dense``: its dense weights are ``"held"`` (counted outside: a mapped
        checkpoint), stay ``"whole"`` until the layer is done (streaming: one mapping for the layer's tensors) or are
        ``"freed"`` one by one as their rotated copies replace them."""
        s, b, tb = self.s, self.b, self.batch_tokens
        d, inter = s.hidden, s.intermediate
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        q = s.heads * s.head_dim
        bias = qkv * b if s.qkv_bias else 0
        dense_parts = {
            "attn_in": d * qkv * b + bias,
            "attn_out": q * d * b,
            "mlp_in": 2 * d * inter * b,
            "mlp_out": inter * d * b,
            "norms": 2 * d * b,
        }
        rot = {
            "attn_in": d_in * qkv * b + bias,
            "attn_out": q * d_in * b,
            "mlp_in": 2 * d_in * inter * b,
            "mlp_out": inter * d_out * b,
            "shortcuts": (d_in * d_in + d_in * d_out) * b,
        }

        def weights(*rotated: str) -> int:
            if dense == "held":
                alive = 0
            elif dense == "whole":
                alive = sum(dense_parts.values())
            else:
                alive = sum(n for k, n in dense_parts.items() if k not in rotated)
            return alive + sum(rot[k] for k in rotated)

        x, mid, nxt, mat = self.signals(d_in), self.sig, self.signals(d_out), self.mat
        if not self.cpu:  # host: weights and signals; the rest is on the GPU
            return weights() + max(x + mid, mid + self.sig + nxt)
        pca = PCA_MATRICES * mat
        # with many tokens a sublayer's output is formed in its input's full basis: a rotated copy of the output
        # linear lives beside the original through its forwards and PCA, and the composed basis is one more matrix
        tokens = self.sig // (d * b)
        ca = q * d * b + mat if forms_in_input_basis(d, q, tokens, d_in) else 0
        cm = inter * d * b + mat if forms_in_input_basis(d, inter, tokens, d_in) else 0
        attn_ws = tb * (2 * d_in * 4 + 2 * qkv * b + 2 * d * b)  # the fp32 norm, q/k/v and their rotary copies, out
        mlp_ws = tb * (3 * inter + d_in) * b  # gate/up outputs, their product, the projected input
        rot_ws = inter * d * 4 + inter * d_out * 4  # the largest weight in fp32 and its rotated fp32 product
        left = tb * (d_in + 2 * d) * b  # the loops' last input, attention output and MLP output (still referenced)
        a = ("attn_in",)
        m = ("attn_in", "attn_out", "mlp_in")
        steps = [
            weights(*a) + x + mid + mat + attn_ws + ca,  # attention forwards: x consumed as mid is produced
            weights(*a) + mid + mat + pca + ca,  # PCA of the mid position
        ]
        if not (last and d_out == d):  # after the last layer nothing reads its output: its MLP does not run
            steps += [
                weights(*m) + mid + 2 * mat + mlp_ws + left + cm,  # MLP forwards: mid consumed as out is produced
                weights(*m) + self.sig + 2 * mat + pca + left + cm,  # PCA of the output position
                weights(*m, "mlp_out") + self.sig + 3 * mat + rot_ws + left,  # rotation of the MLP output
                weights(*m, "mlp_out", "shortcuts") + self.sig + nxt + 3 * mat + left,  # next input
            ]
        return max(steps)


def predict(
    shapes: Shapes,
    nsamples: int,
    seqlen: int,
    dtype: str = "bf16",
    *,
    mode: str = "memory",
    device: str = "cpu",
    batch_size: int = 8,
    widths: list[int] | None = None,
    sp: float = 0.3,
    shard_bytes: int = GIB,
    resident: bool = False,
    weights: str = "mapped",
) -> MemoryPlan:
    """Predict the peaks of slicing a model of ``shapes`` (see the module docstring).

    ``widths`` defaults to a constant slice of ``sp`` (rounded down to a multiple of 8); ``resident``: the model
    and the signals live on the GPU (``mode="memory"`` with a GPU device only). ``weights`` (in-RAM only): how the
    loaded dense weights are held, ``"mapped"`` (a safetensors checkpoint loaded in its own dtype, what
    ``bench/memory_model.py`` measures) or ``"anonymous"`` (GGUF, built-in models, a dtype conversion; loading then
    briefly holds the file's bytes, in ``shapes.checkpoint_dtype``, and the converted copy).
    """
    check_choice("dtype", dtype, DTYPE_BYTES)
    check_choice("mode", mode, ("memory", "stream"))
    check_choice("weights", weights, ("mapped", "anonymous"))
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
        check_int(name, value, 1)
    check_real("sp", sp, 0, 1, high_open=True)
    gpu = device != "cpu"
    s, b = shapes, DTYPE_BYTES[dtype]
    d, v, inter = s.hidden, s.vocab, s.intermediate
    widths = list(widths) if widths is not None else [round_down(d * (1 - sp), 8)] * s.layers
    outs = widths[1:] + [d]
    tokens, batch_tokens = nsamples * seqlen, min(batch_size, nsamples) * seqlen

    emb_bytes, dense_layer = v * d * b, s.layer_params() * b
    dense = (v * d * (1 if s.tied else 2) + d + s.layers * s.layer_params()) * b
    sliced = [s.layer_params(widths[i], outs[i], True) * b for i in range(s.layers)]
    out_tensors = [v * widths[0] * b, *sliced, v * d * b]
    output = sum(out_tensors)

    sig = tokens * d * b  # one copy of the residual signals, in the model's dtype
    kwargs = 2 * tokens * s.head_dim * 4  # rotary cos/sin per batch (fp32), shared by the layers
    step = _Step(s, b, sig, batch_tokens, cpu=not gpu)
    rows = min(v, EMBEDDING_CHUNK_ROWS)
    # glibc keeps the embedding PCA's small blocks, and those of the embedding rotation once a second block of
    # rows reuses them, resident to the end (module docstring)
    kept = 0 if gpu else _heap(*[step.mat] * 3) + (_heap(rows * widths[0] * 4, rows * widths[0] * b) if v > rows else 0)
    base = RUNTIME_BYTES + kwargs  # before the first PCA
    extra = base + kept  # from the embedding rotation on

    phases: dict[str, int] = {}
    gpu_phases: dict[str, int] = {}
    # GPU memory (and the GPU-resident plan): the earlier terms, not re-measured by this model's checks
    pca = 4 * d * d * 8 + 4096 * d * 4
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    fwd = batch_tokens * (3 * inter * b + (3 * (q + 2 * kv) + 2 * d) * b + 2 * d * 4)
    rot = 2 * inter * d * 4 + inter * d * b  # fp32 weight and product; the rotated copy of the output linear
    emb_rot = v * widths[0] * b + 8192 * (d + widths[0]) * 4
    if mode == "memory":
        mapped = weights == "mapped"
        head_new = emb_bytes if s.tied else 0  # a tied head is cloned before the norm is folded into it
        held, new = dense, v * widths[0] * b + head_new  # the dense weights, the tensors made before layer 0
        if not mapped:  # the old embedding goes once rotated (tied: the head kept its own clone)
            held -= emb_bytes
            phases["load"] = RUNTIME_BYTES + dense + dense // b * DTYPE_BYTES.get(s.checkpoint_dtype, b)
        phases["capture+embeddings"] = base + dense + head_new + step.embedding(widths[0], kept)
        layer_peaks = []
        for i in range(s.layers):
            layer_held = held - (0 if mapped else (i + 1) * dense_layer) + new + sum(sliced[:i])
            layer_peaks.append(
                layer_held + step.layer(widths[i], outs[i], i == s.layers - 1, "held" if mapped else "freed")
            )
        phases["layers"] = extra + max(layer_peaks, default=0)
        phases["save"] = extra + (held if mapped else held - s.layers * dense_layer) + new + sum(sliced)
        if gpu and resident:  # moved to the GPU: host memory is freed, the GPU holds one copy of the weights
            head_copy = v * d * b if s.tied else 0
            gpu_phases = {
                "capture+embeddings": dense + head_copy + sig + tokens * widths[0] * b + pca + emb_rot,
                "layers": dense + head_copy + 2 * sig + pca + rot + fwd + kwargs,
            }
            phases = {"load": dense}
        elif gpu:
            gpu_phases["layer"] = dense_layer + 2 * rot + pca + fwd + 2 * batch_tokens * d * b
        weights_on, signals_on = ("gpu", "gpu") if (gpu and resident) else ("host", "host")
    else:
        pending = 0
        pend_after: list[int] = []
        for t in out_tensors:  # the shard writer: flush before the pending bytes would exceed shard_bytes
            if pending and pending + t > shard_bytes:
                pending = 0
            pending += t
            pend_after.append(pending)
        phases["capture+embeddings"] = base + emb_bytes + step.embedding(widths[0], kept)
        phases["layers"] = extra + max(
            (pend_after[i] + step.layer(widths[i], outs[i], i == s.layers - 1, "whole") for i in range(s.layers)),
            default=0,
        )
        # the head is read, the final norm folded into it in place (its pages copied), and it joins the shard
        phases["head"] = extra + pend_after[-2] + emb_bytes + sig
        if gpu:
            gpu_phases["layer"] = dense_layer + 2 * rot + pca + fwd + 2 * batch_tokens * d * b
        weights_on, signals_on = "disk", "host"
    return MemoryPlan(
        mode=mode,
        device=device,
        weights_on=weights_on,
        signals_on=signals_on,
        dtype=dtype,
        peak_host_bytes=int(max(phases.values())),
        peak_gpu_bytes=int(max(gpu_phases.values())) if gpu_phases else 0,
        output_bytes=int(output),
        dense_bytes=int(dense),
        signals_bytes=int(sig),
        phase_host_bytes=phases,
        weights=weights,
    )


def plan(
    shapes: Shapes,
    nsamples: int,
    seqlen: int,
    dtype: str = "bf16",
    *,
    device: str = "cpu",
    batch_size: int = 8,
    widths: list[int] | None = None,
    sp: float = 0.3,
    stream: str = "auto",
    streamable: bool = True,
    host_bytes: int | None = None,
    gpu_bytes: int | None = None,
    headroom: float = 0.9,
    weights: str | None = None,
) -> MemoryPlan:
    """Choose the placement: resident on the GPU when model and signals fit there (fastest), else in host RAM when
    the in-RAM peak fits in ``headroom`` × the available RAM, else streaming (when ``streamable``).

    ``stream``: ``"auto"``, ``"on"`` (force streaming) or ``"off"`` (force in-RAM). ``weights``: see
    :func:`predict`; by default what ``dynslice slice`` gets: ``"mapped"`` for safetensors weights (``streamable``)
    loaded in the checkpoint's own dtype (``shapes.checkpoint_dtype``), else ``"anonymous"``.
    """
    check_choice("stream", stream, ("auto", "on", "off"))
    if stream == "on" and not streamable:
        raise ValueError(
            "stream: 'on' needs a local folder of safetensors weights (GGUF and built-in models are sliced in RAM)"
        )
    if weights is None:
        weights = "mapped" if streamable and shapes.checkpoint_dtype == dtype else "anonymous"
    kw = {"device": device, "batch_size": batch_size, "widths": widths, "sp": sp, "weights": weights}
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


def plan_for_spec(
    spec: str,
    nsamples: int,
    seqlen: int,
    dtype: str = "bf16",
    *,
    device: str = "cpu",
    batch_size: int = 8,
    sp: float = 0.3,
    stream: str = "auto",
    host_gib: float | None = None,
    gpu_gib: float | None = None,
    weights_needed: bool = True,
    config: Any = None,
) -> MemoryPlan:
    """:func:`plan` for a model spec, read from its config alone (a folder with only ``config.json`` will do when
    ``weights_needed`` is false, as for ``dynslice plan``). ``host_gib``/``gpu_gib``: the memory to plan for
    (default: what is available now). ``config``: the spec's model config when the caller has read it already
    (reading a GGUF's takes seconds)."""
    import torch

    from dynslice.store.models import config_of, resolve_spec
    from dynslice.store.stream import is_streamable

    try:
        dev_type = torch.device(device).type  # a plan may be made for a GPU this machine does not have
    except (RuntimeError, TypeError):
        dev_type = None
    if dev_type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not cpu or cuda[:N]")
    r = resolve_spec(spec)
    # a plan may be made from a bare config.json, before the weights are downloaded
    streamable = r.kind == "hub" or (r.kind == "dir" and (not weights_needed or is_streamable(r.location)))
    for name, v in (("host-gib", host_gib), ("gpu-gib", gpu_gib)):
        if v is not None and not v > 0:
            raise ValueError(f"{name}: {v} is outside {name} > 0")
    return plan(
        Shapes.from_config(config if config is not None else config_of(spec)),
        nsamples,
        seqlen,
        dtype,
        device=str(device),
        batch_size=batch_size,
        sp=sp,
        stream=stream,
        streamable=streamable,
        host_bytes=None if host_gib is None else int(host_gib * GIB),
        gpu_bytes=None if gpu_gib is None else int(gpu_gib * GIB),
    )


# ------------------------------------------------------------------------------------------- one run of a sweep
def forward_bytes(shapes: Shapes, dtype: str, batch_tokens: int, seqlen: int, *, logits: bool) -> int:
    """Working memory of one forward pass over ``batch_tokens`` tokens (rows of ``seqlen``): one layer's attention
    and MLP temporaries, the residual stream, and with ``logits`` the batch's logits in the model's dtype plus the
    fp32 copies that perplexity's per-row cross-entropy makes of one row (the copy, its log-softmax, the NLLs)."""
    s, b = shapes, DTYPE_BYTES[dtype]
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    layer = batch_tokens * ((3 * s.intermediate + 2 * qkv + 4 * s.hidden) * b + 2 * s.hidden * 4)
    head = batch_tokens * s.vocab * b + 2 * seqlen * s.vocab * 4 if logits else 0
    return layer + head


@dataclass(frozen=True)
class RunPlan:
    """The predicted peaks of one run of a sweep (bytes above the process baseline): the LR score (the dense model
    and a forward), the slicing (:class:`MemoryPlan`), and the evaluation of the sliced model (what the slicing
    leaves held, and a forward with its logits). A sweep holds one model at a time, so its peak is the largest run's,
    whatever the number of runs."""

    slicing: MemoryPlan
    phase_host_bytes: dict[str, int]
    phase_gpu_bytes: dict[str, int]

    @property
    def peak_host_bytes(self) -> int:
        return max(self.phase_host_bytes.values())

    @property
    def peak_gpu_bytes(self) -> int:
        return max(self.phase_gpu_bytes.values(), default=0)

    def to_json(self) -> dict:
        return {
            "peak_host_bytes": self.peak_host_bytes,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "phase_host_bytes": self.phase_host_bytes,
            "phase_gpu_bytes": self.phase_gpu_bytes,
            "slicing": self.slicing.to_json(),
        }

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.phase_host_bytes.items())
        gpu = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.phase_gpu_bytes.items())
        return (
            f"one run of the sweep: peak host RAM {self.peak_host_bytes / GIB:.2f} GiB ({parts})"
            + (f"; peak GPU memory {self.peak_gpu_bytes / GIB:.2f} GiB ({gpu})" if gpu else "")
            + f"; slicing {self.slicing.mode} (weights on {self.slicing.weights_on})"
        )


def plan_run(
    shapes: Shapes,
    slicing: MemoryPlan,
    *,
    lr_batch_tokens: int,
    eval_batch_tokens: int,
    eval_seqlen: int,
    gpu_bytes: int | None = None,
    host_bytes: int | None = None,
) -> RunPlan:
    """:class:`RunPlan` of one run whose slicing is planned by ``slicing`` (:func:`plan`), its LR computed on
    batches of ``lr_batch_tokens`` tokens and its perplexity on batches of ``eval_batch_tokens`` (rows of
    ``eval_seqlen``). On a GPU of ``gpu_bytes``, a model whose weights and forward do not fit runs with its layers
    offloaded from host RAM (:func:`dynslice.store.placement.place`): the GPU then holds the forward and as many
    layers as fit, and the phase's name says ``offload``."""
    dtype, gpu = slicing.dtype, slicing.device != "cpu"
    dense, sliced = slicing.dense_bytes, slicing.output_bytes
    lr_fwd = forward_bytes(shapes, dtype, lr_batch_tokens, lr_batch_tokens, logits=False)
    ev_fwd = forward_bytes(shapes, dtype, eval_batch_tokens, eval_seqlen, logits=True)
    held_after = slicing.phase_host_bytes.get("save", slicing.phase_host_bytes.get("head", 0))
    budget = None if gpu_bytes is None else int(0.9 * gpu_bytes)
    host: dict[str, int] = {}
    gpu_phases: dict[str, int] = {}

    def on_gpu(name: str, weights: int, fwd: int) -> bool:
        """Place one forward phase on the GPU: whole when it fits the budget, else offloaded (True: whole)."""
        if budget is None or weights + fwd <= budget:
            gpu_phases[name] = weights + fwd
            return True
        gpu_phases[f"{name} (offload)"] = min(budget, weights + fwd)
        return False

    if slicing.weights_on == "gpu":  # everything resident on the GPU; the host only loads
        host = {"load": dense}
        gpu_phases = {"lr": dense + lr_fwd, "slicing": slicing.peak_gpu_bytes, "eval": sliced + ev_fwd}
        return RunPlan(slicing, host, gpu_phases)
    if not gpu:
        host = {"lr": RUNTIME_BYTES + dense + lr_fwd, "slicing": slicing.peak_host_bytes}
        # in RAM the dense pages a mapped checkpoint leaves resident are still held; streamed, the model is read
        # back from the temporary folder
        host["eval"] = (held_after if slicing.mode == "memory" else RUNTIME_BYTES + sliced) + ev_fwd
        return RunPlan(slicing, host, gpu_phases)

    def offloaded(weights: int) -> int:
        """Host bytes of a model read layer by layer: what the GPU's share (its budget less the forward reserve
        of :mod:`dynslice.store.placement`) leaves, at most 90% of the host (the rest goes to an offload folder)."""
        rest = max(0, weights - weights_budget(gpu_bytes or 0))
        return rest if host_bytes is None else min(rest, int(0.9 * host_bytes))

    lr_whole = on_gpu("lr", dense, lr_fwd)
    gpu_phases["slicing"] = slicing.peak_gpu_bytes
    ev_whole = on_gpu("eval", sliced, ev_fwd)
    in_ram = slicing.mode == "memory"  # the model was sliced in host RAM: it is there already
    host = {
        # read straight to the GPU when it fits; else layer by layer, the GPU's share there and the rest in RAM
        "lr": RUNTIME_BYTES + (0 if lr_whole else offloaded(dense)),
        "slicing": slicing.peak_host_bytes,
        "eval": held_after if in_ram else RUNTIME_BYTES + (0 if ev_whole else offloaded(sliced)),
    }
    return RunPlan(slicing, host, gpu_phases)
