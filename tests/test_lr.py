"""The Layer Redundancy score against a direct computation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.core.allocate import normalize_lr
from dynslice.core.lr import layer_redundancy


def _direct(model, batch):
    """cos(h_in, h_out) per layer, computed by running the decoder layers one by one by hand."""
    inner = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    captured = []
    h = inner.embed_tokens(ids)
    # collect each layer's input and output with a plain forward over output_hidden_states + last layer by hand
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = list(out.hidden_states[:-1])  # inputs of every layer (the last entry is after the final norm)
    last_in = hs[-1]
    handle = inner.layers[-1].register_forward_hook(
        lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    model(input_ids=ids, attention_mask=mask)
    handle.remove()
    hs.append(captured[0])
    assert torch.equal(hs[0], h)
    m = mask.bool()
    cos = [
        torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)[m].double().mean().item()
        for i in range(len(hs) - 1)
    ]
    assert torch.equal(hs[-2], last_in)
    return cos


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_lr_matches_direct_computation(tiny_arch, batch_size):
    model = make_tiny_model(tiny_arch, layers=4)
    batch = make_batch(padded=True, n=6)
    score = layer_redundancy(model, batch, batch_size=batch_size, progress=False)
    ref = _direct(model, batch)
    assert score.tokens == int(batch["attention_mask"].sum())
    assert max(abs(a - b) for a, b in zip(score.raw, ref)) < 1e-5
    assert score.normalized == pytest.approx(normalize_lr(ref).tolist(), abs=1e-4)
    assert min(score.normalized) == 0.0 and max(score.normalized) == 1.0


def test_bi_and_angular_are_consistent():
    model = make_tiny_model("llama", layers=4)
    batch = make_batch()
    cos = layer_redundancy(model, batch, progress=False)
    bi = layer_redundancy(model, batch, metric="bi", progress=False)
    ang = layer_redundancy(model, batch, metric="angular", progress=False)
    # Each token's 1 - cos is rounded to fp32 before the fp64 sums: at most half an ulp of |1 - cos| <= 2, i.e.
    # eps32 / 2 * 2 per token, and so at most that on the mean; summing `tokens` terms of magnitude <= 2 in fp64
    # adds at most tokens * eps64 * 2. (1e-9 failed by 1.45e-9 on transformers 5.x: not a bug, fp32 rounding.)
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    tol = eps32 + 2 * bi.tokens * eps64
    assert [1 - c for c in cos.raw] == pytest.approx(list(bi.raw), abs=tol)
    # BI is an affine flip of the cosine; min-max normalising (x - min) / (max - min), with value, minimum and maximum
    # each off by <= tol, moves a normalised score by at most 2 tol / range + 2 tol / range
    spread = max(cos.raw) - min(cos.raw)
    assert bi.normalized == pytest.approx(cos.normalized, abs=4 * tol / spread)
    assert all(0 <= a <= 1 for a in ang.raw)
    # angular redundancy ranks layers like the cosine (arccos is monotone, per token but not on the mean,
    # so only the extremes are compared)
    assert ang.normalized.index(1.0) == cos.normalized.index(1.0)


def test_pad_tokens_are_ignored():
    model = make_tiny_model("llama")
    batch = make_batch(padded=True)
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][other["attention_mask"] == 0] = 5
    a = layer_redundancy(model, batch, progress=False)
    b = layer_redundancy(model, other, progress=False)
    assert a.raw == pytest.approx(b.raw, abs=1e-6)


def test_bad_arguments():
    model = make_tiny_model("llama")
    batch = make_batch()
    with pytest.raises(ValueError, match="metric"):
        layer_redundancy(model, batch, metric="euclid", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        layer_redundancy(model, batch, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="masked out"):
        layer_redundancy(
            model,
            {"input_ids": batch["input_ids"], "attention_mask": torch.zeros_like(batch["input_ids"])},
            progress=False,
        )
