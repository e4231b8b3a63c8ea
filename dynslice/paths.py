"""Where dynslice keeps caches, and the hub caches pointed inside them."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """The project's cache folder: ``$DYNSLICE_CACHE`` or ``<project>/.cache``; created on first use."""
    root = Path(os.environ.get("DYNSLICE_CACHE", PROJECT_ROOT / ".cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def configure_hf_cache() -> Path:
    """Point ``HF_HOME`` and the datasets cache inside :func:`cache_dir` unless the user already set them.

    Call this before the first import of ``datasets`` (the CLI and the notebooks do). Returns the HF home.
    """
    hf_home = cache_dir() / "huggingface"
    os.environ.setdefault("HF_HOME", str(hf_home))
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["HF_HOME"]) / "datasets"))
    return Path(os.environ["HF_HOME"])
