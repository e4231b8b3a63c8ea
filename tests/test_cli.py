"""Command-line surface: spellings, JSON outputs and one-line errors that name the parameter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dynslice.cli import main


def _lr_file(tmp_path, lr=(0.5, 0.9, 0.7, 0.8), model="tiny-random"):
    p = tmp_path / "lr.json"
    p.write_text(json.dumps({"model": model, "dataset": "wiki", "metric": "cosine", "lr": list(lr), "hidden": 64}))
    return p


def test_allocate_writes_widths(tmp_path):
    out = tmp_path / "w.json"
    assert main(["allocate", "--lr", str(_lr_file(tmp_path)), "--sp", "0.3", "--sb", "0.1", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert len(rec["widths"]) == 4 and all(w % 8 == 0 and 8 <= w <= 64 for w in rec["widths"])
    assert rec["sp"] == 0.3 and rec["sb"] == 0.1 and rec["budget"] == "width"


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--sp", "0.3", "--sb", "0.4"], "sb"),
        (["--sp", "1.2", "--sb", "0.1"], "sp"),
        (["--sp", "0.3", "--sb", "0.1", "--round-interval", "0"], "round_interval"),
    ],
)
def test_allocate_bad_input_names_the_parameter(tmp_path, capsys, argv, name):
    rc = main(["allocate", "--lr", str(_lr_file(tmp_path)), *argv, "--out", str(tmp_path / "w.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and name in err
    assert not (tmp_path / "w.json").exists()


def test_run_bad_sb_and_dataset(tmp_path, capsys):
    rc = main(["run", "--model", "tiny-random", "--sp", "0.3", "--sb", "often", "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "sb" in capsys.readouterr().err
    rc = main(
        [
            "run",
            "--model",
            "tiny-random",
            "--sp",
            "0.3",
            "--sb",
            "0.1",
            "--cal-dataset",
            "nope",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 2 and "cal_dataset" in capsys.readouterr().err


def test_slice_bad_widths_file(tmp_path, capsys):
    (tmp_path / "w.json").write_text(json.dumps({"widths": [64, 64, 0, 64]}))
    rc = main(
        [
            "slice",
            "--model",
            "tiny-random",
            "--widths",
            str(tmp_path / "w.json"),
            "--cal-nsamples",
            "2",
            "--cal-seqlen",
            "32",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert rc == 2 and "widths[2]" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_unknown_model_spec(tmp_path, capsys):
    rc = main(["eval", "--model", "./does/not/exist", "--ppl", "wiki", "--out", str(tmp_path / "e.json")])
    assert rc == 2 and "model" in capsys.readouterr().err


def test_run_end_to_end_on_tiny_random(tmp_path):
    """lr -> allocate -> slice -> eval through `dynslice run`; a second call with the same config is a no-op."""
    out = tmp_path / "run.json"
    argv = [
        "run",
        "--model",
        "tiny-random",
        "--sp",
        "0.3",
        "--sb",
        "0.1",
        "--lr-nsamples",
        "2",
        "--lr-seqlen",
        "32",
        "--cal-nsamples",
        "4",
        "--cal-seqlen",
        "32",
        "--ppl",
        "wiki",
        "--ppl-seqlen",
        "32",
        "--ppl-max-chunks",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["config"]["sb"] == 0.1 and len(rec["widths"]) == 4 and rec["ppl"]["wiki"] > 1
    assert rec["params"]["total"] == rec["params"]["weights"] + rec["params"]["shortcuts"]
    assert sum(rec["widths"]) == 4 * 40  # total width equals constant slicing at SP 0.3 (int(0.7*64)=44 -> 40)
    mtime = out.stat().st_mtime_ns
    assert main(argv) == 0 and out.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "dynslice", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "allocate" in res.stdout


@pytest.mark.parametrize("metric", ["cosine", "bi", "angular"])
def test_lr_allocate_slice_orientation(tmp_path, capsys, metric):
    """`lr --metric M` -> `allocate` -> `slice --lr`: for every metric the most redundant layer is sliced most.

    For ``cosine`` a high score is redundant; for the distances ``bi`` and ``angular`` a low one is. ``bi`` is
    ``1 - cosine`` on the same tokens, so it must give exactly the cosine's widths.
    """
    lr = tmp_path / f"lr_{metric}.json"
    assert (
        main(
            ["lr", "--model", "tiny-random", "--metric", metric, "--nsamples", "2", "--seqlen", "16", "--out", str(lr)]
        )
        == 0
    )
    rec = json.loads(lr.read_text())
    assert rec["metric"] == metric and rec["hidden"] == 64 and rec["num_layers"] == 4
    raw = rec["lr"]
    most_redundant = raw.index(max(raw)) if metric == "cosine" else raw.index(min(raw))
    least_redundant = raw.index(min(raw)) if metric == "cosine" else raw.index(max(raw))
    common = ["--sp", "0.3", "--sb", "0.0", "--round-interval", "1"]
    alloc = tmp_path / f"w_{metric}.json"
    assert main(["allocate", "--lr", str(lr), *common, "--out", str(alloc)]) == 0  # no hub: hidden is in the file
    widths = json.loads(alloc.read_text())["widths"]
    assert widths[most_redundant] == min(widths) < widths[least_redundant] == max(widths)
    out = tmp_path / f"m_{metric}"
    assert (
        main(
            [
                "slice",
                "--model",
                "tiny-random",
                "--lr",
                str(lr),
                *common,
                "--cal-nsamples",
                "2",
                "--cal-seqlen",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "dynslice.json").read_text())["widths"] == widths
    if metric == "bi":
        cos = tmp_path / "lr_cos.json"
        assert main(["lr", "--model", "tiny-random", "--nsamples", "2", "--seqlen", "16", "--out", str(cos)]) == 0
        assert main(["allocate", "--lr", str(cos), *common, "--out", str(tmp_path / "w_cos.json")]) == 0
        assert json.loads((tmp_path / "w_cos.json").read_text())["widths"] == widths


@pytest.mark.parametrize(
    "content, extra, ok",
    [
        ([0.5, 0.9, 0.7, 0.8], ["--lr-metric", "cosine", "--hidden", "64"], True),
        ({"lr": [0.5, 0.9, 0.7, 0.8], "metric": "cosine"}, ["--model", "tiny-random"], True),
        ({"lr": [0.1, 0.5, 0.3, 0.2], "metric": "redundancy"}, ["--hidden", "64"], True),
        ([0.5, 0.9, 0.7, 0.8], ["--lr-metric", "cosine"], "pass --model or --hidden"),
        ([0.5, 0.9, 0.7, 0.8], ["--hidden", "64"], "states no metric"),
        ({"lr": [0.5, 0.9, 0.7], "metric": "cosine"}, ["--model", "tiny-random"], "layers"),
    ],
)
def test_hand_written_lr_files(tmp_path, capsys, content, extra, ok):
    """A bare list or ``{"lr": [...]}`` is a normal input once the metric and the width are known."""
    p = tmp_path / "hand.json"
    p.write_text(json.dumps(content))
    out = tmp_path / "w.json"
    rc = main(
        ["allocate", "--lr", str(p), "--sp", "0.3", "--sb", "0.0", "--round-interval", "1", *extra, "--out", str(out)]
    )
    if ok is True:
        assert rc == 0
        widths = json.loads(out.read_text())["widths"]
        assert widths.index(min(widths)) == 1  # layer 1 is the most redundant in every file above
    else:
        err = capsys.readouterr().err
        assert rc == 2 and ok in err and "Traceback" not in err and not out.exists()
