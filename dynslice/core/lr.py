"""The Layer Redundancy (LR) score.

For decoder layer ``i``, LR_i is the mean over non-pad tokens of ``cos(h_in, h_out)``, where ``h_in`` and ``h_out``
are the residual stream just before and just after the layer. A layer that barely turns the residual stream is
redundant, so a high LR means the layer can be sliced more.

Choice documented here: by default (``last_layer="raw"``) ``h_out`` of the last layer is the raw residual stream
leaving it, *before* the model's final norm. The final norm rescales every token (and, before folding, reweights
channels), so taking its output would measure the norm, not the layer. ``last_layer="final_norm"`` compares the
last layer's input with the final norm's output instead, as the authors' code does (it reads HF ``hidden_states``,
whose last entry is taken after the final norm); it is part of the ``reference`` protocol.

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


@torch.no_grad()
def layer_redundancy(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    metric: str = "cosine",
    batch_size: int = 8,
    progress: bool = True,
    last_layer: str = "raw",
) -> LRScore:
    """LR score of every decoder layer of a dense model over the non-pad tokens of ``batch``.

    Args:
        model: a dense causal LM of a supported architecture.
        batch: ``{"input_ids": (n × seqlen), "attention_mask": (n × seqlen)}``.
        metric: ``cosine`` (the paper's LR), ``bi`` (ShortGPT, 1 - cos) or ``angular`` (arccos(cos)/π).
        batch_size: sequences per forward.
        last_layer: ``raw`` (the last layer's own output) or ``final_norm`` (its output after the model's final
            norm, as HF ``hidden_states[-1]`` gives it).
    """
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
            per_token = _token_metric(state.pop(idx), h_out, metric)
            sums[idx] += (per_token.double() * state["mask"]).sum().cpu()

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
    raw = (sums / count).tolist()
    if any(not math.isfinite(v) for v in raw):
        raise RuntimeError(f"LR score is not finite: {raw}")
    return LRScore(metric, tuple(raw), tuple(redundancy_scores(raw, metric).tolist()), count)
