"""Figures a venue accepts, and the executed notebooks as documents (issue 22).

The published PDFs (``figures/<profile>/``, tracked) are read as bytes: page width one ACL column (3.3 in) or the
full text width (6.9 in), a sensible height, fonts embedded, text present as text and never smaller than 7 pt. The
shared style, the marker dodging, the zero-shot wording, the notebook post-processing and the published-figures
folder's ownership are checked on small inputs.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import nbformat
import pytest

from dynslice.publish import narrative, notebook, plots, repro
from dynslice.store import ownership
from dynslice.store.paths import PROJECT_ROOT

FIGURES = PROJECT_ROOT / "figures"
PUBLISHED = {
    "cpu": ["fig1_allocation", "headline", "lr_per_layer", "ppl_vs_params", "ppl_vs_sb", "zero_shot"],
    "ablations": ["ablations", "ablations_news"],
}
PDFS = [FIGURES / profile / f"{name}.pdf" for profile, names in PUBLISHED.items() for name in names]
WIDTHS_PT = (72 * plots.COLUMN, 72 * plots.TEXT)
TOL_PT = 0.05 * 72


def read_pdf(path: Path) -> dict:
    """Page size (pt), font descriptors and embedded font files, and every text size set in the content streams."""
    raw = path.read_bytes()
    boxes = re.findall(rb"/MediaBox\s*\[\s*([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s*\]", raw)
    sizes, shown = [], 0
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", raw, re.S):
        try:
            content = zlib.decompress(m.group(1))
        except zlib.error:
            continue
        sizes += [float(s) for s in re.findall(rb"/F\d+\s+([\d.]+)\s+Tf", content)]
        shown += len(re.findall(rb"(?:\)|>)\s*Tj|\]\s*TJ", content))
    return {
        "boxes": [tuple(float(v) for v in b) for b in boxes],
        "descriptors": len(re.findall(rb"/Type\s*/FontDescriptor", raw)),
        "font_files": len(re.findall(rb"/FontFile[23]?\s", raw)),
        "sizes": sizes,
        "shown": shown,
    }


def test_the_published_figures_are_in_figures_not_in_results():
    assert sorted(p.name for p in (FIGURES / "cpu").glob("*.pdf")) == sorted(f"{n}.pdf" for n in PUBLISHED["cpu"])
    assert sorted(p.name for p in (FIGURES / "ablations").glob("*.pdf")) == sorted(
        f"{n}.pdf" for n in PUBLISHED["ablations"]
    )
    for profile in PUBLISHED:
        assert not (PROJECT_ROOT / "results" / "published" / profile / "figures").exists()


@pytest.mark.parametrize("pdf", PDFS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_published_pdf_fits_a_column_or_the_text_width_with_embedded_fonts_of_7pt_or_more(pdf):
    info = read_pdf(pdf)
    assert len(info["boxes"]) == 1, "one page"
    x0, y0, x1, y1 = info["boxes"][0]
    width, height = x1 - x0, y1 - y0
    assert any(abs(width - w) <= TOL_PT for w in WIDTHS_PT), f"{width / 72:.2f} in wide"
    assert 1.5 * 72 <= height <= 9.0 * 72, f"{height / 72:.2f} in high"
    assert info["descriptors"] >= 1 and info["font_files"] == info["descriptors"], "every font embedded"
    assert info["shown"] >= 10, "labels are text, not paths"
    assert info["sizes"] and min(info["sizes"]) >= plots.MIN_FONT_PT, f"smallest text {min(info['sizes'])} pt"


def test_read_pdf_sees_a_small_font_and_a_wrong_width(tmp_path):
    """The checks above can fail: a 5 pt label on a 5 in wide page is seen as both."""
    import matplotlib.pyplot as plt

    with plots.style():
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.set_xlabel("tiny", fontsize=5)
        fig.savefig(tmp_path / "bad.pdf")
    plt.close(fig)
    info = read_pdf(tmp_path / "bad.pdf")
    assert min(info["sizes"]) == 5.0
    assert not any(abs(info["boxes"][0][2] - w) <= TOL_PT for w in WIDTHS_PT)


def test_style_sets_every_font_to_7pt_or_more_and_widths_are_the_venue_s():
    assert plots.FONT_KEYS and all(isinstance(plots.STYLE[k], float) for k in plots.FONT_KEYS)
    assert min(plots.STYLE[k] for k in plots.FONT_KEYS) >= plots.MIN_FONT_PT == 7.0
    assert {"xtick.labelsize", "ytick.labelsize", "legend.fontsize", "axes.labelsize"} <= set(plots.FONT_KEYS)
    assert min(plots.FONT.values()) >= plots.MIN_FONT_PT
    assert plots.STYLE["pdf.fonttype"] == 42
    assert (plots.COLUMN, plots.TEXT) == (3.3, 6.9)
    with pytest.raises(ValueError, match="COLUMN"):
        plots.new_figure(5.0, 3.0)


def test_a_figure_in_the_style_saves_at_its_width_with_7pt_text(tmp_path):
    import matplotlib.pyplot as plt
    import pandas as pd

    head = pd.DataFrame(
        {
            "model": ["m"] * 2,
            "cal_dataset": ["wiki"] * 2,
            "comparison": ["equal mean width (paper)", "equal parameters"],
            "sp": [0.3, 0.3],
            "ppl_wiki_change_pct": [-20.0, -5.0],
        }
    )
    fig = plots.headline_bars(head, "wiki")
    fig.savefig(tmp_path / "h.pdf", format="pdf")
    plt.close(fig)
    info = read_pdf(tmp_path / "h.pdf")
    assert abs(info["boxes"][0][2] - 72 * plots.COLUMN) < 0.01
    assert min(info["sizes"]) >= 7.0


def test_dodge_spreads_close_points_and_leaves_distant_ones():
    off = plots.dodge([131.64, 131.66, 131.65, 147.5], within=0.3, step=0.4)
    assert list(off[:3]) == pytest.approx([-0.4, 0.0, 0.4])  # centred, in the caller's order
    assert off[3] == 0.0
    moved = [131.64 - 0.4, 131.66, 131.65 + 0.4]
    assert min(abs(a - b) for i, a in enumerate(moved) for b in moved[i + 1 :]) >= 0.39


def _head_and_acc(delta: float, se_points: float):
    import pandas as pd

    key = {"model": "m", "cal_dataset": "wiki", "sp": 0.3}
    head = pd.DataFrame(
        [
            {
                **key,
                "comparison": "equal mean width (paper)",
                "acc_constant": 0.33,
                "acc_dynamic": 0.33 + delta / 100,
                "acc_delta_points": delta,
                "ppl_wiki_change_pct": -10.0,
                "best_sb": 0.0,
            }
        ]
    )
    acc = pd.DataFrame([{**key, "method": "dynamic (equal mean width (paper))", "se_delta_points": se_points}])
    return head, acc


def test_zero_shot_note_calls_a_difference_within_two_standard_errors_no_gain():
    head, acc = _head_and_acc(5.0, 6.2)
    text = narrative.zero_shot_text(head, acc)
    assert "+5.0 ± 6.2 points" in text and "no measurable difference" in text
    assert "paper's up to 5" not in text
    assert "no measurable change" in narrative.headline_text(head, "wiki", acc)
    assert "accuracy gain" not in narrative.headline_text(head, "wiki", acc)
    head, acc = _head_and_acc(15.0, 4.0)  # beyond two standard errors: compared with the paper
    text = narrative.zero_shot_text(head, acc)
    assert "+15.0 ± 4.0 points, more than the paper's up to 5" in text
    assert "no measurable" not in text


def test_zero_shot_bars_and_note_keep_calibration_sets_apart():
    """The paper profile zero-shots several calibration sets at one SP: one group of bars each, named."""
    import pandas as pd
    from matplotlib.container import BarContainer

    rows = [{"model": "m", "cal_dataset": "", "sp": 0.0, "method": "dense", "acc_average": 0.4, "se_average": 0.01}]
    for cal, acc in (("ptb", 0.3), ("wikitext2", 0.35)):
        for method, bump in (("constant", 0.0), ("dynamic (equal mean width (paper))", 0.02)):
            rows.append({"model": "m", "cal_dataset": cal, "sp": 0.3, "method": method, "acc_average": acc + bump,
                         "se_average": 0.01})  # fmt: skip
    fig = plots.zero_shot_bars(pd.DataFrame(rows))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ptb\n0.30", "wikitext2\n0.30"]
    bars = [p for c in ax.containers if isinstance(c, BarContainer) for p in c]
    assert sorted(round(p.get_height(), 2) for p in bars) == [0.3, 0.32, 0.35, 0.37]
    head = pd.concat([_head_and_acc(15.0, 4.0)[0].assign(cal_dataset=c) for c in ("ptb", "wikitext2")])
    text = narrative.zero_shot_text(head)
    assert "calibration ptb, SP 0.3" in text and "calibration wikitext2, SP 0.3" in text


def test_published_zero_shot_table_carries_standard_errors():
    rows = json.loads((PROJECT_ROOT / "results" / "published" / "cpu" / "zero_shot.json").read_text())
    assert all(r["se_average"] is not None and 0 < r["se_average"] < 0.1 for r in rows)
    assert all(r["se_delta_points"] > 0 for r in rows if r["method"].startswith("dynamic"))


def _executed(tmp_path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {
        "input_path": "notebooks/x.ipynb",
        "output_path": "/home/someone/repo/results/cpu/executed/x.ipynb",
        "parameters": {"root": "/scratch/run/results", "profile": "cpu"},
    }
    params = nbformat.v4.new_code_cell('root = "/scratch/run/results"\n', metadata={"tags": ["injected-parameters"]})
    cell = nbformat.v4.new_code_cell("work()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="results -> /home/someone/repo/results/cpu\n"),
        nbformat.v4.new_output("stream", name="stderr", text="LR:  50%|█████     | 1/2 [00:01<00:01]\r"),
        nbformat.v4.new_output("stream", name="stderr", text="LR: 100%|██████████| 2/2 [00:02<00:00, 1.0it/s]\n"),
        nbformat.v4.new_output("stream", name="stderr", text="\x1b[32mok\x1b[0m wrote /scratch/run/figs/a.pdf\n"),
        nbformat.v4.new_output("display_data", data={"text/markdown": "see /home/someone/repo/figures/x.pdf"}),
    ]
    nb.cells = [params, cell]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    return path


def test_executed_notebook_becomes_a_document(tmp_path):
    path = _executed(tmp_path)
    folders = {"/home/someone/repo/": "", "/scratch/run/results": "<root>", "/scratch/run/figs": "<figures>"}
    notebook.tidy_streams(path, replace=folders)
    line = notebook.provenance(
        "abc123", "2024-01-01 10:00 UTC", {"pinned": True, "isa": "AVX2", "threads": 2, "blas": "mkl"}, 41.6
    )
    notebook.add_provenance(path, line)
    notebook.add_provenance(path, line)  # once, however often
    text = path.read_text()
    for gone in ("/home/someone", "/scratch", "\\u001b", "%|", "\\r"):
        assert gone not in text, gone
    nb = nbformat.read(path, as_version=4)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert nb.cells[0].source == line
    assert "commit abc123" in line and "2024-01-01" in line and "pinned AVX2" in line and "wall time 42 s" in line
    assert 'root = "<root>"' in nb.cells[1].source
    out = nb.cells[2].outputs
    assert out[0].text == "results -> results/cpu\n"
    assert out[1].text == "ok wrote <figures>/a.pdf\n"  # the bars gone, the stderr outputs merged
    assert out[2].data["text/markdown"] == "see figures/x.pdf"
    assert nb.metadata.papermill.parameters.root == "<root>"
    assert nb.metadata.papermill.output_path == "results/cpu/executed/x.ipynb"


def test_published_executed_notebooks_are_documents():
    for profile in PUBLISHED:
        for path in sorted((PROJECT_ROOT / "results" / "published" / profile / "executed").glob("*.ipynb")):
            text = path.read_text()
            assert "\\u001b" not in text and "%|" not in text, path.name
            assert not re.search(r"(?<![\w.<])/(home|tmp|work|root|Users|scratch)/", text), path.name
            first = nbformat.read(path, as_version=4).cells[0]
            assert first.cell_type == "markdown" and first.source.startswith("*Executed ")
            assert "commit " in first.source and "numerics: pinned" in first.source and "wall time" in first.source


def test_published_figures_folder_is_owned_by_its_manifest():
    for profile in PUBLISHED:
        listing = ownership.read_manifest(FIGURES / profile, repro.FIGURES_KIND)
        assert listing is not None, profile
        assert sorted(listing) == sorted(f"{n}.pdf" for n in PUBLISHED[profile])
        assert ownership.foreign(FIGURES / profile, listing, ignore=(ownership.MANIFEST,)) == []


def _finished_run(w: Path) -> tuple[Path, Path]:
    results, figs = w / "r" / "p", w / "f" / "p"
    repro.start_run(results, "p", resume=False, figures=figs)
    (results / "runs").mkdir()
    (results / "runs" / "a.json").write_text("{}")
    figs.mkdir(parents=True, exist_ok=True)
    (figs / "headline.pdf").write_bytes(b"%PDF-1.4 new")
    repro.finish_run(results)
    return results, figs


def test_publish_puts_figures_in_their_own_folder_and_replaces_only_its_own(tmp_path):
    results, figs = _finished_run(tmp_path)
    pub, pub_figs = tmp_path / "results" / "published" / "p", tmp_path / "figures" / "p"
    repro.publish(results, figs, pub, pub_figs)
    assert (pub_figs / "headline.pdf").read_bytes() == b"%PDF-1.4 new" and not (pub / "figures").exists()
    assert ownership.read_manifest(pub_figs, repro.FIGURES_KIND) == {
        "headline.pdf": [ownership.fingerprint(pub_figs / "headline.pdf")]
    }
    (figs / "headline.pdf").write_bytes(b"%PDF-1.4 newer")
    repro.publish(results, figs, pub, pub_figs)  # again: the earlier published figures are provably ours
    assert (pub_figs / "headline.pdf").read_bytes() == b"%PDF-1.4 newer"
    (pub_figs / "paper-edit.pdf").write_bytes(b"%PDF mine")
    with pytest.raises(ValueError, match="not a figures folder dynslice published"):
        repro.publish(results, figs, pub, pub_figs)
    assert (pub_figs / "paper-edit.pdf").read_bytes() == b"%PDF mine"
    assert (pub_figs / "headline.pdf").read_bytes() == b"%PDF-1.4 newer"


def test_a_run_never_writes_into_the_published_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(repro, "FIGURES_ROOT", tmp_path / "figures")
    results, figs = _finished_run(tmp_path)
    repro.publish(results, figs, tmp_path / "pub", tmp_path / "figures" / "p")
    for figures in (tmp_path / "figures" / "p", tmp_path / "figures"):
        with pytest.raises(ValueError, match="published figures"):
            repro.start_run(tmp_path / "r2" / "p", "p", resume=False, figures=figures)
    assert repro.start_run(tmp_path / "r3" / "p", "p", resume=False, figures=tmp_path / "figures" / "runs" / "p")
