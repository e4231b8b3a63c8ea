"""Where dynslice keeps caches, and the hub caches pointed inside them."""

from __future__ import annotations

import os
from pathlib import Path


def _checkout() -> Path | None:
    """The repository this package runs from (an editable install or ``PYTHONPATH``), or ``None`` when installed."""
    root = Path(__file__).resolve().parents[2]  # <root>/dynslice/store/paths.py
    return root if (root / "pyproject.toml").is_file() and (root / "run_all.sh").is_file() else None


#: The repository checkout holding the package, or ``None`` for an installed package (no notebooks, no results).
PROJECT_ROOT: Path | None = _checkout()


def cache_dir() -> Path:
    """The project's cache folder, created on first use: ``$DYNSLICE_CACHE``, else ``<checkout>/.cache``, else
    ``$XDG_CACHE_HOME/dynslice`` (``~/.cache/dynslice``) for an installed package."""
    if os.environ.get("DYNSLICE_CACHE"):
        root, source = Path(os.environ["DYNSLICE_CACHE"]), "DYNSLICE_CACHE"
    elif PROJECT_ROOT is not None:
        root, source = PROJECT_ROOT / ".cache", "the checkout's .cache"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dynslice"
        source = "XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "~/.cache/dynslice"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ValueError(
            f"{source}: {str(root)!r} cannot be used as dynslice's cache folder ({why}); set "
            "DYNSLICE_CACHE to a writable folder"
        ) from None
    return root


def configure_hf_cache() -> Path:
    """Point ``HF_HOME`` and the datasets cache inside :func:`cache_dir` unless the user already set them.

    Call this before the first import of ``datasets`` (the CLI and the notebooks do). Returns the HF home.
    """
    hf_home = cache_dir() / "huggingface"
    os.environ.setdefault("HF_HOME", str(hf_home))
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["HF_HOME"]) / "datasets"))
    return Path(os.environ["HF_HOME"])
