"""One frozen configuration object per run; it is the run record's ``config`` and its identity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

AUTO = "auto"


@dataclass(frozen=True)
class RunConfig:
    """Every input of one ``dynslice run``: model -> LR -> widths -> slicing -> perplexity + zero-shot.

    ``sp = 0`` evaluates the dense model (no LR, no slicing). ``sb = "auto"`` searches the slicing base on held-out
    calibration chunks. Two runs with equal configs produce the same JSON (timings aside).

    ``protocol`` (``dynslice`` or ``reference``, see :mod:`dynslice.protocol`) fills every setting left at
    ``None`` among :data:`dynslice.protocol.SETTINGS`; a value given explicitly always wins.
    """

    model: str = "smollm2-135m"
    protocol: str = "dynslice"
    dtype: str | None = None
    device: str = "cpu"
    seed: int = 42
    # allocation
    sp: float = 0.3
    sb: float | str = 0.3
    budget: str = "width"
    count: str = "total"
    round_interval: int | None = None
    rounding: str | None = None
    # LR score
    lr_metric: str = "cosine"
    lr_dataset: str = "wiki"
    lr_split: str | None = None
    lr_sampler: str | None = None
    lr_nsamples: int | None = 32
    lr_seqlen: int | None = None
    lr_stride: int | None = None
    lr_last_layer: str | None = None
    # calibration and folding
    cal_dataset: str = "wiki"
    cal_sampler: str | None = None
    cal_nsamples: int = 32
    cal_seqlen: int = 512
    embedding_mean: bool | None = None
    batch_size: int = 8
    # automatic SB
    auto_sb_step: float = 0.02
    auto_sb_max_evals: int | None = None
    auto_sb_nsamples: int = 8
    # evaluation
    ppl_datasets: tuple[str, ...] = ("wiki",)
    ppl_protocol: str | None = None
    ppl_seqlen: int = 512
    ppl_max_chunks: int | None = None
    ppl_nsamples: int | None = None
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    # output
    save_dir: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        from dynslice.protocol import PROTOCOLS, defaults

        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        for name, value in defaults(self.protocol).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("ppl_datasets", "tasks"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        self.validate()

    @property
    def dense(self) -> bool:
        return self.sp == 0

    @property
    def auto_sb(self) -> bool:
        return self.sb == AUTO

    def validate(self) -> None:
        """Check every field, raising ``ValueError`` that names the field and its allowed range."""
        from dynslice.core.allocate import BUDGETS, COUNTS, ROUNDINGS
        from dynslice.core.lr import LAST_LAYER, METRICS
        from dynslice.data import ALL_DATASETS, SPLITS
        from dynslice.evaluate import PROTOCOLS
        from dynslice.models import DTYPES

        def check_int(name: str, low: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: {v!r} must be an integer >= {low}")

        def check_choice(name: str, choices) -> None:
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")

        if not isinstance(self.sp, int | float) or isinstance(self.sp, bool) or not 0 <= self.sp < 1:
            raise ValueError(f"sp: {self.sp!r} is outside 0 <= sp < 1 (0 means the dense model)")
        if self.sb != AUTO:
            if not isinstance(self.sb, int | float) or isinstance(self.sb, bool) or not 0 <= self.sb <= self.sp:
                raise ValueError(f"sb: {self.sb!r} is outside 0 <= sb <= sp ({self.sp}), or use 'auto'")
        check_choice("dtype", tuple(DTYPES))
        check_choice("budget", BUDGETS)
        check_choice("count", COUNTS)
        check_choice("rounding", ROUNDINGS)
        check_choice("lr_metric", METRICS)
        check_choice("ppl_protocol", PROTOCOLS)
        check_choice("lr_split", SPLITS)
        check_choice("lr_sampler", ("random", "sliding"))
        check_choice("lr_last_layer", LAST_LAYER)
        check_choice("cal_sampler", ("windows", "documents"))
        if not isinstance(self.embedding_mean, bool):
            raise ValueError(f"embedding_mean: {self.embedding_mean!r} must be true or false")
        if self.lr_sampler == "sliding":
            check_int("lr_stride", 1)
            check_int("lr_nsamples", 1, optional=True)
        else:
            check_int("lr_nsamples", 1)
        for name in ("lr_dataset", "cal_dataset"):
            check_choice(name, ALL_DATASETS)
        for ds in self.ppl_datasets:
            if ds not in ALL_DATASETS:
                raise ValueError(f"ppl_datasets: {ds!r} is not one of {', '.join(ALL_DATASETS)}")
        check_int("seed", 0)
        check_int("round_interval", 1)
        for name in ("cal_nsamples", "batch_size", "auto_sb_nsamples"):
            check_int(name, 1)
        for name in ("lr_seqlen", "cal_seqlen", "ppl_seqlen"):
            check_int(name, 2)
        check_int("ppl_max_chunks", 1, optional=True)
        check_int("ppl_nsamples", 1, optional=True)
        check_int("task_limit", 1, optional=True)
        check_int("auto_sb_max_evals", 1, optional=True)
        if self.ppl_protocol == "paper" and self.ppl_nsamples is None:
            raise ValueError("ppl_nsamples: the 'paper' protocol needs ppl_nsamples >= 1")
        if not 0 < self.auto_sb_step < 1:
            raise ValueError(f"auto_sb_step: {self.auto_sb_step!r} is outside 0 < step < 1")
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device: {self.device!r} is not cpu or cuda[:N]")

    def to_json(self) -> dict[str, Any]:
        """The fields that define the run (``save_dir`` excluded)."""
        d = dataclasses.asdict(self)
        d.pop("save_dir")
        d["ppl_datasets"] = list(self.ppl_datasets)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**obj)

    def key(self) -> str:
        """A short stable hash of :meth:`to_json`, used in result file names."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
