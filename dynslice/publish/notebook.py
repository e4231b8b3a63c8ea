"""The notebooks' shared setup: one import and one call (``ctx = setup(profile, root, figures, force)``).

:func:`setup` resolves the profile and the output folders, points the hub caches inside the project, makes
matplotlib embed figures inline as PNG (so executed copies render on GitHub), and returns a :class:`Notebook`
whose :meth:`~Notebook.figure` saves a figure as PDF and shows it, and whose :meth:`~Notebook.say` shows a
Markdown paragraph generated from the results.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynslice.store.outputs import atomic_write
from dynslice.store.paths import PROJECT_ROOT, configure_hf_cache

if TYPE_CHECKING:
    from dynslice.experiment.profiles import Profile


def shown(path: str | Path) -> str:
    """``path`` as the notebooks print it: relative to the repository when inside it (an executed notebook is a
    document, and the machine that ran it is nobody's business), else as given."""
    p = Path(path)
    if PROJECT_ROOT is not None:
        try:
            return p.resolve().relative_to(PROJECT_ROOT.resolve()).as_posix()
        except ValueError:
            pass
    return str(p)


def _abs(path: str | Path) -> Path:
    """``path`` itself if absolute, else relative to the repository when dynslice runs from a checkout (wherever
    Jupyter runs), else to the working directory."""
    p = Path(path)
    return p if p.is_absolute() else (PROJECT_ROOT or Path.cwd()) / p


@dataclass(frozen=True)
class Notebook:
    """Where one notebook reads and writes, for one profile."""

    profile: Profile
    root: Path  # <root>: holds <profile>/
    results: Path  # <root>/<profile>: runs/, lr/, tables/, executed/
    figures: Path  # <figures>/<profile>: the PDFs
    force: bool
    started: float = field(default_factory=time.perf_counter)

    @property
    def tables(self) -> Path:
        return self.results / "tables"

    @property
    def ppl0(self) -> str:
        """The perplexity corpus that chooses the best SB (the profile's first)."""
        return self.profile.ppl_datasets[0]

    def figure(self, fig, name: str) -> Path:
        """Save ``fig`` as ``<figures>/<name>.pdf``, show it inline (PNG) and close it; returns the PDF path.

        Saved at the figure's own size (never cropped to its contents), so that the page is exactly as wide as the
        column or text width it was drawn for (:mod:`dynslice.publish.plots`)."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        path = self.figures / f"{name}.pdf"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="pdf", metadata={"CreationDate": None}))
        display(fig)
        plt.close(fig)
        print("wrote", shown(path))
        return path

    @staticmethod
    def say(text: str) -> None:
        """Show ``text`` as a Markdown cell output."""
        from IPython.display import Markdown, display

        display(Markdown(text))

    def elapsed(self) -> str:
        return f"notebook time {time.perf_counter() - self.started:.0f} s"


def setup(
    profile: str, root: str | Path = "results", figures: str | Path = "figures/runs", force: bool = False
) -> Notebook:
    """Load ``profile``, create its output folders, and configure caches, matplotlib, seaborn and pandas."""
    configure_hf_cache()  # before anything imports datasets
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets: text bars
    for name in ("lm-eval", "lm_eval"):  # its per-call notices would repeat for every zero-shot run
        logging.getLogger(name).setLevel(logging.ERROR)
    import matplotlib
    import pandas as pd
    import seaborn as sns

    from dynslice.experiment.profiles import load_profile

    prof = load_profile(profile)
    root_dir = _abs(root)
    ctx = Notebook(
        profile=prof, root=root_dir, results=root_dir / prof.name, figures=_abs(figures) / prof.name, force=bool(force)
    )
    ctx.figures.mkdir(parents=True, exist_ok=True)
    ctx.tables.mkdir(parents=True, exist_ok=True)
    try:  # inside IPython: inline PNG figures, shown only through Notebook.figure
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        shell = get_ipython()
        if shell is not None:
            shell.run_line_magic("matplotlib", "inline")
            set_matplotlib_formats("png")
    except ImportError:
        pass
    from dynslice.publish.plots import use_style

    sns.set_theme(style="whitegrid")
    use_style()  # the figures' one style: sizes, fonts (TrueType, >= 7 pt), widths
    matplotlib.rcParams["figure.dpi"] = 110  # the inline PNG copies
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 40)
    print(f"profile {prof.name}: {prof.description}\nresults -> {shown(ctx.results)}\nfigures -> {shown(ctx.figures)}")
    return ctx


#: A progress bar's line (tqdm's ``desc: 45%|####      | 9/20 [00:03<00:04, 2.61it/s]``).
PROGRESS = re.compile(r"^.*\d+%\|.*\|\s*[\d.]+[kMG]?/[\d.?]+[kMG]?.*$")
#: Terminal escape sequences (colours, cursor moves).
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def _scrub(text: str, replace: Sequence[tuple[str, str]]) -> str:
    text = ANSI.sub("", text)
    for old, new in replace:
        text = text.replace(old, new)
    return text


def tidy_streams(path: str | Path, replace: Mapping[str, str] | None = None) -> int:
    """Rewrite an executed notebook as a document: merge consecutive stream outputs of a cell, keep of every line
    rewritten with carriage returns only its final state, drop progress bars, strip terminal escape codes, and
    replace each key of ``replace`` (absolute folders of the machine that ran it) by its value in outputs, the
    injected parameters and papermill's metadata. Returns the number of stream outputs removed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    subs = sorted((replace or {}).items(), key=lambda kv: -len(kv[0]))
    removed = 0
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.source = _scrub(cell.source, subs)
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            if (
                out.output_type == "stream"
                and outputs
                and outputs[-1].output_type == "stream"
                and outputs[-1].name == out.name
            ):
                outputs[-1].text += out.text
                removed += 1
            else:
                outputs.append(out)
        kept = []
        for out in outputs:
            if out.output_type == "stream":
                lines = (re.split(r"\r+", line.rstrip("\r"))[-1] for line in out.text.split("\n"))
                out.text = _scrub("\n".join(ln for ln in lines if not PROGRESS.match(ANSI.sub("", ln))), subs)
                if not out.text.strip():
                    removed += 1
                    continue
            elif out.output_type == "error":
                out.traceback = [_scrub(t, subs) for t in out.traceback]
                out.evalue = _scrub(out.evalue, subs)
            else:
                for mime, value in out.get("data", {}).items():
                    if mime.startswith("text/") and isinstance(value, str):
                        out.data[mime] = _scrub(value, subs)
            kept.append(out)
        cell.outputs = kept
    pm = nb.metadata.get("papermill")
    if pm is not None:
        for key in ("input_path", "output_path", "cwd"):
            if isinstance(pm.get(key), str):
                pm[key] = _scrub(pm[key], subs)
        for key, value in (pm.get("parameters") or {}).items():
            if isinstance(value, str):
                pm["parameters"][key] = _scrub(value, subs)
    atomic_write(path, nbformat.writes(nb))
    return removed


def provenance(commit: str, date: str, numerics: Mapping[str, Any] | str, wall_s: float) -> str:
    """The one-line header of an executed notebook: commit, date, numerics, wall time."""
    if not isinstance(numerics, str):
        n = numerics
        cpu = (n.get("cpu") or {}).get("name") or (n.get("cpu") or {}).get("machine") or "?"
        numerics = (
            f"{'pinned' if n.get('pinned') else 'not pinned'} {n.get('isa', '?')}, {n.get('threads', '?')} threads, "
            f"{n.get('blas', '?')}, {cpu}" + (f", GPU {n['gpu']}" if n.get("gpu") else "") + f", torch {n.get('torch')}"
        )
    return f"*Executed {date} · commit {commit} · numerics: {numerics} · wall time {wall_s:.0f} s*"


def add_provenance(path: str | Path, line: str) -> None:
    """Put ``line`` as the first cell of an executed notebook (a Markdown cell tagged ``provenance``; an earlier
    one is replaced)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if "provenance" not in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_markdown_cell(line, metadata={"tags": ["provenance"]})
    cell.pop("id", None)
    if nb.nbformat_minor >= 5:
        cell["id"] = "provenance"
    nb.cells.insert(0, cell)
    atomic_write(path, nbformat.writes(nb))


def git_commit(repo: str | Path) -> str:
    """The short commit of ``repo``, with ``+changes`` when tracked files differ from it (``unknown`` outside git)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")
