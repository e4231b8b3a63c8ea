"""One orchestrator: the CLI commands and the pipeline run the same steps on the same RunConfig.

``dynslice run`` and :func:`dynslice.experiment.pipeline.run` write the same record; the command chain
``lr -> allocate -> slice -> eval`` gives the same widths, the same weights (bit for bit) and the same perplexity as
one run; and a flag reaches the engine through the CLI, the orchestrator and the core only.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from dynslice.cli import main
from dynslice.experiment import pipeline
from dynslice.experiment.config import RunConfig

#: One small run of the tiny random model, as flags and as a config.
FLAGS = {
    "model": "tiny-random",
    "sp": 0.3,
    "sb": 0.1,
    "lr_nsamples": 2,
    "lr_seqlen": 32,
    "cal_nsamples": 4,
    "cal_seqlen": 32,
    "ppl_datasets": ("wiki",),
    "ppl_seqlen": 32,
    "ppl_max_chunks": 2,
    "batch_size": 2,
}
#: Entries of a record that are wall-clock times (they differ between two executions of the same run).
TIMES = ("timings_s", "slice_timings_s")


def argv(*names: str) -> list[str]:
    """The ``--flag value`` pairs of ``FLAGS`` (all, or ``names``) as `dynslice run` spells them."""
    out: list[str] = []
    for k, v in FLAGS.items():
        if names and k not in names:
            continue
        flag = "--ppl" if k == "ppl_datasets" else f"--{k.replace('_', '-')}"
        out += [flag, *(v if isinstance(v, tuple) else [str(v)])]
    return out


def without_times(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMES}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The pipeline's record of ``FLAGS``, with the sliced model saved."""
    folder = tmp_path_factory.mktemp("pipeline")
    cfg = RunConfig(**FLAGS, save_dir=str(folder / "model"))
    return pipeline.run(cfg, folder / "run.json"), folder


def test_cli_run_writes_the_pipelines_record(tmp_path, pipeline_run):
    record, _ = pipeline_run
    out = tmp_path / "run.json"
    assert main(["run", *argv(), "--out", str(out)]) == 0
    cli_record = json.loads(out.read_text())
    assert without_times(cli_record) == without_times(record)
    assert cli_record["config"] == RunConfig(**FLAGS).to_json()


def test_the_command_chain_equals_one_run(tmp_path, pipeline_run):
    """lr -> allocate -> slice --lr -> eval: the run's widths, its weights bit for bit and its perplexity."""
    record, folder = pipeline_run
    lr, widths, model, ev = (tmp_path / n for n in ("lr.json", "w.json", "m", "e.json"))
    assert main(["lr", *argv("model", "batch_size"), "--nsamples", "2", "--seqlen", "32", "--out", str(lr)]) == 0
    assert json.loads(lr.read_text())["lr"] == record["lr"]["lr"]
    assert main(["allocate", "--lr", str(lr), *argv("sp", "sb"), "--out", str(widths)]) == 0
    assert json.loads(widths.read_text())["widths"] == record["widths"]
    slice_flags = argv("model", "sp", "sb", "cal_nsamples", "cal_seqlen", "batch_size")
    assert main(["slice", *slice_flags, "--lr", str(lr), "--stream", "off", "--out", str(model)]) == 0
    ours, theirs = load_file(model / "model.safetensors"), load_file(folder / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    eval_flags = argv("ppl_datasets", "ppl_seqlen", "ppl_max_chunks", "batch_size")
    assert main(["eval", "--model", str(model), *eval_flags, "--out", str(ev)]) == 0
    assert json.loads(ev.read_text())["ppl"] == record["ppl"]


def test_slice_computes_the_lr_a_run_computes(tmp_path, pipeline_run):
    """`dynslice slice` without --lr scores the layers on the run's LR data, so it picks the run's widths."""
    record, _ = pipeline_run
    out = tmp_path / "m"
    flags = argv("model", "sp", "sb", "lr_nsamples", "lr_seqlen", "cal_nsamples", "cal_seqlen", "batch_size")
    assert main(["slice", *flags, "--stream", "off", "--out", str(out)]) == 0
    meta = json.loads((out / "dynslice.json").read_text())
    assert meta["widths"] == record["widths"] and meta["extra"]["allocation"] == record["allocation"]
    assert meta["extra"]["config"]["lr_nsamples"] == FLAGS["lr_nsamples"]


def test_a_flag_reaches_the_engine_through_the_cli_the_orchestrator_and_the_core_only(tmp_path):
    """While `dynslice slice --batch-size 3` runs the engine, every dynslice frame on the stack belongs to the CLI,
    the orchestrator or the core, and the engine receives the flag's value."""
    seen: list[tuple[list[str], int]] = []

    def profile(frame, event, _arg):
        if (
            event == "call"
            and frame.f_code.co_name == "slice_model"
            and frame.f_globals["__name__"].endswith("slicing")
        ):
            stack, f = [], frame
            while f is not None:
                name = f.f_globals.get("__name__", "")
                if name.startswith("dynslice"):
                    stack.append(name)
                f = f.f_back
            seen.append((stack, frame.f_locals["batch_size"]))

    flags = argv("model", "cal_nsamples", "cal_seqlen")
    sys.setprofile(profile)
    try:
        rc = main(
            ["slice", *flags, "--sp", "0.3", "--batch-size", "3", "--stream", "off", "--out", str(tmp_path / "m")]
        )
    finally:
        sys.setprofile(None)
    assert rc == 0 and len(seen) == 1
    stack, batch_size = seen[0]
    assert batch_size == 3
    assert set(stack) == {"dynslice.core.slicing", "dynslice.experiment.pipeline", "dynslice.cli"}, stack
