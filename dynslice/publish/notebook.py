"""The notebooks' shared setup: one import and one call (``ctx = setup(profile, root, figures, force)``).

:func:`setup` resolves the profile and the output folders, points the hub caches inside the project, makes
matplotlib embed figures inline as PNG (so executed copies render on GitHub), and returns a :class:`Notebook`
whose :meth:`~Notebook.figure` saves a figure as PDF and shows it, and whose :meth:`~Notebook.say` shows a
Markdown paragraph generated from the results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dynslice.store.outputs import atomic_write
from dynslice.store.paths import PROJECT_ROOT, configure_hf_cache

if TYPE_CHECKING:
    from dynslice.experiment.profiles import Profile


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
        """Save ``fig`` as ``<figures>/<name>.pdf``, show it inline (PNG) and close it; returns the PDF path."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        path = self.figures / f"{name}.pdf"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="pdf", bbox_inches="tight"))
        display(fig)
        plt.close(fig)
        print("wrote", path)
        return path

    @staticmethod
    def say(text: str) -> None:
        """Show ``text`` as a Markdown cell output."""
        from IPython.display import Markdown, display

        display(Markdown(text))

    def elapsed(self) -> str:
        return f"notebook time {time.perf_counter() - self.started:.0f} s"


def setup(profile: str, root: str | Path = "results", figures: str | Path = "figures", force: bool = False) -> Notebook:
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
    sns.set_theme(style="whitegrid", context="paper")
    matplotlib.rcParams.update(
        {
            "pdf.fonttype": 42,
            "ps.fonttype": 42,
            "figure.dpi": 80,  # TrueType in PDFs
            "savefig.dpi": 110,
        }
    )
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 40)
    print(f"profile {prof.name}: {prof.description}\nresults -> {ctx.results}\nfigures -> {ctx.figures}")
    return ctx


def tidy_streams(path: str | Path) -> int:
    """Rewrite an executed notebook so that progress bars leave one line each: merge consecutive stream outputs
    of a cell and keep, of every line rewritten with carriage returns, only its final state. Returns the number
    of stream outputs removed."""
    import re

    import nbformat

    nb = nbformat.read(path, as_version=4)
    removed = 0
    for cell in nb.cells:
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
        for out in outputs:
            if out.output_type == "stream":
                out.text = "\n".join(re.split(r"\r+", line.rstrip("\r"))[-1] for line in out.text.split("\n"))
        cell.outputs = outputs
    atomic_write(path, nbformat.writes(nb))
    return removed
