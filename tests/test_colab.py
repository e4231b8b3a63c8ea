"""The Colab notebook (notebooks/colab_paper.ipynb) and its profile (issue 20, piece 4).

The notebook cannot run here (no Colab, no hub, no GPU); what can be checked is: it is a valid notebook that
run_all.sh does not pick up, it reads the Hugging Face token from a Colab secret and holds none, its profile parses
and plans through the CLI, the plan's slicing peaks and the sliced model fit a free T4 machine, the predicted cost it
states is the plan's, the README badge opens it, and (slow tier) it runs top to bottom off Colab on a tiny model and
resumes.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest

from dynslice.cli import main
from dynslice.experiment.profiles import load_profile, sweep_configs
from dynslice.scale.cost import profile_plan
from dynslice.store.memory import GIB

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_paper.ipynb"
NB_PATH = "notebooks/colab_paper.ipynb"


def _nb() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def _params() -> dict:
    """The values of the notebook's papermill parameters cell."""
    cells = [c for c in _nb().cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    out = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign), "the parameters cell holds assignments only"
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def _t4_plan():
    """The plan of the colab profile's sweep on the machine the notebook names: the profile plan, and the memory
    of its largest run (``dynslice plan --profile colab --host-gib H --gpu-gib G``)."""
    p = _params()
    planned = profile_plan(p["profile"], gpu_tflops=p["gpu_tflops"], host_gib=p["host_gib"], gpu_gib=p["gpu_gib"])
    return p, planned, planned["models"][0]["memory"]


def test_notebook_is_valid_and_not_a_numbered_notebook():
    nb = _nb()
    nbformat.validate(nb)
    assert not NOTEBOOK.match("[0-9][0-9]_*.ipynb")  # run_all.sh and the artifact tests glob that
    assert NOTEBOOK not in set((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code"), "the source keeps no outputs"
    assert nb.metadata.get("accelerator") == "GPU"  # Colab opens it on a GPU runtime


def test_no_token_in_the_notebook_and_the_login_reads_a_colab_secret():
    text = NOTEBOOK.read_text(encoding="utf-8")
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), "a Hugging Face token is written in the notebook"
    code = "\n".join(c.source for c in _nb().cells if c.cell_type == "code")
    assert not re.search(r"""HF_TOKEN["']?\]?\s*=\s*f?["']""", code), "HF_TOKEN is set to a literal"
    assert 'os.environ["HF_TOKEN"] = userdata.get("HF_TOKEN")' in code  # the Colab secret, kept in the process
    assert "login(" not in code and "token=" not in code  # huggingface_hub.login would write it to a file
    assert "meta-llama/Meta-Llama-3-8B" in text and "mistralai/Mistral-7B-v0.1" in text  # the licence note


def test_profile_plans_through_the_cli(tmp_path, capsys):
    p = _params()
    out = tmp_path / "plan.json"
    assert main(["plan", "--profile", p["profile"], "--gpu-tflops", str(p["gpu_tflops"]), "--out", str(out)]) == 0
    assert "profile colab: 5 runs" in capsys.readouterr().out
    planned = json.loads(out.read_text())
    assert planned["models"][0]["by_kind"] == {"dense": 1, "constant": 1, "dynamic": 3}
    prof = load_profile("colab")
    configs = sweep_configs(prof)
    assert {c.model for c in configs} == {"meta-llama/Meta-Llama-3-8B"}
    assert sorted(c.sb for c in configs if not c.dense) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert {(c.protocol, c.dtype, c.device, c.cal_dataset) for c in configs} == {
        ("reference", "fp16", "cuda", "wikitext2")
    }
    assert all(c.ppl_datasets == ("wikitext2",) and not c.tasks for c in configs)
    # what a record names as trimmed against the authors' protocol lives in the record (protocol.overrides); the
    # paper's calibration size is kept
    assert {(c.cal_nsamples, c.cal_seqlen, c.ppl_seqlen) for c in configs} == {(128, 2048, 2048)}


def test_the_plan_fits_a_free_colab_t4():
    """Every phase of a run of the sweep fits a free T4 machine: slicing streams from disk, and the LR and the
    evaluation, whose models do not fit the T4 whole, are read layer by layer within 90% of the GPU and the RAM."""
    p, planned, mem = _t4_plan()
    assert (p["host_gib"], p["gpu_gib"]) == (12.7, 14.75)  # free Colab RAM; a T4's 16 GB as torch reports it
    assert mem["slicing"]["mode"] == "stream" and mem["slicing"]["weights_on"] == "disk"
    assert mem["peak_gpu_bytes"] <= 0.9 * p["gpu_gib"] * GIB
    assert mem["peak_host_bytes"] <= 0.9 * p["host_gib"] * GIB
    assert {"lr (offload)", "eval (offload)", "slicing"} == set(mem["phase_gpu_bytes"])


def test_predicted_cost_cell_states_the_plan():
    cells = [c for c in _nb().cells if "predicted-cost" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    text = " ".join(cells[0].source.split())
    p, planned, mem = _t4_plan()
    expected = [
        f"{planned['runs']} runs",
        f"{60 * planned['wall_hours']['1']:.0f} min of GPU compute at an assumed {p['gpu_tflops']} TFLOP/s",
        f"planned as `{mem['slicing']['mode']}`",
        f"peak host RAM {mem['peak_host_bytes'] / GIB:.2f} GiB",
        f"peak GPU memory {mem['peak_gpu_bytes'] / GIB:.2f} GiB",
        f"each sliced model {mem['slicing']['output_bytes'] / GIB:.2f} GiB",
    ]
    for phrase in expected:
        assert phrase in text, f"the predicted-cost cell should say {phrase!r} (rebuild it from the plan)"


def test_readme_badge_opens_the_notebook_from_the_repository():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    repo_url = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", repo_url).group(1)
    badge = f"https://colab.research.google.com/github/{owner_repo}/blob/main/{NB_PATH}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"]({badge})" in readme and "colab-badge.svg" in readme
    assert (ROOT / NB_PATH).is_file()
    assert _params()["repository"] == repo_url  # the notebook installs what the badge opens


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_off_colab_and_resumes(tmp_path, capsys):
    """The notebook, as papermill runs it outside Colab (no install, login or Drive), on a tiny random model with
    the colab profile's shape (dense, constant, three SBs): plan, sweep, Figure 1, tables; a second sweep skips
    every finished run (what a reconnected Colab session does)."""
    papermill = pytest.importorskip("papermill")
    profile = tmp_path / "mini.yaml"
    profile.write_text(
        "name: mini\nmodels: [{spec: tiny-random, dtype: fp32, device: cpu}]\n"
        "base: {seed: 42, round_interval: 8, lr_dataset: wiki, lr_nsamples: 4, lr_seqlen: 64, cal_nsamples: 4,\n"
        "  cal_seqlen: 64, batch_size: 4, ppl_datasets: [wiki], ppl_protocol: slicegpt, ppl_seqlen: 64,\n"
        "  ppl_max_chunks: 4}\n"
        "cal_datasets: [wiki]\nlr_datasets: [wiki]\nsp: [0.3]\nsb_step: 0.1\nbudgets: [width]\n"
    )
    root, figures = tmp_path / "results", tmp_path / "figures"
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(out),
        parameters={"profile": str(profile), "root": str(root), "figures": str(figures)},
        cwd=str(ROOT),
        progress_bar=False,
    )
    runs = sorted((root / "mini" / "runs" / "tiny-random").glob("*.json"))
    assert len(runs) == 5
    assert (figures / "mini" / "fig1_allocation.pdf").stat().st_size > 0
    for table in ("sweep.md", "sweep.tex", "headline.md"):
        assert (root / "mini" / "tables" / table).is_file()
    text = json.dumps(nbformat.read(out, as_version=4).cells[-1].outputs)
    assert "All 5 runs of the profile are finished" in text
    capsys.readouterr()
    assert main(["sweep", "--profile", str(profile), "--root", str(root)]) == 0
    assert "ran 0, skipped 5 already finished" in capsys.readouterr().out
