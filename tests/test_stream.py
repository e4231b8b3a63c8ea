"""Streaming slicing from safetensors against in-RAM slicing: same logits, sharded output that reloads."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.core.slicing import slice_model
from dynslice.store.io import load_sliced, read_sliced_meta, save_sliced
from dynslice.store.stream import SafetensorsSource, is_streamable, slice_streaming

WIDTHS = [40, 24, 32]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


def _save_dense(model, folder, max_shard_size="5GB"):
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


@pytest.mark.parametrize(
    "arch,tied,final_width",
    [("llama", True, None), ("llama", False, 40), ("mistral", False, None), ("qwen2", True, 32)],
)
def test_streaming_equals_in_ram(tmp_path, arch, tied, final_width):
    """The streamed folder loads to the same logits as the in-RAM sliced model (1e-5 relative, fp32)."""
    model = make_tiny_model(arch, tied=tied)
    batch = make_batch()
    src = _save_dense(model, tmp_path / "dense")
    assert is_streamable(src)
    ref = slice_model(copy.deepcopy(model), batch, WIDTHS, final_width=final_width, progress=False)
    save_sliced(ref, tmp_path / "ram", "dense")
    slice_streaming(src, batch, WIDTHS, tmp_path / "stream", final_width=final_width, progress=False)
    a = load_sliced(tmp_path / "ram")
    b = load_sliced(tmp_path / "stream")
    test = make_batch(seed=7, padded=False)
    la, lb = a(**test).logits, b(**test).logits
    assert _rel(lb, la) <= 1e-5
    assert _rel(la, model(**test).logits) > 1e-3  # it did slice something
    meta_a, meta_b = read_sliced_meta(tmp_path / "ram"), read_sliced_meta(tmp_path / "stream")
    assert meta_b["widths"] == meta_a["widths"] and meta_b["num_parameters"] == meta_a["num_parameters"]
    assert meta_b["extra"]["streamed"] is True


def test_sharded_input_and_output_reload(tmp_path):
    """A sharded dense checkpoint streams; a small shard size gives several output shards that reload exactly."""
    model = make_tiny_model("llama", tied=False)
    batch = make_batch()
    src = _save_dense(model, tmp_path / "dense", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert len(set(SafetensorsSource(src).weight_map.values())) > 2
    slice_streaming(src, batch, WIDTHS, tmp_path / "one", progress=False)
    slice_streaming(src, batch, WIDTHS, tmp_path / "many", shard_bytes=30_000, progress=False)
    meta = read_sliced_meta(tmp_path / "many")
    shards = meta["weights"]["shards"]
    assert len(shards) > 2
    assert sorted(p.name for p in (tmp_path / "many").glob("model-*.safetensors")) == sorted(s["file"] for s in shards)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s["file"] for s in shards}
    test = make_batch(seed=3, padded=False)
    one, many = load_sliced(tmp_path / "one"), load_sliced(tmp_path / "many")
    assert torch.equal(one(**test).logits, many(**test).logits)
    # a truncated shard is caught before anything is loaded
    bad = tmp_path / "many" / shards[1]["file"]
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_sliced(tmp_path / "many")


def test_streaming_bf16_matches_in_ram_bf16(tmp_path):
    """bf16: signals are kept in bf16 on both paths, so the two outputs agree to bf16 rounding."""
    from transformers import AutoModelForCausalLM

    batch = make_batch()
    src = _save_dense(make_tiny_model("llama", tied=False).to(torch.bfloat16), tmp_path / "dense")
    # loaded as a user would (``model.to(bf16)`` would also round the rotary tables to bf16)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    ref = slice_model(model, batch, WIDTHS, progress=False)
    slice_streaming(src, batch, WIDTHS, tmp_path / "stream", dtype="bf16", progress=False)
    b = load_sliced(tmp_path / "stream")
    assert b.lm_head.weight.dtype == torch.bfloat16
    test = make_batch(seed=7, padded=False)
    assert _rel(b(**test).logits.float(), ref(**test).logits.float()) <= 2e-2


def test_streaming_errors(tmp_path):
    model = make_tiny_model("llama")
    src = _save_dense(model, tmp_path / "dense")
    with pytest.raises(ValueError, match="widths"):
        slice_streaming(src, make_batch(), [40, 24], tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="shard_bytes"):
        slice_streaming(src, make_batch(), WIDTHS, tmp_path / "o", shard_bytes=0, progress=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        SafetensorsSource(tmp_path / "empty")


def test_cli_slice_stream_on_equals_off(tmp_path, smol_tokenizer, capsys):
    """`dynslice slice --stream on|off` on a local safetensors folder: the plan is printed first, and both
    folders load to the same logits."""
    from dynslice.cli import main
    from dynslice.store.models import tiny_random_model

    src = tmp_path / "dense"
    tiny_random_model().save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    common = ["slice", "--model", str(src), "--sp", "0.25", "--cal-nsamples", "4", "--cal-seqlen", "64"]
    assert main([*common, "--stream", "on", "--out", str(tmp_path / "on")]) == 0
    assert "plan: stream (weights on disk" in capsys.readouterr().err
    assert main([*common, "--stream", "off", "--out", str(tmp_path / "off")]) == 0
    assert "plan: memory (weights on host" in capsys.readouterr().err
    on, off = load_sliced(tmp_path / "on"), load_sliced(tmp_path / "off")
    assert read_sliced_meta(tmp_path / "on")["widths"] == read_sliced_meta(tmp_path / "off")["widths"] == [48] * 4
    ids = torch.randint(3, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    assert _rel(on(input_ids=ids).logits, off(input_ids=ids).logits) <= 1e-5
    assert main([*common[:-4], "--sb", "0.1", "--stream", "on", "--out", str(tmp_path / "x")]) == 2
    assert "lr: dynamic widths" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; glibc's malloc_trim")
def test_flushed_shards_leave_the_resident_set(tmp_path):
    """Tensors under glibc's mmap threshold come from the heap, which keeps freed blocks resident: the shard
    writer hands them back after each flush, so a streaming run's RSS does not grow with the model's depth."""
    code = r"""
import sys, torch
from pathlib import Path
from dynslice.store.stream import ShardWriter

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

torch.empty(4 << 20)  # made and freed at once: that raises glibc's mmap threshold, as any real run does
w = ShardWriter(Path(sys.argv[1]), 1 << 30)
for k in range(96):
    w.add(f"t{k}", torch.full((256, 1024), float(k)))  # 1 MiB each, now from the heap
keep = torch.ones(256, 1024)  # allocated after them, still alive: the freed blocks are not the heap's top
before = anon_mib()
w.flush()
print(before - anon_mib())
"""
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    released = float(res.stdout.strip().splitlines()[-1])
    assert released >= 80, f"only {released:.0f} of 96 MiB left the resident set after the flush"
