"""Parameter accounting checked against real (tiny) transformers models, dense and sliced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.core.params import (
    ArchDims,
    ParamCount,
    dense_params,
    sliced_params,
    sliced_params_continuous,
    validate_widths,
)
from dynslice.core.slicing import build_sliced_structure, slice_model


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def llama_with_biases(tied: bool = False):
    """A tiny Llama with attention_bias (q, k, v and o) and mlp_bias, which make_tiny_model does not cover."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=80,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("tied", [True, False])
def test_dense_count_matches_real_models(tiny_arch: str, tied: bool) -> None:
    model = make_tiny_model(tiny_arch, tied=tied)
    dims = ArchDims.from_config(model.config)
    assert dims.tied is tied
    assert dims.qkv_bias is (tiny_arch == "qwen2")
    assert dense_params(dims) == numel(model)


@pytest.mark.parametrize("tied", [True, False])
def test_dense_count_with_all_llama_biases(tied: bool) -> None:
    model = llama_with_biases(tied)
    dims = ArchDims.from_config(model.config)
    assert (dims.qkv_bias, dims.o_bias, dims.mlp_bias) == (True, True, True)
    assert dense_params(dims) == numel(model)


def test_from_config_reads_dims() -> None:
    dims = ArchDims.from_config(make_tiny_model("qwen2", tied=False).config)
    assert dims == ArchDims(
        vocab=96,
        hidden=48,
        layers=3,
        intermediate=104,
        heads=6,
        kv_heads=2,
        head_dim=8,
        qkv_bias=True,
        o_bias=False,
        mlp_bias=False,
        tied=False,
    )


def expected_sliced(dims: ArchDims, widths: list[int], final: int) -> tuple[int, int]:
    """Shapes of the sliced model written out tensor by tensor from the spec (independent of params.py)."""
    shapes: list[tuple[int, ...]] = [(dims.vocab, widths[0]), (dims.vocab, final)]
    shortcuts = 0
    outs = widths[1:] + [final]
    q_out, kv_out = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    for d_in, d_out in zip(widths, outs, strict=True):
        shapes += [(q_out, d_in), (kv_out, d_in), (kv_out, d_in), (d_in, q_out)]
        shapes += [(dims.intermediate, d_in), (dims.intermediate, d_in), (d_out, dims.intermediate)]
        if dims.qkv_bias:
            shapes += [(q_out,), (kv_out,), (kv_out,)]
        if dims.o_bias:
            shapes += [(d_in,)]
        if dims.mlp_bias:
            shapes += [(dims.intermediate,), (dims.intermediate,), (d_out,)]
        shortcuts += d_in * d_in + d_in * d_out
    weights = sum(int(torch.Size(s).numel()) for s in shapes)
    return weights, shortcuts


def test_sliced_count_matches_manual_shapes() -> None:
    for model in (make_tiny_model("qwen2", tied=True), llama_with_biases()):
        dims = ArchDims.from_config(model.config)
        widths = [dims.hidden - 3 * i - 1 for i in range(dims.layers)]
        for final in (None, dims.hidden - 5):
            pc = sliced_params(dims, widths, final)
            w, s = expected_sliced(dims, widths, dims.hidden if final is None else final)
            assert (pc.weights, pc.shortcuts, pc.total) == (w, s, w + s)


def test_sliced_at_full_width_is_dense_plus_shortcuts_minus_norms() -> None:
    dims = ArchDims.from_config(make_tiny_model("llama", tied=False).config)
    pc = sliced_params(dims, [dims.hidden] * dims.layers)
    d, n = dims.hidden, dims.layers
    assert pc.weights == dense_params(dims) - (2 * n + 1) * d  # the folded norms are gone
    assert pc.shortcuts == 2 * n * d * d


def test_continuous_polynomial_agrees_at_integers() -> None:
    dims = ArchDims.from_config(llama_with_biases().config)
    widths = [17, 29]
    pc = sliced_params(dims, widths, 31)
    assert sliced_params_continuous(dims, widths, 31) == pc.total
    assert sliced_params_continuous(dims, widths, 31, count="weights") == pc.weights


@pytest.mark.parametrize(
    "bad, match",
    [
        ([48, 48], r"^widths: expected one width per decoder layer \(3\), got 2"),
        ([48, 0, 48], r"^widths\[1\]: 0 is outside 1 <= width <= 48 \(the hidden size\)$"),
        ([48, 49, 48], r"widths\[1\]: 49 is outside"),
        ([48, 40.0, 48], r"widths\[1\]: 40.0 is not an integer"),
        ([48, True, 48], r"widths\[1\]: True is not an integer"),
    ],
)
def test_width_validation(bad, match) -> None:
    dims = ArchDims.from_config(make_tiny_model("llama").config)
    with pytest.raises(ValueError, match=match):
        sliced_params(dims, bad)
    with pytest.raises(ValueError, match=match):
        validate_widths(bad, 3, 48)


def test_validate_widths_takes_sequences_arrays_and_tensors() -> None:
    for widths in ([48, 40, 8], (48, 40, 8), np.array([48, 40, 8]), torch.tensor([48, 40, 8]), [np.int64(48), 40, 8]):
        out = validate_widths(widths, 3, 48)
        assert out == (48, 40, 8) and all(type(w) is int for w in out)
    for bad in ("488", {48: 1, 40: 1, 8: 1}, 48, torch.tensor(48)):
        with pytest.raises(ValueError, match=r"^widths: expected a sequence of 3 integers, got "):
            validate_widths(bad, 3, 48)
    with pytest.raises(ValueError, match=r"^final_width\[0\]: 49 is outside"):
        validate_widths([49], 1, 48, "final_width")


def test_bad_inputs() -> None:
    dims = ArchDims.from_config(make_tiny_model("llama").config)
    with pytest.raises(ValueError, match="final_width: 0 is outside"):
        sliced_params(dims, [8, 8, 8], final_width=0)
    with pytest.raises(ValueError, match="count:"):
        sliced_params_continuous(dims, [8, 8, 8], count="both")
    with pytest.raises(ValueError, match=r"^hidden: 0 is outside hidden >= 1$"):
        ArchDims(
            vocab=1,
            hidden=0,
            layers=1,
            intermediate=1,
            heads=1,
            kv_heads=1,
            head_dim=1,
            qkv_bias=False,
            o_bias=False,
            mlp_bias=False,
            tied=True,
        )

    class GPT2Like:
        model_type = "gpt2"

    with pytest.raises(ValueError, match="config: model_type 'gpt2'"):
        ArchDims.from_config(GPT2Like())


@pytest.mark.parametrize("tied", [True, False])
def test_sliced_count_matches_sliced_structure(tiny_arch: str, tied: bool) -> None:
    model = make_tiny_model(tiny_arch, tied=tied)
    dims = ArchDims.from_config(model.config)
    widths, final = [40, 24, 33], 45
    build_sliced_structure(model, widths, final_width=final)
    assert sliced_params(dims, widths, final) == ParamCount(*expected_sliced(dims, widths, final))
    assert sliced_params(dims, widths, final).total == numel(model)


def test_sliced_count_matches_sliced_structure_with_biases() -> None:
    model = llama_with_biases()
    dims = ArchDims.from_config(model.config)
    build_sliced_structure(model, [20, 12], final_width=30)
    assert sliced_params(dims, [20, 12], 30) == ParamCount(*expected_sliced(dims, [20, 12], 30))
    assert sliced_params(dims, [20, 12], 30).total == numel(model)


def test_sliced_count_matches_slice_model(tiny_arch: str) -> None:
    """The real engine on calibration data: every parameter of the result is accounted for."""
    model = make_tiny_model(tiny_arch, tied=True)
    dims = ArchDims.from_config(model.config)
    widths = [32, 40, 16]
    slice_model(model, make_batch(n=4, seqlen=12), widths, progress=False)
    shortcut_numel = sum(p.numel() for n, p in model.named_parameters() if "shortcut" in n)
    pc = sliced_params(dims, widths)
    assert (numel(model) - shortcut_numel, shortcut_numel) == (pc.weights, pc.shortcuts)
