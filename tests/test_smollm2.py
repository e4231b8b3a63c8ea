"""Integration on the embedded SmolLM2-135M: slicing, save/reload through the CLI, and the run record."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dynslice.core.slicing import slice_model
from dynslice.measure import data
from dynslice.measure.evaluate import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wiki(smol):
    _, tok = smol
    cal = data.calibration_batch("wiki", tok, nsamples=64, seqlen=512, seed=0)
    ev = data.eval_chunks("wiki", tok, seqlen=512, split="test", max_chunks=8)
    return cal, ev


def test_ten_percent_constant_slicing_stays_close_to_dense(smol, wiki):
    """SmolLM2 is small and sensitive to calibration size at 10%: measured on wiki test (8 × 512 tokens), dense 15.2;
    width 520 with 8×256 calibration tokens 30.0, 32×256 25.3, 32×512 23.4, 64×512 21.9 (1.44× dense)."""
    model, _ = smol
    cal, ev = wiki
    dense = perplexity(model, ev, batch_size=4)
    width = 520  # 10% of D = 576, on a multiple of 8 (576 * 0.9 = 518.4)
    sliced = slice_model(copy.deepcopy(model), cal, [width] * 30, batch_size=8, progress=False)
    ppl = perplexity(sliced, ev, batch_size=4)
    assert math.isfinite(dense) and 10 < dense < 60
    assert math.isfinite(ppl) and dense < ppl < 1.5 * dense
    # Shapes: every residual-reading linear of every layer is 520 wide.
    assert all(layer.self_attn.q_proj.in_features == width for layer in sliced.model.layers)


def test_rotation_is_exact_on_smollm2(smol, wiki):
    """Folding + rotating SmolLM2 without slicing keeps its logits (fp32, ≤ 1e-4 × max |logit|)."""
    model, _ = smol
    cal, ev = wiki
    small = {"input_ids": cal["input_ids"][:4, :64]}
    rotated = slice_model(copy.deepcopy(model), small, [576] * 30, batch_size=2, progress=False)
    x = ev[:2, :64]
    ref, out = model(input_ids=x).logits, rotated(input_ids=x).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_cli_slice_then_reload_has_identical_logits(tmp_path, smol):
    from dynslice.cli import main
    from dynslice.store.models import load_model

    out = tmp_path / "sliced"
    rc = main(
        [
            "slice",
            "--model",
            "smollm2-135m",
            "--sp",
            "0.1",
            "--cal-dataset",
            "wiki",
            "--cal-nsamples",
            "2",
            "--cal-seqlen",
            "64",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    meta = json.loads((out / "dynslice.json").read_text())
    assert meta["widths"] == [512] * 30 and meta["base_model"] == "smollm2-135m"
    reloaded = load_model(str(out))
    # rebuild the same model in-process and compare
    model, tok = smol
    cal = data.calibration_batch("wiki", tok, 2, 64, seed=42)
    again = slice_model(copy.deepcopy(model), cal, [512] * 30, progress=False)
    x = data.eval_chunks("wiki", tok, 32, max_chunks=2)
    assert torch.equal(reloaded(input_ids=x).logits, again(input_ids=x).logits)
    # the saved folder is a spec for eval too
    rc = main(
        [
            "eval",
            "--model",
            str(out),
            "--ppl",
            "wiki",
            "--ppl-seqlen",
            "64",
            "--ppl-max-chunks",
            "2",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    rec = json.loads((tmp_path / "eval.json").read_text())
    assert rc == 0 and math.isfinite(rec["ppl"]["wiki"]) and rec["params"]["total"] == meta["num_parameters"]
