"""The frontier settings of a profile (``frontier:`` in ``profiles/frontier.yaml``, notebook 07): one frozen
:class:`FrontierConfig`, read by the frontier runner and by its tables and figures. The profile's ``rft:`` section is
a :class:`dynslice.experiment.finetune.FinetuneConfig`, key for key."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from dynslice.core.checks import check_int
from dynslice.experiment.config import DATASETS, RunConfig

#: The compression methods of the frontier, in the order they are drawn.
METHODS = ("constant", "lr", "shortgpt", "delete_slice")
LABELS = {
    "constant": "constant slicing (SliceGPT)",
    "lr": "LR-dynamic slicing (best SB)",
    "shortgpt": "ShortGPT (delete layers)",
    "delete_slice": "LR deletion + slicing",
}
#: Which points get the zero-shot tasks (seed 0, after RFT): every method at every size, or each size's winner.
TASK_POINTS = ("all", "winners")
RECORD_VERSION = 1


@dataclass(frozen=True)
class FrontierConfig:
    """Everything the frontier experiment depends on besides RFT (same config -> same points, timings aside).

    Sizes are given as numbers of whole decoder layers (``sizes``): deletion is the coarsest method, so the target
    of each size is the parameter count of the model with that many layers deleted, and every slicing method takes
    the SP whose parameter count is closest to it (embeddings, head and shortcut matrices counted).
    """

    model: str = "smollm2-135m"
    dtype: str = "fp32"
    device: str = "cpu"
    sizes: tuple[int, ...] = (1, 4, 8, 11)  # layers deleted by ShortGPT; the target size of each point
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)  # calibration (and LR) sampler seeds: the error bars
    cal_dataset: str = "wiki"
    cal_nsamples: int = 8  # calibration windows per seed (also the LR windows)
    cal_seqlen: int = 256
    round_interval: int = 8  # widths are multiples of it
    sb_step: float = 0.1  # SB grid step of the held-out search of LR-dynamic slicing's best SB
    sb_max_evals: int = 3  # slicings that search may make per size (on the first seed; the others reuse its SB)
    sb_nsamples: int = 8  # held-out calibration chunks scoring each SB (never the evaluation split)
    delete_share: float = 0.5  # delete_slice deletes ceil(share x size) highest-LR layers and slices the rest
    ppl_datasets: tuple[str, ...] = ("wiki", "news")
    ppl_seqlen: int = 256
    ppl_max_chunks: int = 8
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    task_points: str = "winners"
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name, low in (
            ("cal_nsamples", 1),
            ("cal_seqlen", 2),
            ("round_interval", 1),
            ("sb_max_evals", 1),
            ("sb_nsamples", 1),
            ("ppl_seqlen", 2),
            ("ppl_max_chunks", 1),
            ("batch_size", 1),
        ):
            check_int(name, getattr(self, name), low)
        if not self.sizes or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes: {list(self.sizes)} must be a non-empty list of distinct layer counts >= 1")
        for k in self.sizes:
            check_int("sizes[]", k, 1, allowed="a number of decoder layers >= 1")
        if (
            not self.methods
            or any(m not in METHODS for m in self.methods)
            or len(set(self.methods)) != len(self.methods)
        ):
            raise ValueError(f"methods: {list(self.methods)} must be distinct names from {list(METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {list(self.seeds)} must be a non-empty list of distinct seeds >= 0")
        for s in self.seeds:
            check_int("seeds[]", s, 0, 2**32 - 1)
        if isinstance(self.sb_step, bool) or not isinstance(self.sb_step, int | float) or not 1e-3 <= self.sb_step < 1:
            raise ValueError(f"sb_step: {self.sb_step!r} is outside 0.001 <= sb_step < 1")
        ok = isinstance(self.delete_share, int | float) and not isinstance(self.delete_share, bool)
        if not ok or not 0 < self.delete_share < 1:
            raise ValueError(f"delete_share: {self.delete_share!r} is outside 0 < delete_share < 1")
        bad = [d for d in (*self.ppl_datasets, self.cal_dataset) if d not in DATASETS]
        if not self.ppl_datasets or bad:
            raise ValueError(f"ppl_datasets/cal_dataset: {bad or '[]'} must be names from {list(DATASETS)}")
        if self.task_points not in TASK_POINTS:
            raise ValueError(f"task_points: {self.task_points!r} is not one of {', '.join(TASK_POINTS)}")
        if self.task_limit is not None:
            check_int("task_limit", self.task_limit, 1)
        self.run_config(0)  # the rules between fields, with RunConfig's own messages

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "frontier") -> FrontierConfig:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: expected a mapping of frontier settings, got {type(obj).__name__}")  # noqa: TRY004
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(names))})")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.{e}") from None

    def delete_count(self, size: int) -> int:
        """Layers that ``delete_slice`` deletes at ``size``: ``ceil(delete_share x size)``, at most ``size - 1``
        when ``size > 1`` (so that slicing always does part of the work)."""
        k = math.ceil(self.delete_share * size - 1e-9)
        return max(1, min(k, size - 1)) if size > 1 else 1

    def run_config(self, seed: int, sp: float = 0.3, sb: float | None = None, **changes: Any) -> RunConfig:
        """The run configuration of one slicing of this experiment (``seed``: its calibration and LR windows), so that
        every frontier point goes through the same LR, allocation, slicing and evaluation steps as every run."""
        return RunConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            seed=seed,
            sp=sp,
            sb=sp if sb is None else sb,
            budget="params",
            round_interval=self.round_interval,
            rounding="total",
            cal_dataset=self.cal_dataset,
            cal_nsamples=self.cal_nsamples,
            cal_seqlen=self.cal_seqlen,
            lr_dataset=self.cal_dataset,
            lr_split="train",
            lr_sampler="random",
            lr_nsamples=self.cal_nsamples,
            lr_seqlen=self.cal_seqlen,
            embedding_mean=False,
            batch_size=self.batch_size,
            auto_sb_step=self.sb_step,
            auto_sb_max_evals=self.sb_max_evals,
            auto_sb_nsamples=self.sb_nsamples,
            ppl_datasets=self.ppl_datasets,
            ppl_seqlen=self.ppl_seqlen,
            ppl_max_chunks=self.ppl_max_chunks,
            **changes,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def parse_sections(name: str, top: Mapping[str, Any]) -> tuple[FrontierConfig | None, Any]:
    """A profile's ``frontier:`` and ``rft:`` sections, checked (``None`` where absent); errors name the key,
    e.g. ``frontier.frontier.sizes`` or ``frontier.rft.steps``."""
    from dynslice.experiment.finetune import FinetuneConfig

    frontier = None if top.get("frontier") is None else FrontierConfig.from_dict(top["frontier"], f"{name}.frontier")
    rft = None if top.get("rft") is None else FinetuneConfig.from_mapping(f"{name}.rft", top["rft"])
    if frontier is not None and rft is None:
        raise ValueError(f"{name}.rft: a frontier: section needs an rft: section (the recovery fine-tuning)")
    return frontier, rft
