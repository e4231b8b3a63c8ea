"""The ablation settings of a profile (``profiles/ablations/06_ablations.yaml``, notebook 06): one frozen
:class:`AblationConfig` per profile section, read by the ablation runner and by the tables and figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dynslice.core.checks import check_int
from dynslice.experiment.config import RunConfig

SCORE_METHODS = ("lr", "first_layer", "shuffled", "inverted", "bi", "angular")
METHODS = ("dense", "constant") + SCORE_METHODS + ("shortgpt",)
BUDGETS = ("params", "width")
RECORD_VERSION = 1


@dataclass(frozen=True)
class AblationConfig:
    """Everything the ablation experiment depends on (same config and arithmetic -> same JSON, timings aside)."""

    model: str = "smollm2-135m"
    dtype: str = "fp32"
    device: str = "cpu"
    cal_dataset: str = "wiki"
    cal_nsamples: int = 16  # calibration windows per seed (also the LR batch of that seed)
    cal_seqlen: int = 256
    window_seed: int = 42  # seeds the one permutation of train chunks that every seed takes its share of
    seeds: int = 3  # calibration sets with pairwise disjoint windows (constant and lr)
    sp: tuple[float, ...] = (0.3,)
    sb: float = 0.0  # slicing base of every dynamic method (the best SB of the CPU sweep)
    budgets: tuple[str, ...] = BUDGETS
    seed_budgets: tuple[str, ...] = ("params",)  # budgets at which lr is repeated over the seeds
    permutations: int = 5
    permutation_seed: int = 0
    round_interval: int = 8
    ppl_datasets: tuple[str, ...] = ("wiki", "news")
    ppl_seqlen: int = 256
    ppl_max_chunks: int = 16
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    task_methods: tuple[str, ...] = ("dense", "constant", "lr", "first_layer", "shortgpt")
    task_budgets: tuple[str, ...] = ("params",)
    batch_size: int = 8
    bootstrap: int = 2000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (
            ("cal_nsamples", 1),
            ("cal_seqlen", 2),
            ("seeds", 1),
            ("permutations", 1),
            ("round_interval", 1),
            ("ppl_seqlen", 2),
            ("ppl_max_chunks", 1),
            ("batch_size", 1),
            ("bootstrap", 100),
        ):
            check_int(name, getattr(self, name), low)
        if not self.sp or any(not 0 < s < 1 for s in self.sp):
            raise ValueError(f"sp: {self.sp!r} must be a non-empty list of values with 0 < sp < 1")
        if any(not 0 <= self.sb < s for s in self.sp):
            raise ValueError(f"sb: {self.sb!r} is outside 0 <= sb < sp for sp in {list(self.sp)}")
        for name, allowed in (
            ("budgets", BUDGETS),
            ("seed_budgets", BUDGETS),
            ("task_budgets", BUDGETS),
            ("task_methods", METHODS),
        ):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: {bad} not in {list(allowed)}")
        if not self.ppl_datasets:
            raise ValueError("ppl_datasets: needs at least one dataset")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> AblationConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"ablations: unknown key(s) {unknown}; allowed: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})

    def run_config(self, sp: float) -> RunConfig:
        """The run configuration of this experiment's slicings at ``sp`` (SB = SP; each job passes its own SB and
        budget to the run's steps), so that ablations go through the same allocation and slicing as every run."""
        return RunConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            seed=self.window_seed,
            sp=sp,
            sb=sp,
            round_interval=self.round_interval,
            rounding="total",
            cal_dataset=self.cal_dataset,
            cal_nsamples=self.cal_nsamples,
            cal_seqlen=self.cal_seqlen,
            embedding_mean=False,
            batch_size=self.batch_size,
            ppl_datasets=self.ppl_datasets,
            ppl_seqlen=self.ppl_seqlen,
            ppl_max_chunks=self.ppl_max_chunks,
            tasks=self.tasks,
            task_limit=self.task_limit,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def settings_path() -> Path:
    """``dynslice/experiment/profiles/ablations/06_ablations.yaml`` (package data): the ablation settings of each
    profile
    (notebook 06)."""
    from importlib import resources

    return Path(str(resources.files("dynslice.experiment.profiles").joinpath("ablations", "06_ablations.yaml")))


def load_config(path: str | Path, profile: str) -> AblationConfig | None:
    """The ``profile`` section of an ablations YAML (``None`` when the profile has none)."""
    import yaml

    obj = yaml.safe_load(Path(path).read_text()) or {}
    section = obj.get(profile)
    return None if section is None else AblationConfig.from_dict(section)
