"""Save and reload of sliced models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.io import SLICED_META, WEIGHTS, load_sliced, read_sliced_meta, save_sliced
from dynslice.models import load_model, resolve_spec
from dynslice.slicing import slice_model


@pytest.fixture()
def saved(tmp_path, tiny_arch):
    model = make_tiny_model(tiny_arch, tied=True)
    batch = make_batch()
    sliced = slice_model(model, batch, [40, 24, 32], progress=False)
    out = save_sliced(sliced, tmp_path / "sliced", base_model="tiny-random", extra={"sp": 0.3})
    return sliced, out, batch


def test_reload_gives_identical_logits(saved):
    sliced, path, batch = saved
    ref = sliced(**batch).logits
    again = load_sliced(path)
    assert torch.equal(again(**batch).logits, ref)
    # a saved folder is a model spec
    assert resolve_spec(str(path)).kind == "sliced"
    assert torch.equal(load_model(str(path))(**batch).logits, ref)
    meta = read_sliced_meta(path)
    assert meta["widths"] == [40, 24, 32] and meta["base_model"] == "tiny-random" and meta["extra"] == {"sp": 0.3}
    assert meta["num_parameters"] == sum(p.numel() for p in again.parameters())


def test_no_pickle_in_the_saved_folder(saved):
    _, path, _ = saved
    names = sorted(p.name for p in path.iterdir())
    assert WEIGHTS in names and SLICED_META in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".pth")) for n in names)


def test_truncated_weights_give_a_clear_error(saved):
    _, path, _ = saved
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_sliced(path)


def test_corrupted_weights_give_a_clear_error(saved):
    _, path, _ = saved
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_sliced(path)


def test_mismatched_widths_give_a_clear_error(saved):
    _, path, _ = saved
    meta = json.loads((path / SLICED_META).read_text())
    meta["widths"] = [40, 24, 24]
    (path / SLICED_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the widths"):
        load_sliced(path)


def test_saving_a_dense_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a sliced model"):
        save_sliced(make_tiny_model("llama"), tmp_path / "x", base_model="tiny")


def test_resave_replaces_atomically(tmp_path):
    model = make_tiny_model("llama")
    batch = make_batch()
    a = slice_model(copy.deepcopy(model), batch, [48, 40, 32], progress=False)
    b = slice_model(copy.deepcopy(model), batch, [32, 32, 32], progress=False)
    save_sliced(a, tmp_path / "m", "tiny")
    save_sliced(b, tmp_path / "m", "tiny")
    assert read_sliced_meta(tmp_path / "m")["widths"] == [32, 32, 32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or backup folder left behind
