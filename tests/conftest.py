"""Shared fixtures: tiny random models of every supported architecture, and the embedded SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that wait passively, as run_all.sh sets for its runs: with busy-waiting (the default) torch's
# multi-threaded eigh slows down many times over as soon as another process holds a core. Before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest
import torch

from dynslice.store.paths import configure_hf_cache

configure_hf_cache()

#: The default selection (``addopts`` in pyproject.toml): the fast tier. ``./run_all.sh --test --all`` (``-m "not
#: bench"``) adds the slow tier; ``-m bench`` runs the measurements.
FAST_TIER = "not slow and not bench"
TIER_MARKS = ("slow", "bench")


def _named_ids(config: pytest.Config) -> list[str]:
    """The command line's test ids (``file.py::name...``), as node ids relative to the rootdir."""
    rootdir = Path(config.rootpath)
    where = Path(config.invocation_params.dir)
    ids = []
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        if not sep:
            continue
        full = (where / path).resolve()
        rel = full.relative_to(rootdir).as_posix() if full.is_relative_to(rootdir) else path
        ids.append(f"{rel}::{rest}")
    return ids


def pytest_configure(config: pytest.Config) -> None:
    """A test named by its id on the command line runs whatever its tier: the default tier selection then applies
    only to the tests that were not named (an explicit ``-m`` is left as it is)."""
    config._dynslice_named = []  # type: ignore[attr-defined]
    if config.option.markexpr == FAST_TIER:
        named = _named_ids(config)
        if named:
            config._dynslice_named = named  # type: ignore[attr-defined]
            config.option.markexpr = ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    named = getattr(config, "_dynslice_named", [])
    if not named:
        return

    def was_named(item: pytest.Item) -> bool:
        return any(item.nodeid == n or item.nodeid.startswith((f"{n}[", f"{n}::")) for n in named)

    keep, drop = [], []
    for item in items:
        tiered = any(item.get_closest_marker(m) is not None for m in TIER_MARKS)
        (drop if tiered and not was_named(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


TINY_ARCHS = ("llama", "mistral", "qwen2")


def make_tiny_model(
    arch: str = "llama", *, tied: bool = True, vocab: int = 96, seed: int = 0, hidden: int = 48, layers: int = 3
):
    """A randomly initialised, tiny causal LM of ``arch`` (llama, mistral, qwen2 or qwen3), built offline, in fp32.

    Norm weights are randomised too, so that folding them is actually exercised. The qwen3 model's heads are
    16 wide, so its attention width (96) differs from the hidden size, as in real Qwen3 models.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[arch]
    extra = {"mistral": {"sliding_window": 4096}, "qwen3": {"head_dim": 16}}.get(arch, {})
    cfg = cfg_cls(**common, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:  # biases (qwen2)
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    return model


def make_batch(
    vocab: int = 96, n: int = 6, seqlen: int = 24, seed: int = 1, pad_id: int = 0, padded: bool = True
) -> dict[str, torch.Tensor]:
    """Random token ids with right padding on some rows (attention_mask marks real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seqlen), generator=g)
    mask = torch.ones(n, seqlen, dtype=torch.long)
    if padded:
        for row in range(1, n, 2):
            keep = int(torch.randint(seqlen // 3, seqlen, (1,), generator=g))
            mask[row, keep:] = 0
            ids[row, keep:] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smol():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M, fp32 on CPU. Loaded once per session."""
    from dynslice.store.models import load

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load("smollm2-135m", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer alone."""
    from dynslice.store.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session", autouse=True)
def embedded_tokenizer_read_once():
    """The embedded SmolLM2 tokenizer (also tiny-random's) is read from its GGUF file once per session, not once per
    command: converting the GGUF vocabulary takes seconds each time, and the CLI tests load it dozens of times.
    Every call still goes through :func:`dynslice.store.models.load_tokenizer` and gets its own copy."""
    import copy

    from dynslice.store import models

    real = models.load_tokenizer
    cache: dict[str, object] = {}

    def load_tokenizer(spec: str):
        if spec != models.EMBEDDED_DEFAULT:
            return real(spec)
        if spec not in cache:
            cache[spec] = real(spec)
        return copy.deepcopy(cache[spec])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_tokenizer", load_tokenizer)
        yield


# ------------------------------------------------------------------------------------ the smoke profile, once
def run_notebooks_in_process(profile: str, root: Path, figures: Path) -> list[str]:
    """Execute the code cells of every notebook of ``profile`` in this process, in order, with the parameters that
    run_all.sh would inject (no kernel, no papermill): the same calls, covered and debuggable here. Returns the
    names of the notebooks run."""
    import warnings

    import matplotlib
    import nbformat
    import pandas as pd
    from IPython.display import display

    from dynslice.experiment.profiles import load_profile
    from dynslice.store.paths import PROJECT_ROOT

    prof = load_profile(profile)
    ran = []
    for path in sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if not prof.runs_notebook(path.stem):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nbformat: cells without ids
            nb = nbformat.read(path, as_version=4)
        scope = {"display": display}
        with matplotlib.rc_context(), pd.option_context("display.width", 80):
            for cell in nb.cells:
                if cell.cell_type != "code":
                    continue
                exec(compile(cell.source, path.name, "exec"), scope)
                if "parameters" in cell.metadata.get("tags", []):
                    scope.update(profile=profile, root=str(root), figures=str(figures), force=False)
        ran.append(path.stem)
    return ran


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(results, figures)`` of the smoke profile, run once per session in this process the way run_all.sh runs
    it: the run marker and its ledger (``python -m dynslice.publish.repro start``), ``dynslice sweep`` through
    :func:`dynslice.cli.main` (every run, sweep then zero-shot), the notebooks' code (LR curves, tables, figures,
    ablations; the runs are found finished), then the marker set to finished. Not pinned (the pins act only before
    torch starts): the slow tier runs run_all.sh itself. Shared: copy it before changing anything."""
    from dynslice.cli import main
    from dynslice.publish import repro
    from dynslice.store import ownership
    from dynslice.store.paths import PROJECT_ROOT

    base = tmp_path_factory.mktemp("smoke_run")
    root, figures = base / "results", base / "figures"
    results, figs = root / "smoke", figures / "smoke"
    results.mkdir(parents=True)
    figs.mkdir(parents=True)
    assert repro.main(["start", str(results), "smoke", "--figures", str(figs)]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ownership.LEDGER_ENV, str(repro.ledger_of(results)))
        mp.setenv("TQDM_DISABLE", "1")
        assert main(["sweep", "--profile", "smoke", "--root", str(root)]) == 0
        ran = run_notebooks_in_process("smoke", root, figures)
    assert ran == sorted(p.stem for p in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ran
    assert repro.main(["finish", str(results)]) == 0
    return results, figs
