"""ShortGPT layer deletion: order, parameter matching and the shortened model's maths."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.core.adapters import count_parameters
from dynslice.core.lr import layer_redundancy
from dynslice.core.params import ArchDims, dense_params
from dynslice.core.shortgpt import (
    delete_layers,
    deletion_order,
    layers_to_delete,
    params_after_deletion,
)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_deletion_order_is_lowest_bi_first():
    assert deletion_order([0.3, 0.1, 0.5, 0.1]) == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="bi"):
        deletion_order([0.1, float("nan")])


def test_zero_deletions_matches_dense_logits():
    dense = make_tiny_model("llama", layers=4)
    ids = make_batch(padded=False)["input_ids"]
    short = delete_layers(copy.deepcopy(dense), [])
    torch.testing.assert_close(_logits(short, ids), _logits(dense, ids), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_deleted_model_equals_dense_with_layers_skipped(arch):
    """Deleting layers 1 and 3 gives the dense model with those layers replaced by the identity."""
    dense = make_tiny_model(arch, layers=5)
    ids = make_batch(padded=False)["input_ids"]
    short = delete_layers(copy.deepcopy(dense), [3, 1])
    assert short.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in short.model.layers] == [0, 1, 2]
    dims = ArchDims.from_config(dense.config)
    assert (
        count_parameters(short)
        == params_after_deletion(dims, 2)
        == dense_params(dims) - 2 * (count_parameters(dense.model.layers[0]))
    )

    def identity(_module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handles = [dense.model.layers[i].register_forward_hook(identity, with_kwargs=True) for i in (1, 3)]
    try:
        expected = _logits(dense, ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(_logits(short, ids), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, _logits(dense, ids), atol=1e-3)  # skipping layers changed something
    short(input_ids=ids, use_cache=True)  # renumbered cache slots: runs with a KV cache too


def test_layers_to_delete_removes_lowest_bi_until_the_count_fits():
    model = make_tiny_model("llama", layers=6)
    dims = ArchDims.from_config(model.config)
    bi = [0.5, 0.05, 0.4, 0.01, 0.3, 0.2]
    assert layers_to_delete(bi, dims, dense_params(dims)) == []
    assert layers_to_delete(bi, dims, params_after_deletion(dims, 2)) == [1, 3]
    assert layers_to_delete(bi, dims, params_after_deletion(dims, 2) + 1) == [1, 3]  # never above the target
    assert layers_to_delete(bi, dims, params_after_deletion(dims, 2) - 1) == [1, 3, 5]
    with pytest.raises(ValueError, match="target_params"):
        layers_to_delete(bi, dims, 10)
    with pytest.raises(ValueError, match="bi"):
        layers_to_delete(bi[:3], dims, dense_params(dims))


def test_real_bi_scores_pick_the_least_influential_layer():
    model = make_tiny_model("llama", layers=4)
    bi = layer_redundancy(model, make_batch(), metric="bi", progress=False).raw
    dims = ArchDims.from_config(model.config)
    drop = layers_to_delete(bi, dims, params_after_deletion(dims, 1))
    assert drop == [min(range(4), key=lambda i: bi[i])]


def test_bad_indices_are_rejected():
    model = make_tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match="indices"):
        delete_layers(model, [3])
    with pytest.raises(ValueError, match="indices"):
        delete_layers(model, [0, 1, 2])
