"""Rotate-and-slice (SliceGPT) with one residual-stream width per decoder layer.

For a model with hidden size ``D`` and ``L`` layers, :func:`slice_model` does what SliceGPT's ``rotate.py`` does:

1. fold every RMSNorm scale into the linears it feeds and untie the LM head (:func:`fuse_norms`);
2. the embeddings: PCA of their outputs, rotate and slice the embedding matrix (:func:`slice_embeddings`);
3. per decoder layer (:func:`slice_layer`): attention inputs (q/k/v read ``Q_in``), attention output (o_proj
   writes ``Q_mid``), MLP inputs (gate/up read ``Q_mid``), MLP output (down_proj writes ``Q_out``), and the
   shortcuts ``Q_inᵀ·Q_mid`` and ``Q_midᵀ·Q_out`` on the residual path;
4. the head reads the last layer's output position.

Each basis is the PCA of the calibration signals at that position (float64 eigh of ΣXᵀX over non-pad tokens,
damped by 1% of the mean diagonal), keeping its leading ``d`` directions. Each PCA sees signals that went through
the already-sliced earlier layers.

Layer ``i`` reads a residual of width ``widths[i]``; its attention writes back at that same width (the "mid"
position) and its MLP writes ``widths[i+1]`` (``final_width``, default ``D``, after the last layer).

Every sublayer runs exactly once per calibration batch: its output is computed before its output linear takes its
final rotation, the PCA of the new position is taken, and the rotated signal is obtained by projecting
(``X·Q[:, :d]``) instead of running the sublayer a second time. With many calibration tokens the new position's
signal is formed in the previous position's full basis rather than the dense one, which saves lifting every token
back (:func:`output_in_basis`). Only the kept columns of each final weight are ever computed.

The model's anatomy (module paths, norms, checkpoint names) is the adapter's business
(:mod:`dynslice.core.adapters`); this module only does the maths.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from dynslice.core.adapters import LlamaLikeAdapter, get_adapter
from dynslice.core.kernels import masked_gram, masked_gram_fp32
from dynslice.core.layers import RMSN, SlicedDecoderLayer
from dynslice.core.params import check_width, validate_widths

DAMPING = 0.01


@dataclass
class SliceInfo:
    """What was done to a sliced model: its widths and where the slicing time went."""

    widths: tuple[int, ...]
    final_width: int
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"widths": list(self.widths), "final_width": self.final_width, "timings_s": dict(self.timings_s)}


def check_slice_args(
    widths: Sequence[int], final_width: int | None, batch_size: int, n_layers: int, d: int
) -> tuple[tuple[int, ...], int]:
    """Validated ``(widths, final_width)``; ``final_width`` defaults to ``d``."""
    widths = validate_widths(widths, n_layers, d)
    final_width = d if final_width is None else check_width("final_width", final_width, d)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} must be an integer >= 1")
    return widths, final_width


class Timings:
    """Wall time of the engine's phases, summed over the steps: ``with timings("pca"): ...``."""

    PHASES = ("capture", "forward", "pca", "rotate")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``phase``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t

    def summary(self) -> dict[str, float]:
        """Seconds per phase, and ``total`` since this object was made, rounded to 0.1 ms."""
        out = {k: round(v, 4) for k, v in self.seconds.items()}
        out["total"] = round(time.perf_counter() - self._start, 4)
        return out


@dataclass
class Position:
    """One position of the residual stream (between two sublayers), as the engine leaves it.

    ``signals``: per calibration batch, the signal there, rotated and sliced (batch × seq × ``width``; emptied as
    the next step reads it); ``basis``: the position's full (D × D) float64 basis (its PCA), columns by decreasing
    variance; ``width``: how many of those columns are kept.
    """

    signals: list[torch.Tensor]
    basis: torch.Tensor
    width: int

    @property
    def kept(self) -> torch.Tensor:
        """The kept columns of the basis, ``Q = basis[:, :width]`` (D × width)."""
        return self.basis[:, : self.width]


@dataclass
class LayerCalibration:
    """What a decoder layer's forward needs besides its input signals: per calibration batch, its keyword
    arguments (masks, rotary tables) and the pad mask that keeps pad tokens out of every PCA."""

    kwargs: list[dict]
    masks: list[torch.Tensor]

    @property
    def n_tokens(self) -> int:
        """Calibration tokens over all batches, pads included (what the per-token work is proportional to)."""
        return sum(int(m.numel()) for m in self.masks)


@dataclass
class Run:
    """Where a slicing run computes (``device``: one layer at a time), where the model and the calibration signals
    stay (``home``), and the clock of its phases."""

    device: torch.device
    home: torch.device
    timings: Timings


# ----------------------------------------------------------------------------------------------------------------
# the algorithm


@torch.no_grad()
def slice_model(
    model: nn.Module,
    calibration: dict[str, torch.Tensor],
    widths: Sequence[int],
    *,
    final_width: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    embedding_mean: bool = False,
) -> nn.Module:
    """Rotate and slice ``model`` in place so that decoder layer ``i`` reads a residual stream ``widths[i]`` wide.

    Args:
        model: a dense causal LM of a supported architecture (any dtype). It is modified in place and returned.
        calibration: ``{"input_ids": (n × seqlen), "attention_mask": (n × seqlen)}``; tokens with mask 0 are
            left out of every PCA.
        widths: one integer input width per decoder layer, each in ``[1, D]``.
        final_width: width of the last layer's output and of the LM head's input (default ``D``: not sliced).
        batch_size: calibration sequences per forward.
        device: where each layer is computed (default: where the model is). The model and all calibration signals
            stay where they are (on the CPU for a CPU model); one layer at a time is moved to ``device``.
        progress: show a tqdm bar over the layers.
        embedding_mean: first subtract each embedding row's mean (:func:`subtract_embedding_mean`), as SliceGPT
            does; off by default because it is not exact on RMSNorm models.

    Returns:
        The same model object, now sliced, with ``model.dynslice_info`` (:class:`SliceInfo`) attached.
    """
    adapter = get_adapter(model)
    widths, final_width = check_slice_args(widths, final_width, batch_size, adapter.num_layers, adapter.hidden_size)
    n_layers = adapter.num_layers
    home = adapter.embeddings.weight.device
    run = Run(home if device is None else torch.device(device), home, Timings())
    model.eval()

    # Fold the norms (and untie the head); record what every decoder layer receives.
    with run.timings("capture"):
        fuse_norms(model, adapter)
        if embedding_mean:
            subtract_embedding_mean(model, adapter)
        captured = capture_inputs(model, calibration, batch_size, home, adapter)

    # The embeddings write position 0 of the residual stream.
    position = slice_embeddings(adapter, captured, widths[0], run)

    # The decoder layers, in order: layer i reads position i and writes position i + 1.
    outs = list(widths[1:]) + [final_width]
    for i in tqdm(range(n_layers), desc="slicing", unit="layer", disable=not progress):
        new, position = slice_layer(
            adapter,
            adapter.layers[i],
            position,
            width_out=outs[i],
            calibration=captured.for_layer(i),
            run=run,
            output_needed=i < n_layers - 1,
        )
        adapter.layers[i] = new.to(home)

    # The head reads the last position; it is rotated only when that position is sliced.
    with run.timings("rotate"):
        if final_width < adapter.hidden_size:
            _rotate_inputs(adapter.head, position.kept.to(adapter.head.weight.device))
    # nn.Module takes any attribute; torch's stub of its __setattr__ admits only tensors and modules.
    model.dynslice_info = SliceInfo(widths, final_width, run.timings.summary())  # type: ignore[assignment]
    return model


@torch.no_grad()
def slice_embeddings(adapter: LlamaLikeAdapter, captured: CapturedInputs, width: int, run: Run) -> Position:
    """PCA of the embedding outputs; rotate and slice the embedding matrix in place.

    Returns position 0 of the residual stream: the rotated first-layer input signals (``captured.x`` is emptied),
    its full (D × D) basis and ``width``.
    """
    with run.timings("pca"):
        basis = _pca(captured.x, captured.masks, run.device)
    q = basis[:, :width]
    with run.timings("rotate"):
        emb = adapter.embeddings
        adapter.embeddings = nn.Embedding(
            emb.num_embeddings,
            width,
            padding_idx=emb.padding_idx,
            _weight=rotate_embedding(emb.weight, q, run.device),
            _freeze=True,
        )
        signals = [_project(s, q, run.device) for s in _drain(captured.x)]
    return Position(signals, basis, width)


@torch.no_grad()
def slice_layer(
    adapter: LlamaLikeAdapter,
    layer: nn.Module,
    position_in: Position,
    *,
    width_out: int,
    calibration: LayerCalibration,
    run: Run,
    output_needed: bool,
) -> tuple[SlicedDecoderLayer, Position]:
    """Rotate and slice one norm-fused decoder layer, which reads ``position_in`` (its signals on ``run.home``, its
    basis on ``run.device``; the signals are emptied as they are read) and writes a position ``width_out`` wide.

    ``output_needed``: whether a later layer reads the output (False for the last layer). When it is not and
    ``width_out`` is ``D``, the output stays in the dense basis and the MLP does not run; otherwise the output's
    basis is computed (the head reads it when sliced), and its signals only when they are needed.

    Returns the sliced layer (on ``run.device``) and the output position (signals on ``run.home``). The three
    positions are the input (basis ``Q_in``), the mid one that attention writes at the input's width (``Q_mid``)
    and the output (``Q_out``). Each sublayer runs once: its output position is formed, in the cheaper frame, and
    its PCA taken before its output linear takes its final rotation (:func:`output_in_basis`).
    """
    d = adapter.hidden_size
    layer.to(run.device)
    p = adapter.parts(layer)
    device, home, timings, masks = run.device, run.home, run.timings, calibration.masks
    width_in = position_in.width
    q_in = position_in.kept

    # Attention inputs: q/k/v read the input position, rotated and sliced (W ← W·Q_in).
    with timings("rotate"):
        for lin in p.attn_in:
            _rotate_inputs(lin, q_in)

    # Attention output: the mid position (residual + attention), its PCA Q_mid; then o_proj writes it (W ← Q_midᵀ·W).
    with output_in_basis(p.attn_out, position_in.basis, width_in, calibration.n_tokens, timings) as frame:
        with timings("forward"):
            mid = []
            for xb, kw in zip(_drain(position_in.signals), calibration.kwargs):
                xb = xb.to(device)
                a = p.attn_block(p.attn_norm(xb), **_to(kw, device))[0]
                mid.append(frame.add_residual(a, xb).to(home))
        with timings("pca"):
            basis_mid, keep_mid = frame.pca(mid, masks, device, width_in)
    q_mid = basis_mid[:, :width_in]

    # MLP inputs: gate/up read the mid position, rotated and sliced (W ← W·Q_mid).
    with timings("rotate"):
        for lin in p.mlp_in:
            _rotate_inputs(lin, q_mid)

    if not output_needed and width_out == d:
        # MLP output, dense: nothing after the last layer reads a sliced stream, so down_proj and the head keep the
        # dense basis, and no signal is needed past this point: the MLP does not run.
        basis_out = torch.eye(d, dtype=torch.float64, device=device)
        signals_out: list[torch.Tensor] = []
    else:
        # MLP output: the output position (residual + MLP), its PCA Q_out; then down_proj writes it (W ← Q_outᵀ·W).
        with output_in_basis(p.mlp_out, basis_mid, width_in, calibration.n_tokens, timings) as frame:
            with timings("forward"):
                out = []
                for mb in _drain(mid):
                    m = _project(mb, keep_mid, device, keep_on_device=True)
                    y = p.mlp_block(p.mlp_norm(m))
                    out.append(frame.add_residual(y, m).to(home))
            with timings("pca"):
                basis_out, keep_out = frame.pca(out, masks, device, width_out)
        with timings("rotate"):
            signals_out = [_project(o, keep_out, device) for o in _drain(out)] if output_needed else []

    # Shortcuts: the residual path from each position to the next, Q_inᵀ·Q_mid and Q_midᵀ·Q_out.
    with timings("rotate"):
        new = adapter.sliced_layer(layer, width_in, width_out, dtype=p.mlp_out.weight.dtype, device=device)
        _set_shortcut(new.attn_shortcut, q_in, q_mid)
        _set_shortcut(new.mlp_shortcut, q_mid, basis_out[:, :width_out])
    return new, Position(signals_out, basis_out, width_out)


def forms_in_input_basis(hidden: int, out_features_in: int, n_tokens: int, d_in: int) -> bool:
    """Whether a sublayer's output signal is formed in its input position's full basis rather than the dense one:
    when rotating its output linear (``out_features_in`` inputs) into that basis and mapping the PCA back
    (``D·(K + 2D)`` multiply-adds, the float64 product counted twice) cost less than lifting every token's
    residual back to the dense basis (``n_tokens·d_in·D``)."""
    return hidden * (out_features_in + 2 * hidden) < n_tokens * d_in


class OutputFrame:
    """The coordinates in which a sublayer's output position is formed (made by :func:`output_in_basis`).

    ``in_residual_basis``: the coordinates are the residual position's full basis ``B``; otherwise the dense ones.
    After :meth:`pca`, ``basis`` is the new position's full basis in dense coordinates and ``width`` its kept width.
    """

    def __init__(self, residual_basis: torch.Tensor, residual_width: int, in_residual_basis: bool) -> None:
        self.residual_basis = residual_basis
        self.residual_width = residual_width
        self.in_residual_basis = in_residual_basis
        self.basis: torch.Tensor | None = None
        self.width = 0

    def add_residual(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The sublayer output ``y`` plus its rotated, sliced residual input ``x``, in this frame, in place.

        In ``B`` the residual is the first ``width`` coordinates, ``y[..., :width] += x``; in the dense basis it is
        lifted back, ``y + x·B[:, :width]ᵀ``, as one fused product.
        """
        if self.in_residual_basis:
            y[..., : x.shape[-1]].add_(x)
            return y
        lift = self.residual_basis[:, : self.residual_width].T.to(y.dtype)
        flat = y.reshape(-1, y.shape[-1])
        flat.addmm_(x.reshape(-1, x.shape[-1]), lift)
        return flat.view(y.shape)

    def pca(
        self, signals: list[torch.Tensor], masks: list[torch.Tensor], device: torch.device, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PCA of the new position's signals (in this frame) keeping ``width`` directions.

        Returns the position's full basis in dense coordinates, ``Q = B·V`` (or ``V``), and its kept columns in this
        frame, ``V[:, :width]``, which turn this frame's signals into the rotated, sliced stream.
        """
        v = _pca(signals, masks, device)
        self.basis = self.residual_basis @ v if self.in_residual_basis else v
        self.width = width
        return self.basis, v[:, :width]


@contextmanager
def output_in_basis(
    out_linear: nn.Linear, basis: torch.Tensor, width: int, n_tokens: int, timings: Timings
) -> Iterator[OutputFrame]:
    """Form a sublayer's output position (residual plus sublayer output) in the cheaper of two orthonormal frames;
    when the block ends, ``out_linear`` writes that position rotated and sliced.

    ``basis`` is the full (D × D) basis ``B`` of the residual's position, whose first ``width`` columns are kept.
    With many tokens (:func:`forms_in_input_basis`) ``out_linear`` first writes ``Y = X·B`` (``W ← Bᵀ·W``, for the
    forward only) and the residual is just the first ``width`` coordinates; else ``X`` is formed densely. Both
    frames give the same PCA and the same final weight, since for the new position's dense signals ``X``:

        YᵀY = Bᵀ(XᵀX)B, so V (eigenvectors of YᵀY) maps to Q = B·V (eigenvectors of XᵀX, same damping);
        X·Q[:, :d] = Y·V[:, :d]   and   Q[:, :d]ᵀ·W = V[:, :d]ᵀ·(Bᵀ·W);
        the residual x·B[:, :width]ᵀ has coordinates (x·B[:, :width]ᵀ)·B = [x, 0] in B.

    The frame's :meth:`~OutputFrame.pca` must be taken inside the block. On leaving, the saved ``W`` (and bias) is
    rotated once by ``Q[:, :d]`` (one rounding, not two).
    """
    frame = OutputFrame(basis, width, forms_in_input_basis(basis.shape[0], out_linear.in_features, n_tokens, width))
    weight, bias = out_linear.weight, out_linear.bias
    with timings("rotate"):
        if frame.in_residual_basis:
            _rotate_outputs(out_linear, basis)
    try:
        yield frame
    finally:
        out_linear.weight = weight
        if bias is not None:
            out_linear.bias = bias
        out_linear.out_features = weight.shape[0]
    with timings("rotate"):
        if frame.basis is None:
            raise RuntimeError("output_in_basis: the block ended before the new position's PCA was taken")
        _rotate_outputs(out_linear, frame.basis[:, : frame.width])


def _project(x: torch.Tensor, q: torch.Tensor, device: torch.device, keep_on_device: bool = False) -> torch.Tensor:
    """``x · Q`` computed on ``device`` in ``x``'s dtype."""
    home = x.device
    y = x.to(device) @ q.to(device=device, dtype=x.dtype)
    return y if keep_on_device else y.to(home)


def _drain(signals: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Yield the signals in order, taking each out of ``signals`` first, so that a step over per-batch signals
    holds at most its inputs not yet read and its outputs so far."""
    while signals:
        yield signals.pop(0)


# ----------------------------------------------------------------------------------------------------------------
# norm folding


@torch.no_grad()
def fuse_norms(model: nn.Module, adapter: LlamaLikeAdapter | None = None) -> None:
    """Fold each RMSNorm scale into the linears that read its output, and untie the LM head.

    The norms are replaced by :class:`~dynslice.core.layers.RMSN` (no scale). The model computes the same function.
    """
    adapter = adapter or get_adapter(model)
    if getattr(model, "_dynslice_fused", False):
        return
    untie_head(model, adapter)
    for layer in adapter.layers:
        fold_layer_norms(layer, adapter)
    _scale_inputs(adapter.head, adapter.final_norm.weight)
    adapter.final_norm = RMSN(adapter.hidden_size, adapter.rms_eps)
    # nn.Module takes any attribute; torch's stub of its __setattr__ admits only tensors and modules.
    model._dynslice_fused = True  # type: ignore[assignment]


@torch.no_grad()
def fold_layer_norms(layer: nn.Module, adapter: LlamaLikeAdapter) -> None:
    """:func:`fuse_norms` for one decoder layer: scale the linears its two norms feed, then drop the scales."""
    parts = adapter.parts(layer)
    for norm, linears in ((parts.attn_norm, parts.attn_in), (parts.mlp_norm, parts.mlp_in)):
        for lin in linears:
            _scale_inputs(lin, cast(torch.Tensor, norm.weight))  # an RMSNorm's scale
    adapter.replace_norms(layer, lambda: RMSN(adapter.hidden_size, adapter.rms_eps))


@torch.no_grad()
def subtract_embedding_mean(model: nn.Module, adapter: LlamaLikeAdapter | None = None) -> None:
    """Subtract each embedding row's mean over its channels, as SliceGPT's layernorm fusion does (``reference``
    protocol only). The head is untied first, so it keeps the original rows.

    This is exact for LayerNorm models, whose norms subtract the mean anyway; on RMSNorm models (Llama, Mistral,
    Qwen2, Qwen3) it changes the function, which is why dynslice leaves it off by default.
    """
    adapter = adapter or get_adapter(model)
    untie_head(model, adapter)
    w = adapter.embeddings.weight
    w64 = w.data.double()
    w.data.copy_((w64 - w64.mean(dim=-1, keepdim=True)).to(w.dtype))


@torch.no_grad()
def untie_head(model: nn.Module, adapter: LlamaLikeAdapter | None = None) -> None:
    """Give the LM head its own copy of the embedding matrix (a tied head cannot be rotated separately)."""
    (adapter or get_adapter(model)).untie_head()


# ----------------------------------------------------------------------------------------------------------------
# structure: the same shapes whether they are filled by slicing or by loading a saved model


def build_sliced_structure(model: nn.Module, widths: Sequence[int], final_width: int | None = None) -> nn.Module:
    """Turn a (norm-fused or fresh) dense model into an *empty* sliced one with the given widths, in place.

    Used by :func:`dynslice.store.io.load_sliced`: the weights are then loaded from disk. Shapes match
    :func:`slice_model`'s output exactly.
    """
    adapter = get_adapter(model)
    d = adapter.hidden_size
    widths = validate_widths(widths, adapter.num_layers, d)
    final_width = d if final_width is None else check_width("final_width", final_width, d)
    untie_head(model, adapter)
    emb = adapter.embeddings
    kw = {"dtype": emb.weight.dtype, "device": emb.weight.device}
    adapter.embeddings = nn.Embedding(emb.num_embeddings, widths[0], padding_idx=emb.padding_idx, **kw)
    outs = list(widths[1:]) + [final_width]
    for i, layer in enumerate(list(adapter.layers)):
        parts = adapter.parts(layer)
        for lin in parts.attn_in + parts.mlp_in:
            _resize(lin, in_features=widths[i])
        _resize(parts.attn_out, out_features=widths[i])
        _resize(parts.mlp_out, out_features=outs[i])
        adapter.layers[i] = adapter.sliced_layer(layer, widths[i], outs[i], **kw)
    adapter.final_norm = RMSN(d, adapter.rms_eps)
    _resize(adapter.head, in_features=final_width)
    # nn.Module takes any attribute; torch's stub of its __setattr__ admits only tensors and modules.
    model.dynslice_info = SliceInfo(widths, final_width)  # type: ignore[assignment]
    model._dynslice_fused = True  # type: ignore[assignment]
    return model


def _resize(lin: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> None:
    i = lin.in_features if in_features is None else in_features
    o = lin.out_features if out_features is None else out_features
    dtype, device = lin.weight.dtype, lin.weight.device
    lin.weight = nn.Parameter(torch.empty(o, i, dtype=dtype, device=device), requires_grad=False)
    if lin.bias is not None and out_features is not None:
        lin.bias = nn.Parameter(torch.empty(o, dtype=dtype, device=device), requires_grad=False)
    lin.in_features, lin.out_features = i, o


# ----------------------------------------------------------------------------------------------------------------
# weight transforms (computed in fp32, or fp64 for fp64 weights, then cast back)


@torch.no_grad()
def _scale_inputs(linear: nn.Linear, scale: torch.Tensor) -> None:
    # In place, in w's dtype: one rounding of the exact product, as through float64, without a float64 copy of W
    # (for an 8B model's head that copy alone would be 4 GB).
    w = linear.weight
    scale = scale.to(w.device)
    if scale.dtype != w.dtype:
        w.copy_((w.double() * scale.double()).to(w.dtype))
    else:
        w.mul_(scale)


@torch.no_grad()
def _rotate_inputs(linear: nn.Linear, q: torch.Tensor) -> None:
    """``W ← W·Q`` (reads the rotated, sliced stream): ``q`` is (D_old × d), only the kept columns are computed."""
    w = linear.weight
    cdt = _compute_dtype(w.dtype)
    linear.weight = nn.Parameter((w.to(cdt) @ q.to(w.device, cdt)).to(w.dtype), requires_grad=False)
    linear.in_features = q.shape[1]


@torch.no_grad()
def _rotate_outputs(linear: nn.Linear, q: torch.Tensor) -> None:
    """``W ← Qᵀ·W`` and ``b ← Qᵀ·b`` (writes the rotated, sliced stream)."""
    w = linear.weight
    cdt = _compute_dtype(w.dtype)
    q = q.to(w.device, cdt)
    linear.weight = nn.Parameter((q.T @ w.to(cdt)).to(w.dtype), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter((q.T @ linear.bias.to(cdt)).to(w.dtype), requires_grad=False)
    linear.out_features = q.shape[1]


def _set_shortcut(linear: nn.Linear, q_from: torch.Tensor, q_to: torch.Tensor) -> None:
    """The residual path between two positions: ``x_to = x_from · Q_fromᵀ Q_to`` (a Linear stores its transpose)."""
    with torch.no_grad():
        s = q_from.T @ q_to.to(q_from.device)
        linear.weight.copy_(s.T.to(linear.weight.dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rotations of bf16/fp16/fp32 weights are computed in fp32 (exact enough for the stored dtype); fp64 in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Rows of the embedding matrix rotated at a time, so that no full-size fp32/fp64 copy of it is ever made.
EMBEDDING_CHUNK_ROWS = 8192


@torch.no_grad()
def rotate_embedding(weight: torch.Tensor, q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``E·Q`` for a (vocab × D) embedding and a (D × d) basis, computed on ``device`` a block of rows at a time;
    the result stays where ``weight`` is, in its dtype."""
    out = torch.empty(weight.shape[0], q.shape[1], dtype=weight.dtype, device=weight.device)
    cdt = _compute_dtype(weight.dtype)
    qc = q.to(device=device, dtype=cdt)
    for start in range(0, weight.shape[0], EMBEDDING_CHUNK_ROWS):
        block = weight[start : start + EMBEDDING_CHUNK_ROWS].to(device=device, dtype=cdt)
        out[start : start + block.shape[0]] = (block @ qc).to(device=weight.device, dtype=weight.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# PCA


#: Below this size a CPU eigh runs on one thread: LAPACK's many small parallel steps cost far more in
#: synchronisation than they gain (measured: a 576 × 576 eigh is ~25× slower on two busy cores than on one).
SERIAL_EIGH_MAX = 2048


def pca_basis(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Eigenvectors of a float64 Gram matrix as columns, by decreasing eigenvalue, after damping the diagonal by
    ``damping`` × its mean (SliceGPT's regularisation)."""
    h = gram.double().clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    if h.device.type == "cpu" and h.shape[0] <= SERIAL_EIGH_MAX:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            eigval, eigvec = torch.linalg.eigh(h)
        finally:
            torch.set_num_threads(threads)
    else:
        eigval, eigvec = torch.linalg.eigh(h)
    order = torch.argsort(eigval, descending=True)
    return eigvec[:, order]


def _pca(signals: list[torch.Tensor], masks: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Float64 PCA basis of the non-pad tokens of a list of (batch × seq × D) signals.

    On the GPU the Triton kernel sums fp32 tiles into float64; on the CPU the same is done with fp32 chunked
    matmuls (:func:`~dynslice.core.kernels.masked_gram_fp32`), several times faster than float64 products.
    """
    d = signals[0].shape[-1]
    h = torch.zeros(d, d, dtype=torch.float64, device=device)
    for x, m in zip(signals, masks):
        x, m = x.to(device), m.to(device)
        if device.type == "cpu":
            masked_gram_fp32(x, m, out=h)
        else:
            masked_gram(x, m, out=h)
    return pca_basis(h)


# ----------------------------------------------------------------------------------------------------------------
# calibration signals


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for decoder layer ``idx`` during capture: records its keyword arguments and passes input through.

    Tensors shared by many layers (the causal mask, the rotary tables) are stored once per batch via ``memo``.
    """

    def __init__(self, idx: int, xs: list, kwargs_store: list, memo: dict) -> None:
        super().__init__()
        self.idx, self.xs, self.kwargs_store, self.memo = idx, xs, kwargs_store, memo

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise RuntimeError("dynslice expects decoder layers to be called with keyword arguments")
        kept = {}
        for k, v in kwargs.items():
            if k in ("cache", "past_key_values", "use_cache", "output_attentions"):
                continue
            if isinstance(v, torch.Tensor | tuple):
                key = (k, id(v))
                if key not in self.memo:
                    self.memo[key] = _to(v, torch.device("cpu"))
                v = self.memo[key]
            kept[k] = v
        if self.idx == 0:
            self.xs.append(hidden_states.detach().to("cpu"))
        self.kwargs_store.append(kept)
        return hidden_states


@dataclass
class CapturedInputs:
    """Calibration state on the CPU: per batch, the residual signal, the pad mask and each layer's kwargs."""

    x: list[torch.Tensor]
    masks: list[torch.Tensor]
    layer_kwargs: list[list[dict]]  # [layer][batch]

    def for_layer(self, i: int) -> LayerCalibration:
        """What decoder layer ``i``'s forward needs besides its input signals."""
        return LayerCalibration(self.layer_kwargs[i], self.masks)


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    calibration: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    adapter: LlamaLikeAdapter | None = None,
) -> CapturedInputs:
    """Embed the calibration batches and record the arguments every decoder layer receives.

    The decoder layers are swapped for pass-through recorders, so this costs the embedding lookup and the mask and
    rotary computations only.
    """
    adapter = adapter or get_adapter(model)
    ids, mask = _check_calibration(calibration)
    layers = list(adapter.layers)
    xs: list[torch.Tensor] = []
    per_layer: list[list[dict]] = [[] for _ in layers]
    masks: list[torch.Tensor] = []
    base_device = adapter.embeddings.weight.device
    memo: dict = {}
    try:
        for i in range(len(layers)):
            adapter.layers[i] = _Recorder(i, xs, per_layer[i], memo)
        for start in range(0, ids.shape[0], batch_size):
            b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
            memo.clear()
            adapter.run_decoder(b_ids.to(base_device), b_mask.to(base_device))
            masks.append(b_mask.bool())
    finally:
        for i, layer in enumerate(layers):
            adapter.layers[i] = layer
    return CapturedInputs(xs, masks, per_layer)


def _check_calibration(calibration: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(calibration, dict) or "input_ids" not in calibration:
        raise ValueError("calibration: expected a dict with 'input_ids' (n × seqlen) and optionally 'attention_mask'")
    ids = calibration["input_ids"]
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"calibration: input_ids must be (n × seqlen) with n, seqlen >= 1, got {tuple(ids.shape)}")
    mask = calibration.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if mask.shape != ids.shape:
        raise ValueError(f"calibration: attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
    if int(mask.sum()) == 0:
        raise ValueError("calibration: every token is masked out; nothing to compute a PCA from")
    return ids, mask
