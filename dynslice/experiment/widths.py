"""Widths: the one place where SP and SB become per-layer widths, for every run, command, ablation and table.

The paper's rule ``FS_i = SB + (SP - SB)·n_i / mean(n)`` and its budgets live in the core
(:func:`dynslice.core.allocate.allocate`); this module applies it to a :class:`~dynslice.experiment.config.RunConfig`
(its SP, SB, budget, count and rounding) and an LR record, checking that the record fits the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from dynslice.core.allocate import Allocation, allocate
from dynslice.core.params import ArchDims
from dynslice.experiment.config import RunConfig
from dynslice.store.records import LRInput, lr_input


def allocation(
    cfg: RunConfig, dims: ArchDims | int, lr: LRInput | dict | None = None, *, sb: float | None = None
) -> Allocation:
    """Step 2, the one place where SP and SB become widths: ``FS_i = SB + (SP - SB)·n_i / mean(n)``
    (:func:`dynslice.core.allocate.allocate`) with ``cfg``'s budget, count and rounding.

    ``dims``: the architecture (or just the dense width ``D`` for the width budget). ``lr``: an LR record
    (:func:`lr_record`) or a validated LR input; constant slicing (``SB = SP``) needs none. ``sb``: the slicing
    base when it is not ``cfg.sb`` (an automatic search's pick, or a value tried).
    """
    sb = cfg.sb if sb is None else sb
    arch = dims if isinstance(dims, ArchDims) else None
    hidden = arch.hidden if arch is not None else int(dims)
    if lr is None:
        if sb != cfg.sp:
            raise ValueError(f"lr: dynamic widths (sb {sb} < sp {cfg.sp}) need LR scores; constant slicing needs none")
        if arch is None:
            raise ValueError("model: constant widths without LR scores need the architecture (its layer count)")
        scores: Sequence[float] = list(range(arch.layers))  # SB = SP gives FS_i = SP whatever the scores are
    else:
        inp = lr if isinstance(lr, LRInput) else lr_input(lr)
        if inp.hidden not in (None, hidden):
            raise ValueError(f"lr: the scores were computed for width {inp.hidden}, but the model has {hidden}")
        scores = inp.redundancy
    return allocate(
        scores,
        cfg.sp,
        sb,
        hidden,
        round_interval=cfg.round_interval,
        budget=cfg.budget,
        dims=arch,
        count=cfg.count,
        rounding=cfg.rounding,
        num_layers=arch.layers if arch is not None else None,
    )


def dims_of(
    lr: LRInput, *, model: str | None = None, hidden: int | None = None, budget: str = "width"
) -> ArchDims | int:
    """What :func:`allocation` needs of the model for an LR file: the architecture of ``model`` (read from its
    config, no weights), else the dense width ``hidden`` or the one the file records, which must all agree."""
    from dynslice.store.models import config_of

    dims = ArchDims.from_config(config_of(model)) if model is not None else None
    if dims is None and budget == "params":
        raise ValueError("model: --budget params needs --model to count parameters")
    sources = {"--model": dims.hidden if dims else None, "--hidden": hidden, "the LR file": lr.hidden}
    given = {k: v for k, v in sources.items() if v is not None}
    if len(set(given.values())) > 1:
        detail = ", ".join(f"{k} ({v})" for k, v in given.items())
        raise ValueError(f"hidden: the dense width disagrees between {detail}")
    if not given:
        raise ValueError("hidden: the LR file records no dense width (hidden); pass --model or --hidden")
    return dims if dims is not None else next(iter(given.values()))
