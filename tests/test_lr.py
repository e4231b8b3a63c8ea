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
    with pytest.raises(ValueError, match="precision"):
        layer_redundancy(model, batch, precision="fp8", progress=False)
    with pytest.raises(ValueError, match="masked out"):
        layer_redundancy(
            model,
            {"input_ids": batch["input_ids"], "attention_mask": torch.zeros_like(batch["input_ids"])},
            progress=False,
        )


# ------------------------------------------------------------------------------- the authors' fp16 arithmetic
def _loud_model():
    """A tiny Llama whose embedding rows are scaled by 1 to ~3000, so that the residual stream's norms span
    ~1 to ~10^4: products of norms overflow fp16 (> 65504) on some tokens and not on others."""
    model = make_tiny_model("llama", layers=4)
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        emb.mul_(torch.logspace(0, 3.5, emb.shape[0]).unsqueeze(1) / emb.norm(dim=1, keepdim=True))
    return model


def _their_formula(model, batch):
    """The authors' LR, written independently of dynslice: HF hidden states (the last after the final norm) in
    fp16, and per window (one row, its real tokens) and layer their `block_influence` (metrics_BI.py:13-26)
    summed in fp16 (short_hf.py:84-88). Returns (1 - mean of the summed BI per layer, tokens whose cosine was NaN)."""
    out = model(**batch, output_hidden_states=True)
    hs = [h.half() for h in out.hidden_states]
    sums, nans = [0.0] * (len(hs) - 1), 0
    for row, mask in enumerate(batch["attention_mask"].bool()):
        for i in range(len(hs) - 1):
            x, y = hs[i][row][mask], hs[i + 1][row][mask]
            sim = ((x @ y.T) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True))).diagonal()
            nans += int(sim.isnan().sum())
            sums[i] += (1 - sim.nan_to_num(nan=0.5)).sum().item()
    count = int(batch["attention_mask"].sum())
    return [1 - s / count for s in sums], nans


def test_authors_fp16_arithmetic_matches_their_formula():
    model = _loud_model()
    batch = make_batch(padded=True, n=6, seqlen=32)
    ours = layer_redundancy(model, batch, last_layer="final_norm", precision="authors_fp16", progress=False)
    theirs, nans = _their_formula(model, batch)
    assert nans > 0  # the overflow and the NaN rule are exercised
    # fp16 reductions may round the last bit differently (CPU fp16 matmul vs fp32-accumulated sums): one fp16 ulp
    # of a dot product or norm moves a token's cosine by ~1e-3, and a window's fp16 sum by one ulp of <= 64
    assert ours.raw == pytest.approx(theirs, abs=2e-3)
    fp32 = layer_redundancy(model, batch, last_layer="final_norm", progress=False)
    assert max(abs(a - b) for a, b in zip(ours.raw, fp32.raw)) > 0.05  # the overflow changes the score


def test_authors_fp16_cosine_rule():
    """Their rule on hand-made tokens: an overflowing product of norms gives 0 (finite dot product) or NaN -> 0.5
    (overflowing dot product); small vectors keep their cosine to fp16 precision."""
    from dynslice.core.lr import authors_fp16_cosine

    a = torch.tensor([[300.0, 0.0], [300.0, 0.0], [3.0, 4.0], [-300.0, 0.0]])
    b = torch.tensor([[0.0, 300.0], [300.0, 1.0], [4.0, 3.0], [300.0, 0.0]])
    sim = authors_fp16_cosine(a, b)
    assert sim.dtype == torch.float16
    assert sim.tolist() == [0.0, 0.5, pytest.approx(24 / 25, abs=1e-3), 0.5]


def test_fp32_precision_is_the_previous_arithmetic_bit_for_bit():
    """``precision="fp32"`` (the default) is the fp32 cosine clamped to [-1, 1], masked and summed in fp64: the
    same bits as that rule written out over HF hidden states (one batch, so one summation order)."""
    model = _loud_model()
    batch = make_batch(padded=True, n=6, seqlen=32)
    got = layer_redundancy(model, batch, batch_size=6, last_layer="final_norm", precision="fp32", progress=False)
    assert got == layer_redundancy(model, batch, batch_size=6, last_layer="final_norm", progress=False)
    hs = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].double()
    expected = []
    for i in range(len(hs) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1, eps=1e-8)
        expected.append(((cos.clamp(-1.0, 1.0).double() * mask).sum() / mask.sum()).item())
    assert list(got.raw) == expected
