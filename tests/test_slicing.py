"""The slicing engine against the dense model, and against a naive SliceGPT written independently here."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.core.layers import RMSN, SlicedDecoderLayer
from dynslice.core.params import validate_widths
from dynslice.core.slicing import fuse_norms, pca_basis, slice_model


def _rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float(((out - ref)[m].abs().max() / ref[m].abs().max()).detach())


@pytest.mark.parametrize("tied", [True, False])
def test_rotation_without_slicing_is_exact(tiny_arch, tied):
    """Fold + rotate with full widths: logits equal the dense model's (fp32, ≤ 1e-4 × max |logit|), with padding."""
    model = make_tiny_model(tiny_arch, tied=tied)
    batch = make_batch(padded=True)
    ref = model(**batch).logits
    sliced = slice_model(copy.deepcopy(model), batch, [48, 48, 48], progress=False)
    # the rotations are real, not identities
    q_emb = sliced.model.embed_tokens.weight
    assert not torch.allclose(q_emb, model.model.embed_tokens.weight, atol=1e-3)
    assert _rel_err(sliced(**batch).logits, ref, batch["attention_mask"]) <= 1e-4


def test_fuse_norms_is_exact(tiny_arch):
    model = make_tiny_model(tiny_arch)
    batch = make_batch()
    ref = model(**batch).logits
    fused = copy.deepcopy(model)
    fuse_norms(fused)
    assert isinstance(fused.model.norm, RMSN)
    assert fused.lm_head.weight.data_ptr() != fused.model.embed_tokens.weight.data_ptr()
    assert _rel_err(fused(**batch).logits, ref, batch["attention_mask"]) <= 1e-5


def test_shapes_match_widths(tiny_arch):
    model = make_tiny_model(tiny_arch, layers=3)
    widths = [40, 24, 32]
    sliced = slice_model(model, make_batch(), widths, progress=False)
    assert sliced.model.embed_tokens.weight.shape == (96, 40)
    outs = widths[1:] + [48]
    for i, layer in enumerate(sliced.model.layers):
        assert isinstance(layer, SlicedDecoderLayer)
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
            assert lin.weight.shape[1] == widths[i] == lin.in_features
        assert att.o_proj.weight.shape[0] == widths[i]
        assert mlp.down_proj.weight.shape[0] == outs[i]
        assert layer.attn_shortcut.weight.shape == (widths[i], widths[i])
        assert layer.mlp_shortcut.weight.shape == (outs[i], widths[i])
    assert sliced.lm_head.weight.shape == (96, 48)
    assert sliced.dynslice_info.widths == tuple(widths)


# ------------------------------------------------------------------------------------------------ naive SliceGPT
def _naive_slicegpt(model, batch, widths, final_width=None):
    """Plain SliceGPT the slow way, as the reference code does it: every signal is recomputed from the token ids
    through the sliced layers built so far, and each attention block runs twice (before and after its output
    rotation) instead of projecting cached signals."""
    from dynslice.core.adapters import get_adapter
    from dynslice.core.slicing import _rotate_inputs, _rotate_outputs, _set_shortcut, capture_inputs

    model = copy.deepcopy(model)
    fuse_norms(model)
    ad = get_adapter(model)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    d, n_layers = ad.hidden_size, ad.num_layers
    sig = capture_inputs(model, batch, batch_size=ids.shape[0], device=torch.device("cpu"))
    kw = [sig.layer_kwargs[i][0] for i in range(n_layers)]

    def pca(t, k):
        x = t[mask].double()
        return pca_basis(x.T @ x)[:, :k]

    q_prev = pca(sig.x[0], widths[0])
    emb_w = (ad.embeddings.weight.double() @ q_prev).float()
    done = []

    def stream(i):
        h = torch.nn.functional.embedding(ids, emb_w)
        for j in range(i):
            h = done[j](h, **kw[j])
        return h

    final_width = d if final_width is None else final_width
    outs = list(widths[1:]) + [final_width]
    for i in range(n_layers):
        layer = ad.layers[i]
        p = ad.parts(layer)
        for lin in p.attn_in:
            _rotate_inputs(lin, q_prev)
        h = stream(i)
        mid = h @ q_prev.T.float() + layer.self_attn(p.attn_norm(h), **kw[i])[0]
        q_mid = pca(mid, widths[i])
        _rotate_outputs(p.attn_out, q_mid)
        for lin in p.mlp_in:
            _rotate_inputs(lin, q_mid)
        h = stream(i)
        m = h @ (q_prev.T @ q_mid).float() + layer.self_attn(p.attn_norm(h), **kw[i])[0]
        out = m @ q_mid.T.float() + layer.mlp(p.mlp_norm(m))
        q_next = torch.eye(d, dtype=torch.float64) if outs[i] == d and i == n_layers - 1 else pca(out, outs[i])
        _rotate_outputs(p.mlp_out, q_next)
        new = ad.sliced_layer(layer, widths[i], outs[i])
        _set_shortcut(new.attn_shortcut, q_prev, q_mid)
        _set_shortcut(new.mlp_shortcut, q_mid, q_next)
        done.append(new)
        ad.layers[i] = new
        q_prev = q_next
    if final_width < d:
        _rotate_inputs(model.lm_head, q_prev)
    model.model.embed_tokens = torch.nn.Embedding.from_pretrained(emb_w)
    return model


@pytest.mark.parametrize("widths", [[40, 40, 40], [40, 24, 32]])
def test_engine_matches_naive_slicegpt(widths):
    """The one-pass engine (signals reused, projected instead of recomputed) equals a slow re-run-everything
    SliceGPT: constant widths reproduce plain SliceGPT, and per-layer widths follow the same sequential rule."""
    model = make_tiny_model("llama")
    batch = make_batch(padded=True)
    fast = slice_model(copy.deepcopy(model), batch, widths, progress=False)
    slow = _naive_slicegpt(model, batch, widths)
    out_fast, out_slow = fast(**batch).logits, slow(**batch).logits
    assert _rel_err(out_fast, out_slow, batch["attention_mask"]) <= 1e-3
    dense = model(**batch).logits
    assert _rel_err(out_fast, dense, batch["attention_mask"]) > 1e-3  # it did slice something


def test_pad_tokens_do_not_change_the_pca():
    """Changing what sits under the padding must not change the sliced model."""
    model = make_tiny_model("llama")
    batch = make_batch(padded=True)
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][other["attention_mask"] == 0] = 7
    a = slice_model(copy.deepcopy(model), batch, [32, 32, 32], progress=False)
    b = slice_model(copy.deepcopy(model), other, [32, 32, 32], progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_sliced_model_kv_cache_and_generate():
    model = make_tiny_model("llama")
    batch = make_batch(padded=False, n=2, seqlen=12)
    sliced = slice_model(model, make_batch(), [40, 32, 24], progress=False)
    ids = batch["input_ids"]
    full = sliced(input_ids=ids).logits
    # incremental decoding with the KV cache gives the same logits as the full forward
    out = sliced(input_ids=ids[:, :8], use_cache=True)
    cache = out.past_key_values
    steps = [out.logits]
    for t in range(8, 12):
        out = sliced(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
    gen = sliced.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    gen_nocache = sliced.generate(ids[:, :4], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert gen.shape == (2, 10) and torch.equal(gen, gen_nocache)


def test_padded_batch_inference_matches_unpadded():
    model = make_tiny_model("llama")
    sliced = slice_model(model, make_batch(), [40, 32, 24], progress=False)
    ids = torch.randint(3, 96, (1, 10))
    alone = sliced(input_ids=ids).logits
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1).long()
    both = sliced(
        input_ids=torch.cat([padded, torch.randint(3, 96, (1, 15))]),
        attention_mask=torch.cat([mask, torch.ones(1, 15, dtype=torch.long)]),
    ).logits
    assert torch.allclose(both[0, :10], alone[0], atol=1e-4)


@pytest.mark.parametrize(
    "widths, msg",
    [
        ([48, 48], "expected one width per decoder layer"),
        ([48, 0, 48], r"widths\[1\]: 0 is outside"),
        ([48, 49, 48], r"widths\[1\]: 49 is outside"),
        ([48, 40.5, 48], r"widths\[1\]: 40.5 is not an integer"),
        ("48", "expected a sequence"),
    ],
)
def test_bad_widths(widths, msg):
    with pytest.raises(ValueError, match=msg):
        validate_widths(widths, 3, 48)
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match=msg):
        slice_model(model, make_batch(), widths, progress=False)


def test_bad_calibration():
    model = make_tiny_model("llama")
    batch = make_batch()
    with pytest.raises(ValueError, match="calibration"):
        slice_model(model, {"ids": batch["input_ids"]}, [48] * 3, progress=False)
    with pytest.raises(ValueError, match="every token is masked"):
        slice_model(
            model,
            {"input_ids": batch["input_ids"], "attention_mask": torch.zeros_like(batch["input_ids"])},
            [48] * 3,
            progress=False,
        )


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    from dynslice.core.adapters import get_adapter

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        get_adapter(model)


def test_hflm_accepts_sliced_model(smol_tokenizer):
    """lm-eval's HFLM wraps a sliced model object and scores loglikelihoods with it."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = make_tiny_model("llama", vocab=len(smol_tokenizer), hidden=48, layers=2)
    ids = torch.randint(3, 1000, (4, 16))
    sliced = slice_model(model, {"input_ids": ids}, [32, 24], progress=False)
    lm = HFLM(pretrained=sliced, tokenizer=smol_tokenizer, batch_size=2, max_length=64)
    reqs = [
        Instance("loglikelihood", {}, ("The cat sat on the", " mat"), 0),
        Instance("loglikelihood", {}, ("The cat sat on the", " moon"), 1),
    ]
    out = lm.loglikelihood(reqs)
    assert len(out) == 2 and all(torch.isfinite(torch.tensor(o[0])) for o in out)
    # the same number by hand
    ctx = smol_tokenizer("The cat sat on the", add_special_tokens=False).input_ids
    cont = smol_tokenizer("The cat sat on the mat", add_special_tokens=False).input_ids[len(ctx) :]
    full = torch.tensor([ctx + cont])
    logp = torch.log_softmax(sliced(input_ids=full).logits[0, :-1].float(), -1)
    by_hand = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert abs(by_hand - out[0][0]) < 1e-3


@pytest.mark.parametrize("n_seqs", [6, 24])
def test_both_signal_coordinate_paths_match_naive_slicegpt(tiny_arch, n_seqs):
    """Few calibration tokens: each sublayer's output signal is formed in the dense basis (the residual lifted
    back); many: in the previous position's full basis (the output linear rotated into it). Both paths are taken,
    rotation alone stays exact on either, and slicing equals the naive SliceGPT on either."""
    from dynslice.core.adapters import get_adapter
    from dynslice.core.slicing import forms_in_input_basis

    model = make_tiny_model(tiny_arch)
    batch = make_batch(n=n_seqs, seqlen=24, padded=True)
    p = get_adapter(model).parts(get_adapter(model).layers[0])
    for width in (48, 32):
        chosen = [
            forms_in_input_basis(48, lin.in_features, batch["input_ids"].numel(), width)
            for lin in (p.attn_out, p.mlp_out)
        ]
        assert chosen == [n_seqs == 24] * 2, (width, chosen)

    ref = model(**batch).logits
    rotated = slice_model(copy.deepcopy(model), batch, [48, 48, 48], progress=False)
    assert _rel_err(rotated(**batch).logits, ref, batch["attention_mask"]) <= 1e-4

    widths = [40, 32, 36]
    fast = slice_model(copy.deepcopy(model), batch, widths, progress=False)
    slow = _naive_slicegpt(model, batch, widths)
    assert _rel_err(fast(**batch).logits, slow(**batch).logits, batch["attention_mask"]) <= 1e-4
    assert _rel_err(fast(**batch).logits, ref, batch["attention_mask"]) > 1e-3


@pytest.mark.parametrize("n_seqs", [6, 24])
def test_sliced_head_matches_naive_slicegpt(n_seqs):
    """A sliced last position (final_width < D): the head is rotated by the basis composed across the coordinate
    changes, and the model equals the naive SliceGPT's on both signal paths."""
    model = make_tiny_model("llama", tied=False)
    batch = make_batch(n=n_seqs, seqlen=24, padded=True)
    widths = [40, 32, 36]
    fast = slice_model(copy.deepcopy(model), batch, widths, final_width=40, progress=False)
    slow = _naive_slicegpt(model, batch, widths, final_width=40)
    assert fast.lm_head.weight.shape == slow.lm_head.weight.shape == (96, 40)
    assert _rel_err(fast(**batch).logits, slow(**batch).logits, batch["attention_mask"]) <= 1e-4


def test_output_in_basis_gives_the_same_position_in_both_frames():
    """A sublayer's output position formed in the residual's full basis B or in the dense basis: the same PCA
    basis, the same rotated signals and the same final output weight (up to each direction's sign), and the
    output linear is left writing the kept columns."""
    from dynslice.core.slicing import Timings, output_in_basis

    torch.manual_seed(0)
    hidden, inner, width, kept, tokens = 16, 24, 10, 8, 64
    basis = torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64))[0]
    linear = torch.nn.Linear(inner, hidden, dtype=torch.float64)
    h = torch.randn(2, tokens // 2, inner, dtype=torch.float64)
    x = torch.randn(2, tokens // 2, width, dtype=torch.float64)  # the residual, rotated and sliced
    mask = torch.ones(2, tokens // 2, dtype=torch.bool)
    dense = x @ basis[:, :width].T + linear(h)  # the new position's dense signals, formed by hand

    got = {}
    for n_tokens in (1, 10**6):  # few tokens: the dense frame; many: B's
        lin = copy.deepcopy(linear)
        with output_in_basis(lin, basis, width, n_tokens, Timings()) as frame:
            signals = frame.add_residual(lin(h), x.clone())
            q, keep = frame.pca([signals], [mask], torch.device("cpu"), kept)
        got[frame.in_residual_basis] = (q, signals @ keep, lin.weight.detach(), lin.bias.detach())
    assert set(got) == {False, True}

    (q0, s0, w0, b0), (q1, s1, w1, b1) = got[False], got[True]
    sign = torch.sign((q0 * q1).sum(0))  # eigenvectors are defined up to sign
    torch.testing.assert_close(q1 * sign, q0, rtol=0, atol=1e-9)
    torch.testing.assert_close(s0, dense @ q0[:, :kept], rtol=0, atol=1e-9)
    torch.testing.assert_close(s1 * sign[:kept], s0, rtol=0, atol=1e-9)
    assert w0.shape == w1.shape == (kept, inner) and b0.shape == (kept,)
    torch.testing.assert_close(w0, q0[:, :kept].T @ linear.weight.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(w1 * sign[:kept, None], w0, rtol=0, atol=1e-9)
    torch.testing.assert_close(b1 * sign[:kept], b0, rtol=0, atol=1e-9)
