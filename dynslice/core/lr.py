"""The Layer Redundancy (LR) score.

For decoder layer ``i``, LR_i is the mean over non-pad tokens of ``cos(h_in, h_out)``, where ``h_in`` and ``h_out``
are the residual stream just before and just after the layer. A layer that barely turns the residual stream is
redundant, so a high LR means the layer can be sliced more.

Choice documented here: by default (``last_layer="raw"``) ``h_out`` of the last layer is the raw residual stream
leaving it, *before* the model's final norm. The final norm rescales every token (and, before folding, reweights
channels), so taking its output would measure the norm, not the layer. ``last_layer="final_norm"`` compares the
last layer's input with the final norm's output instead, as the authors' code does (it reads HF ``hidden_states``,
whose last entry is taken after the final norm); it is part of the ``reference`` protocol.

Arithmetic (``precision``): ``fp32`` upcasts both hidden states and takes the cosine in fp32, clamped to
[-1, 1]. ``authors_fp16`` reproduces the authors' arithmetic (RazvanDu/DynamicSlicing ``metrics_BI.py:13-26``,
summed by ``short_hf.py:84-88``), part of the ``reference`` protocol: in fp16 with no upcast, the cosine is the
dot product over the product of the two norms; a product of norms above 65504 overflows to ``inf``, so the token's
cosine becomes 0 (a finite dot product) or ``NaN`` (an overflowed one), and ``NaN`` is replaced by 0.5 (``inf``
by fp16's largest value, as ``torch.nan_to_num`` does). Each window's sum of the per-token score is an fp16 number
too. :func:`authors_fp16_cosine` states the rule.

Options: ShortGPT's Block Influence (``bi = 1 - cos``) and the angular distance (``arccos(cos) / π``), averaged per
token like the cosine. The ``normalized`` vector is always min-max normalised *redundancy* in [0, 1] (high =
redundant): the cosine itself, or the negated distance for ``bi`` and ``angular``, as
:func:`dynslice.core.allocate.redundancy_scores` (the one orientation function) gives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dynslice.core.adapters import get_adapter
from dynslice.core.allocate import redundancy_scores

METRICS = ("cosine", "bi", "angular")
LAST_LAYER = ("raw", "final_norm")
#: How the per-token cosine is computed: in fp32, or with the authors' fp16 arithmetic (see the module docstring).
PRECISIONS = ("fp32", "authors_fp16")


@dataclass(frozen=True)
class LRScore:
    """Per-layer redundancy of one model on one corpus."""

    metric: str
    raw: tuple[float, ...]
    normalized: tuple[float, ...]
    tokens: int

    def to_json(self) -> dict:
        return {"metric": self.metric, "lr": list(self.raw), "normalized": list(self.normalized), "tokens": self.tokens}


def _token_metric(h_in: torch.Tensor, h_out: torch.Tensor, metric: str) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-8).clamp(-1.0, 1.0)
    if metric == "cosine":
        return cos
    if metric == "bi":
        return 1.0 - cos
    return torch.arccos(cos) / math.pi


def authors_fp16_cosine(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token cosine as the authors' ``block_influence`` computes it in fp16 (``metrics_BI.py:17-21``).

    Both states are rounded to fp16 (their model's dtype). Each reduction (the two norms and the dot product, the
    diagonal of their ``h_in @ h_out.T``) accumulates in fp32 and rounds its result to fp16, as torch's fp16
    norm and matmul do; the product of the norms and the quotient are fp16 operations, so a product above 65504
    is ``inf``. ``NaN`` becomes 0.5 and ``±inf`` fp16's largest finite value (``nan_to_num(nan=0.5)``). No clamp.
    Returns fp16 values of shape ``h_in.shape[:-1]``.
    """
    a = h_in.to(torch.float16).float()
    b = h_out.to(torch.float16).float()
    norm_in = a.norm(dim=-1).to(torch.float16)
    norm_out = b.norm(dim=-1).to(torch.float16)
    dot = (a * b).sum(dim=-1).to(torch.float16)
    return (dot / (norm_in * norm_out)).nan_to_num(nan=0.5)


def _authors_token_score(h_in: torch.Tensor, h_out: torch.Tensor, metric: str) -> torch.Tensor:
    """What the authors sum per token, in fp16: ``1 - cos`` for ``cosine`` and ``bi`` (``metrics_BI.py:26``),
    ``arccos(cos) / π`` for ``angular`` (``metrics_BI.py:23-24``)."""
    sim = authors_fp16_cosine(h_in, h_out)
    if metric == "angular":
        return torch.arccos(sim.float()).to(torch.float16) / math.pi
    return 1 - sim


@torch.no_grad()
def layer_redundancy(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    metric: str = "cosine",
    batch_size: int = 8,
    progress: bool = True,
    last_layer: str = "raw",
    precision: str = "fp32",
) -> LRScore:
    """LR score of every decoder layer of a dense model over the non-pad tokens of ``batch``.

    Args:
        model: a dense causal LM of a supported architecture.
        batch: ``{"input_ids": (n × seqlen), "attention_mask": (n × seqlen)}``.
        metric: ``cosine`` (the paper's LR), ``bi`` (ShortGPT, 1 - cos) or ``angular`` (arccos(cos)/π).
        batch_size: sequences per forward.
        last_layer: ``raw`` (the last layer's own output) or ``final_norm`` (its output after the model's final
            norm, as HF ``hidden_states[-1]`` gives it).
        precision: ``fp32``, or ``authors_fp16`` (the authors' fp16 arithmetic and NaN rule, each row's sum
            rounded to fp16 as their per-window sum is; the raw score is then ``1 -`` the mean of their summed
            ``1 - cos`` for ``cosine``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if last_layer not in LAST_LAYER:
        raise ValueError(f"last_layer: {last_layer!r} is not one of {', '.join(LAST_LAYER)}")
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} must be an integer >= 1")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise ValueError(
            f"batch: input_ids must be (n × seqlen) with a matching attention_mask, got "
            f"{tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    adapter = get_adapter(model)
    device = adapter.embeddings.weight.device
    n_layers = adapter.num_layers
    final_norm = adapter.final_norm
    sums = torch.zeros(n_layers, dtype=torch.float64)
    state: dict = {}

    def pre_hook(idx):
        def hook(_module, args, kwargs):
            state[idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post_hook(idx):
        def hook(_module, _args, _kwargs, output):
            h_out = output[0] if isinstance(output, tuple) else output
            if last_layer == "final_norm" and idx == n_layers - 1:
                h_out = final_norm(h_out)
            if precision == "fp32":
                per_token = _token_metric(state.pop(idx), h_out, metric)
                sums[idx] += (per_token.double() * state["mask"]).sum().cpu()
            else:  # one fp16 sum per row, as the authors' `.sum()` of one window (short_hf.py:84-88)
                per_token = _authors_token_score(state.pop(idx), h_out, metric)
                rows = (per_token.float() * state["mask"].float()).sum(dim=-1).to(torch.float16)
                sums[idx] += rows.double().sum().cpu()

        return hook

    handles = []
    for i, layer in enumerate(adapter.layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    count = 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, ids.shape[0], batch_size), desc=f"LR ({metric})", disable=not progress):
            b_ids = ids[start : start + batch_size].to(device)
            b_mask = mask[start : start + batch_size].to(device)
            state["mask"] = b_mask.double()
            adapter.run_decoder(b_ids, b_mask)
            count += int(b_mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("batch: every token is masked out")
    mean = sums / count
    raw = (1 - mean if precision == "authors_fp16" and metric == "cosine" else mean).tolist()
    if any(not math.isfinite(v) for v in raw):
        raise RuntimeError(f"LR score is not finite ({precision} arithmetic): {raw}")
    return LRScore(metric, tuple(raw), tuple(redundancy_scores(raw, metric).tolist()), count)
