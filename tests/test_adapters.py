"""Architecture adapters: the engine names no transformers attribute, and Qwen3 (per-head q/k norms) slices exactly."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.core.adapters import count_parameters, get_adapter
from dynslice.core.layers import SlicedDecoderLayer
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, dense_params, sliced_params
from dynslice.core.slicing import slice_model

PACKAGE = Path(__file__).resolve().parents[1] / "dynslice"
#: Modules that reach a model only through its adapter.
ENGINE_FILES = ("core/slicing.py", "core/lr.py", "core/shortgpt.py", "store/stream.py")
#: Module attributes (and checkpoint key parts) of transformers' Llama-like models.
TRANSFORMERS_NAMES = {
    "model",
    "embed_tokens",
    "lm_head",
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn",
    "mlp",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "q_norm",
    "k_norm",
}


def _transformers_names(source: str) -> list[str]:
    """``line: name`` for each attribute access or non-docstring string (split at dots) naming one of them."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in TRANSFORMERS_NAMES:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            # a key part, or the decoder body's prefix ("model.safetensors" is a file name, not a module path)
            if set(re.split(r"[.{}]", node.value)) & TRANSFORMERS_NAMES - {"model"} or re.search(
                r"\bmodel\.(layers|norm)\b", node.value
            ):
                found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_the_scan_sees_module_paths_and_checkpoint_keys():
    bad = (
        'x = model.model.layers\ny = layer.self_attn\nz = "lm_head.weight"\nw = f"model.layers.{i}."\n'
        'v = "model.norm.weight"\n'
    )
    assert len(_transformers_names(bad)) == 5
    ok = '"""Docstrings may say lm_head."""\nx = adapter.head\ny = "model: bad"\nz = "model.safetensors"\n'
    assert _transformers_names(ok) == []


@pytest.mark.parametrize("name", ENGINE_FILES)
def test_the_engine_names_no_transformers_attribute(name):
    """The engine, LR, deletion and streaming reach embeddings, layers, norms and checkpoint keys via the adapter."""
    assert _transformers_names((PACKAGE / name).read_text()) == []


# ------------------------------------------------------------------------------------------------------- Qwen3
def _rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float(((out - ref)[m].abs().max() / ref[m].abs().max()).detach())


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_rotation_without_slicing_is_exact(tied):
    """q_norm/k_norm act on q_proj/k_proj outputs in head space, which input rotations leave unchanged: fold +
    rotate at full width gives the dense logits (fp32, ≤ 1e-4 × max |logit|), and the head norms pass through."""
    model = make_tiny_model("qwen3", tied=tied)
    assert model.model.layers[0].self_attn.q_proj.out_features == 96 != model.config.hidden_size
    batch = make_batch(padded=True)
    ref = model(**batch).logits
    sliced = slice_model(copy.deepcopy(model), batch, [48, 48, 48], progress=False)
    assert not torch.allclose(sliced.model.embed_tokens.weight, model.model.embed_tokens.weight, atol=1e-3)
    for dense, layer in zip(model.model.layers, sliced.model.layers):
        assert isinstance(layer, SlicedDecoderLayer)
        for norm in ("q_norm", "k_norm"):
            assert torch.equal(getattr(layer.self_attn, norm).weight, getattr(dense.self_attn, norm).weight)
    assert _rel_err(sliced(**batch).logits, ref, batch["attention_mask"]) <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_sliced_saves_reloads_and_counts(tmp_path, tied):
    """A sliced Qwen3 reloads to identical logits, and the parameter formulas (q/k norms: 2·head_dim per layer)
    give the real dense and sliced counts."""
    from dynslice.store.io import load_sliced, read_sliced_meta, save_sliced

    model = make_tiny_model("qwen3", tied=tied)
    dims = ArchDims.from_config(model.config)
    assert dims.qk_norm and dims.head_dim == 16
    assert dense_params(dims) == count_parameters(model)
    widths, final = [40, 24, 32], 40
    sliced = slice_model(copy.deepcopy(model), make_batch(), widths, final_width=final, progress=False)
    assert sliced_params(dims, widths, final).total == count_parameters(sliced)
    save_sliced(sliced, tmp_path / "q3", "tiny-qwen3")
    assert read_sliced_meta(tmp_path / "q3")["architecture"] == "Qwen3ForCausalLM"
    back = load_sliced(tmp_path / "q3")
    test = make_batch(seed=7, padded=False)
    assert torch.equal(back(**test).logits, sliced(**test).logits)
    assert _rel_err(back(**test).logits, model(**test).logits, test["attention_mask"]) > 1e-3  # it sliced


def test_qwen3_streaming_equals_in_ram(tmp_path):
    """Streaming reads a Qwen3 checkpoint's layers (q/k norms included) by the adapter's key names."""
    from dynslice.store.io import load_sliced, save_sliced
    from dynslice.store.stream import slice_streaming

    model = make_tiny_model("qwen3", tied=False)
    batch = make_batch()
    model.save_pretrained(tmp_path / "dense")
    save_sliced(slice_model(copy.deepcopy(model), batch, [40, 24, 32], progress=False), tmp_path / "ram", "dense")
    slice_streaming(tmp_path / "dense", batch, [40, 24, 32], tmp_path / "stream", progress=False)
    test = make_batch(seed=7, padded=False)
    a, b = load_sliced(tmp_path / "ram")(**test).logits, load_sliced(tmp_path / "stream")(**test).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5


def test_qwen3_layer_redundancy_matches_hidden_states():
    model = make_tiny_model("qwen3", layers=3)
    batch = make_batch(padded=True)
    score = layer_redundancy(model, batch, last_layer="final_norm", progress=False)
    hs = model(**batch, output_hidden_states=True).hidden_states  # the last entry is after the final norm
    m = batch["attention_mask"].bool()
    ref = [torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)[m].double().mean().item() for i in range(3)]
    assert score.raw == pytest.approx(ref, abs=1e-5)


def test_gemma_is_refused_with_its_own_reason():
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(
        GemmaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    with pytest.raises(ValueError, match=r"GemmaForCausalLM \(Gemma scales its RMSNorms by \(1 \+ w\).*sqrt"):
        get_adapter(model)
