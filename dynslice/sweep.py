"""Profiles (``configs/<name>.yaml``) -> the list of runs of an experiment, their result paths, and running them.

A profile names the models, the calibration corpora, the SP values and the SB grid. :func:`sweep_configs` expands
it into :class:`~dynslice.config.RunConfig` objects:

* one dense baseline per model (``sp = 0``), with the zero-shot tasks;
* per model × calibration corpus × SP: constant slicing (``SB = SP``, with the zero-shot tasks), dynamic slicing
  at every ``SB`` of ``sb_grid(SP, sb_step)`` below ``SP`` under each budget (``width``: the paper's equal mean
  width; ``params``: equal parameter count), and one automatic-SB run per budget when ``auto_sb`` is on.

:func:`zero_shot_configs` adds the zero-shot runs of the best dynamic SB (lowest perplexity on the first
perplexity corpus) once the sweep is done. Every run has a stable path
``<root>/<profile>/runs/<model-slug>/<readable-name>-<cfg.key()>.json``; :func:`run_sweep` runs what is missing.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from dynslice.config import AUTO, RunConfig
from dynslice.jsonio import read_json, write_json
from dynslice.search import best_sb_key

PROFILE_DIR = Path(__file__).resolve().parents[1] / "configs"
#: RunConfig fields a profile sets through its own keys (models, cal_datasets, sp, budgets, ...), not ``base``.
SWEPT_FIELDS = frozenset({"model", "dtype", "device", "sp", "sb", "budget", "cal_dataset", "tasks", "task_limit",
                          "save_dir"})
TOP_KEYS = frozenset({"name", "description", "models", "base", "cal_datasets", "lr_datasets", "sp", "sb_step",
                      "budgets", "auto_sb", "zero_shot", "notebooks"})
MODEL_KEYS = frozenset({"spec", "dtype", "device"})
AUTO_KEYS = frozenset({"step", "max_evals", "nsamples", "budgets"})
ZERO_SHOT_KEYS = frozenset({"tasks", "limit", "budgets"})


@dataclass(frozen=True)
class ModelEntry:
    """One model of a profile: its spec and where it runs."""

    spec: str
    dtype: str = "fp32"
    device: str = "cpu"

    @property
    def slug(self) -> str:
        return slug(self.spec)


@dataclass(frozen=True)
class Profile:
    """A validated profile: everything :func:`sweep_configs` needs."""

    name: str
    models: tuple[ModelEntry, ...]
    base: tuple[tuple[str, Any], ...]  # RunConfig fields shared by every run (sorted (key, value) pairs)
    cal_datasets: tuple[str, ...]
    lr_datasets: tuple[str, ...]
    sp: tuple[float, ...]
    sb_step: float
    budgets: tuple[str, ...]
    auto_sb: bool
    auto_sb_step: float
    auto_sb_max_evals: int | None
    auto_sb_nsamples: int
    auto_sb_budgets: tuple[str, ...]
    tasks: tuple[str, ...]
    task_limit: int | None
    zero_shot_budgets: tuple[str, ...]
    description: str = ""
    notebooks: tuple[str, ...] = ()  # the notebooks run_all.sh runs, as two-digit prefixes ("01"); () = all

    def runs_notebook(self, name: str) -> bool:
        """Whether run_all.sh runs ``notebooks/<name>.ipynb`` (e.g. ``06_ablations``) for this profile."""
        return not self.notebooks or name[:2] in self.notebooks

    def base_config(self, model: ModelEntry, **changes: Any) -> RunConfig:
        """A RunConfig with the profile's shared fields for ``model``, then ``changes``."""
        kw = dict(self.base)
        kw.update(model=model.spec, dtype=model.dtype, device=model.device, auto_sb_step=self.auto_sb_step,
                  auto_sb_max_evals=self.auto_sb_max_evals, auto_sb_nsamples=self.auto_sb_nsamples)
        kw.update(changes)
        return RunConfig(**kw)

    @property
    def ppl_datasets(self) -> tuple[str, ...]:
        return tuple(dict(self.base).get("ppl_datasets", RunConfig.ppl_datasets))


def slug(text: str) -> str:
    """A file-name-safe form of a model spec: ``meta-llama/Meta-Llama-3-8B`` -> ``meta-llama--Meta-Llama-3-8B``."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip("-.")
    if not out:
        raise ValueError(f"model: {text!r} gives an empty file name")
    return out


# ------------------------------------------------------------------------------------------------ profile loading
def profile_path(name_or_path: str | Path) -> Path:
    """``configs/<name>.yaml`` for a profile name, or the path itself when it names a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return PROFILE_DIR / f"{name_or_path}.yaml"


def _check_keys(where: str, obj: Any, allowed: frozenset[str]) -> dict:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
    return dict(obj)


def _fraction_list(where: str, value: Any) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
            raise ValueError(f"{where}: {v!r} is outside 0 < sp < 1")
        out.append(float(v))
    if not out:
        raise ValueError(f"{where}: needs at least one value")
    return tuple(out)


def _str_list(where: str, value: Any, allowed: Sequence[str] | None = None, empty_ok: bool = False) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or (not values and not empty_ok):
        raise ValueError(f"{where}: expected a non-empty list of names, got {value!r}")
    for v in values:
        if not isinstance(v, str) or (allowed is not None and v not in allowed):
            raise ValueError(f"{where}: {v!r} is not one of {', '.join(allowed or ())}")
    return tuple(values)


def _notebook_list(where: str, value: Any) -> tuple[str, ...]:
    """Two-digit notebook prefixes (``["01", "06"]``, ints accepted), each naming a file notebooks/NN_*.ipynb."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of two-digit notebook numbers such as ['01', '06']")  # noqa: TRY004
    out = []
    for v in value:
        nn = f"{v:02d}" if isinstance(v, int) and not isinstance(v, bool) else v
        if not isinstance(nn, str) or not re.fullmatch(r"\d\d", nn) \
                or not any((PROFILE_DIR.parent / "notebooks").glob(f"{nn}_*.ipynb")):
            raise ValueError(f"{where}: {v!r} is not the number of a notebook notebooks/NN_*.ipynb")
        out.append(nn)
    return tuple(sorted(set(out)))


def parse_profile(obj: Mapping[str, Any], name: str) -> Profile:
    """Validate a profile mapping (as read from YAML); errors name the bad key, e.g. ``cpu.base.lr_nsample``."""
    from dynslice.core.allocate import BUDGETS
    from dynslice.data import ALL_DATASETS

    top = _check_keys(name, obj, TOP_KEYS)
    for key in ("models", "cal_datasets", "sp"):
        if key not in top:
            raise ValueError(f"{name}.{key}: required key is missing")
    raw_models = top["models"]
    if not isinstance(raw_models, list) or not raw_models:
        raise ValueError(f"{name}.models: expected a non-empty list of models")
    models = []
    for i, m in enumerate(raw_models):
        m = {"spec": m} if isinstance(m, str) else _check_keys(f"{name}.models[{i}]", m, MODEL_KEYS)
        if not isinstance(m.get("spec"), str):
            raise ValueError(f"{name}.models[{i}].spec: required model spec (string) is missing")
        models.append(ModelEntry(**m))
    run_fields = {f.name for f in fields(RunConfig)}
    base = _check_keys(f"{name}.base", top.get("base") or {}, frozenset(run_fields - SWEPT_FIELDS))
    for k in ("ppl_datasets",):
        if k in base and isinstance(base[k], list):
            base[k] = tuple(base[k])
    auto = top.get("auto_sb", False)
    auto_on = auto is not False and auto is not None
    auto = _check_keys(f"{name}.auto_sb", auto if isinstance(auto, Mapping) else {}, AUTO_KEYS) if auto_on else {}
    if auto_on and not isinstance(top.get("auto_sb"), Mapping) and top.get("auto_sb") is not True:
        raise ValueError(f"{name}.auto_sb: expected true, false or a mapping with {', '.join(sorted(AUTO_KEYS))}")
    zs = _check_keys(f"{name}.zero_shot", top.get("zero_shot") or {}, ZERO_SHOT_KEYS)
    budgets = _str_list(f"{name}.budgets", top.get("budgets", ["width"]), BUDGETS)
    sb_step = top.get("sb_step", 0.02)
    if isinstance(sb_step, bool) or not isinstance(sb_step, int | float) or not 0 < sb_step < 1:
        raise ValueError(f"{name}.sb_step: {sb_step!r} is outside 0 < sb_step < 1")
    defaults = RunConfig()
    profile = Profile(
        name=name, models=tuple(models), base=tuple(sorted(base.items())),
        cal_datasets=_str_list(f"{name}.cal_datasets", top["cal_datasets"], ALL_DATASETS),
        lr_datasets=_str_list(f"{name}.lr_datasets", top.get("lr_datasets", [base.get("lr_dataset", "wiki")]),
                              ALL_DATASETS),
        sp=_fraction_list(f"{name}.sp", top["sp"]), sb_step=float(sb_step), budgets=budgets, auto_sb=auto_on,
        auto_sb_step=float(auto.get("step", defaults.auto_sb_step)), auto_sb_max_evals=auto.get("max_evals"),
        auto_sb_nsamples=auto.get("nsamples", defaults.auto_sb_nsamples),
        auto_sb_budgets=_str_list(f"{name}.auto_sb.budgets", auto.get("budgets", list(budgets)), BUDGETS),
        tasks=_str_list(f"{name}.zero_shot.tasks", zs.get("tasks", []), empty_ok=True),
        task_limit=zs.get("limit"),
        zero_shot_budgets=_str_list(f"{name}.zero_shot.budgets", zs.get("budgets", ["width"]), BUDGETS,
                                    empty_ok=True),
        description=str(top.get("description", "")), notebooks=_notebook_list(f"{name}.notebooks",
                                                                              top.get("notebooks", [])))
    # Build one config of each kind so that every field value is checked now, with RunConfig's messages.
    for model in profile.models:
        for cal in profile.cal_datasets:
            try:
                profile.base_config(model, sp=profile.sp[0], sb=AUTO if profile.auto_sb else profile.sp[0],
                                    cal_dataset=cal, tasks=profile.tasks, task_limit=profile.task_limit)
            except ValueError as e:
                raise ValueError(f"{name}.{e}") from e
    return profile


def load_profile(name_or_path: str | Path) -> Profile:
    """Read and validate ``configs/<name>.yaml`` (or a YAML path)."""
    path = profile_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ValueError(f"profile: {name_or_path!r} is neither a YAML file nor one of {', '.join(known)}")
    obj = yaml.safe_load(path.read_text())
    return parse_profile(obj or {}, obj.get("name", path.stem) if isinstance(obj, Mapping) else path.stem)


# ---------------------------------------------------------------------------------------------------- the sweep
def dynamic_sbs(sp: float, step: float) -> list[float]:
    """The sweep's dynamic SB values: ``sb_grid(sp, step)`` without ``sp`` itself (that is constant slicing)."""
    from dynslice.core.allocate import sb_grid

    return [sb for sb in sb_grid(sp, step) if not math.isclose(sb, sp)]


def sweep_configs(profile: Profile) -> list[RunConfig]:
    """Every run of the profile's sweep, in a fixed order (dense, then per corpus and SP: constant, dynamic, auto)."""
    configs: list[RunConfig] = []
    zs = dict(tasks=profile.tasks, task_limit=profile.task_limit if profile.tasks else None)
    for model in profile.models:
        configs.append(profile.base_config(model, sp=0.0, sb=0.0, cal_dataset=profile.cal_datasets[0], **zs))
        for cal in profile.cal_datasets:
            for sp in profile.sp:
                configs.append(profile.base_config(model, sp=sp, sb=sp, cal_dataset=cal, **zs))
                for budget in profile.budgets:
                    for sb in dynamic_sbs(sp, profile.sb_step):
                        configs.append(profile.base_config(model, sp=sp, sb=sb, budget=budget, cal_dataset=cal))
                if profile.auto_sb:
                    for budget in profile.auto_sb_budgets:
                        configs.append(profile.base_config(model, sp=sp, sb=AUTO, budget=budget, cal_dataset=cal))
    return configs


def run_name(cfg: RunConfig) -> str:
    """A readable file stem for a run: ``dense``, ``sp0.30-sb0.10-width-calwiki``, ``...-zs`` with tasks."""
    if cfg.dense:
        name = "dense"
    else:
        sb = "auto" if cfg.auto_sb else f"{cfg.sb:.2f}"
        name = f"sp{cfg.sp:.2f}-sb{sb}-{cfg.budget}-cal{cfg.cal_dataset}"
    return name + ("-zs" if cfg.tasks else "")


def result_path(cfg: RunConfig, root: str | Path, profile: str) -> Path:
    """``<root>/<profile>/runs/<model-slug>/<readable-name>-<key>.json``."""
    return Path(root) / profile / "runs" / slug(cfg.model) / f"{run_name(cfg)}-{cfg.key()}.json"


def infeasible_path(cfg: RunConfig, root: str | Path, profile: str) -> Path:
    """``<root>/<profile>/infeasible/<model-slug>/<name>-<key>.json``: a note that ``cfg`` cannot be allocated."""
    return Path(root) / profile / "infeasible" / slug(cfg.model) / f"{run_name(cfg)}-{cfg.key()}.json"


def is_done(cfg: RunConfig, path: str | Path) -> bool:
    """Whether ``path`` holds a finished record of exactly ``cfg`` (what :func:`dynslice.pipeline.run` resumes)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return read_json(path).get("config") == cfg.to_json()
    except (ValueError, AttributeError):
        return False


def infeasible_reason(bench, cfg: RunConfig) -> str | None:
    """Why ``cfg``'s allocation cannot exist (e.g. a small SB asks a layer to drop everything), else ``None``.

    Only fixed-SB runs are checked (auto-SB never picks an infeasible SB); it needs the LR score, which the run
    computes anyway.
    """
    from dynslice.core.allocate import allocate, lr_input

    if cfg.dense or cfg.auto_sb:
        return None
    lr = bench.lr(cfg)
    dims = bench.dims()
    try:
        allocate(lr_input(lr).redundancy, cfg.sp, cfg.sb, dims.hidden, round_interval=cfg.round_interval,
                 budget=cfg.budget, dims=dims, count=cfg.count, rounding=cfg.rounding)
    except ValueError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` did: paths of runs executed, skipped (already done) and infeasible (with reasons)."""

    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    infeasible: tuple[tuple[str, str], ...]
    time_s: float


def _group_by_bench(configs: Iterable[RunConfig]) -> dict[tuple[str, str, str], list[RunConfig]]:
    groups: dict[tuple[str, str, str], list[RunConfig]] = {}
    for cfg in configs:
        groups.setdefault((cfg.model, cfg.dtype, cfg.device), []).append(cfg)
    return groups


def run_sweep(configs: Sequence[RunConfig], root: str | Path, profile: str, *, force: bool = False,
              log: Callable[[str], None] = print, shard: tuple[int, int] | None = None) -> SweepResult:
    """Run every config not yet done, one :class:`~dynslice.pipeline.Workbench` per (model, dtype, device).

    Finished records (same config at the same path) are skipped without loading the model; ``force`` reruns them.
    Configs whose allocation is infeasible are reported and noted under ``infeasible/``, not run. Records are
    written atomically, so a sweep killed halfway resumes where it stopped. ``shard`` ``(K, N)`` (default:
    ``$DYNSLICE_SHARD``) runs only shard K of N (:mod:`dynslice.shard`).
    """
    from dynslice.paths import configure_hf_cache
    from dynslice.shard import shard_configs, shard_from_env

    shard = shard if shard is not None else shard_from_env()
    if shard is not None:
        configs = shard_configs(configs, *shard)
        log(f"shard {shard[0]}/{shard[1]}: {len(configs)} runs")

    configure_hf_cache()
    from dynslice.pipeline import Workbench, run

    t0 = time.perf_counter()
    ran: list[str] = []
    skipped: list[str] = []
    infeasible: list[tuple[str, str]] = []
    for (model, dtype, device), group in _group_by_bench(configs).items():
        noted = [c for c in group if not force and is_done(c, infeasible_path(c, root, profile))]
        infeasible += [(str(result_path(c, root, profile)), read_json(infeasible_path(c, root, profile))["infeasible"])
                       for c in noted]
        todo = [c for c in group if c not in noted and (force or not is_done(c, result_path(c, root, profile)))]
        skipped += [str(result_path(c, root, profile)) for c in group if c not in todo and c not in noted]
        if not todo:
            continue
        bench = Workbench(model, dtype, device)
        for k, cfg in enumerate(tqdm(todo, desc=f"runs {model}"), 1):
            path = result_path(cfg, root, profile)
            reason = infeasible_reason(bench, cfg)
            if reason is not None:
                infeasible.append((str(path), reason))
                write_json(infeasible_path(cfg, root, profile), {"config": cfg.to_json(), "infeasible": reason})
                log(f"[{k}/{len(todo)}] infeasible: {run_name(cfg)}: {reason}")
                continue
            t = time.perf_counter()
            rec = run(cfg, out=path, bench=bench, force=force)
            ran.append(str(path))
            ppl = ", ".join(f"{ds} {v:.2f}" for ds, v in rec["ppl"].items())
            log(f"[{k}/{len(todo)}] {run_name(cfg)}: ppl {ppl} ({time.perf_counter() - t:.0f} s)")
    result = SweepResult(tuple(ran), tuple(skipped), tuple(infeasible), time.perf_counter() - t0)
    log(f"sweep {profile}: ran {len(ran)}, skipped {len(skipped)} already finished, "
        f"{len(infeasible)} infeasible ({result.time_s:.0f} s)")
    return result


# ------------------------------------------------------------------------------------------- zero-shot follow-up
def best_dynamic(records: Sequence[Mapping[str, Any]], dataset: str | None = None) -> dict[tuple, Mapping]:
    """The lowest-perplexity fixed-SB dynamic record per ``(model, cal_dataset, budget, sp)``.

    Perplexity is read on ``dataset`` (default: each record's first ``ppl_datasets`` entry); ties go to the larger
    SB (closer to constant slicing). Constant, dense and auto-SB records are not candidates.
    """
    best: dict[tuple, Mapping] = {}
    for rec in records:
        cfg = rec["config"]
        if cfg["sp"] == 0 or cfg["sb"] == AUTO or math.isclose(cfg["sb"], cfg["sp"]):
            continue
        ds = dataset or cfg["ppl_datasets"][0]
        value = rec["ppl"].get(ds)
        if value is None:
            continue
        key = (cfg["model"], cfg["cal_dataset"], cfg["budget"], cfg["sp"])
        if key not in best or best_sb_key(value, cfg["sb"]) < best_sb_key(best[key]["ppl"][ds],
                                                                          best[key]["config"]["sb"]):
            best[key] = rec
    return best


def zero_shot_configs(profile: Profile, records: Sequence[Mapping[str, Any]],
                      root: str | Path | None = None) -> list[RunConfig]:
    """Zero-shot runs of the best dynamic SB per model × corpus × SP × ``zero_shot.budgets`` (sweep done first).

    The best SB is chosen by perplexity on the first of the profile's perplexity corpora. With ``root``, only the
    groups whose fixed-SB sweep runs are all finished there (a record or an infeasibility note) are returned, so
    that a shard never picks a best SB from part of a grid.
    """
    if not profile.tasks:
        return []
    waiting: set[tuple] = set()
    if root is not None:
        from dynslice.shard import missing_runs

        waiting = {(c.model, c.cal_dataset, c.budget, c.sp) for c in missing_runs(sweep_configs(profile), root,
                                                                                   profile.name)
                   if not c.dense and not c.auto_sb and not math.isclose(c.sb, c.sp)}
    out = []
    for key, rec in sorted(best_dynamic(records, profile.ppl_datasets[0]).items()):
        budget = key[2]
        if budget in profile.zero_shot_budgets and key not in waiting:
            cfg = RunConfig.from_json(rec["config"])
            out.append(cfg.replace(tasks=profile.tasks, task_limit=profile.task_limit))
    return out


# ----------------------------------------------------------------------------------------------------- LR files
def lr_path(root: str | Path, profile: str, model: str, corpus: str) -> Path:
    """``<root>/<profile>/lr/<model-slug>/<corpus>.json``."""
    return Path(root) / profile / "lr" / slug(model) / f"{corpus}.json"


def compute_lr_for_profile(profile: Profile, root: str | Path, *, force: bool = False,
                           log: Callable[[str], None] = print) -> list[Path]:
    """LR scores of every model on every ``lr_datasets`` corpus, as JSON (skipping files already written).

    Uses the profile's LR sample size, sequence length, metric and seed (the values the runs use).
    """
    from dynslice.paths import configure_hf_cache

    configure_hf_cache()
    from dynslice.pipeline import Workbench

    paths = []
    for model in profile.models:
        bench = None
        for corpus in profile.lr_datasets:
            cfg = profile.base_config(model, sp=profile.sp[0], sb=profile.sp[0], lr_dataset=corpus)
            path = lr_path(root, profile.name, model.spec, corpus)
            want = {"dataset": corpus, "nsamples": cfg.lr_nsamples, "seqlen": cfg.lr_seqlen,
                    "metric": cfg.lr_metric, "seed": cfg.seed, "model": model.spec}
            if not force and path.is_file() and all(read_json(path).get(k) == v for k, v in want.items()):
                log(f"skipped LR {model.spec}/{corpus}: {path} is up to date")
                paths.append(path)
                continue
            bench = bench or Workbench(model.spec, model.dtype, model.device)
            score = dict(bench.lr(cfg))
            score["num_layers"] = bench.dims().layers
            score["hidden"] = bench.dims().hidden
            write_json(path, score)
            log(f"wrote LR {model.spec}/{corpus}: {path}")
            paths.append(path)
    return paths
