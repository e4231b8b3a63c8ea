"""Profiles: an experiment's runs, and where their records go. The shipped profiles are this package's YAML files.

A profile (``smoke``, ``cpu``, ``paper``, ``ablations``, or a user's YAML file) names the models, the calibration
corpora, the SP values and the SB grid. :func:`sweep_configs` expands it into
:class:`~dynslice.experiment.config.RunConfig` objects:

* one dense baseline per model (``sp = 0``), with the zero-shot tasks;
* per model × calibration corpus × SP: constant slicing (``SB = SP``, with the zero-shot tasks), dynamic slicing
  at every ``SB`` of ``sb_grid(SP, sb_step)`` below ``SP`` under each budget (``width``: the paper's equal mean
  width; ``params``: equal parameter count), and one automatic-SB run per budget when ``auto_sb`` is on.

:func:`zero_shot_configs` adds, once the sweep is done, the zero-shot runs of the best dynamic SB (lowest
perplexity on the corpus the protocol's rule names, :func:`dynslice.experiment.protocol.best_sb_dataset`), or of
every dynamic SB with ``zero_shot: {every_sb: true}`` (the authors' protocol, with ``limit: 1000``). Every run
has a stable path ``<root>/<profile>/runs/<model-slug>/<readable-name>-<cfg.key()>.json`` (:func:`result_path`).

A profile's keys are checked against the run configuration's definition (:data:`dynslice.experiment.config.OPTIONS`):
the
``base:`` keys are the RunConfig fields whose option says ``profile="base"``; the others are set through the
profile's own keys (``models``, ``sp``, ``budgets``, ``cal_datasets``, ``auto_sb``, ``zero_shot``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dynslice.core.search import best_sb_key
from dynslice.experiment.config import AUTO, OPTIONS, PROTOCOL_SETTINGS, RunConfig, default_of
from dynslice.experiment.numerics import MODES as NUMERICS_MODES
from dynslice.experiment.protocol import best_sb_dataset
from dynslice.store.jsonio import read_json

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from dynslice.experiment.finetune import FinetuneConfig
    from dynslice.experiment.profiles.frontier import FrontierConfig

#: RunConfig fields a profile sets in ``base:``.
BASE_KEYS = frozenset(name for name, opt in OPTIONS.items() if opt.profile == "base")
#: Where a profile sets each of the other fields (``models[].spec``, ``sp``, ``auto_sb.step``, ...).
FIELD_KEYS = {name: opt.profile for name, opt in OPTIONS.items() if opt.profile not in (None, "base")}
#: Keys of a profile that are not RunConfig fields: names, the sweep's lists and grids, the notebooks.
PROFILE_ONLY_KEYS = frozenset(
    {
        "name",
        "description",
        "models",
        "base",
        "lr_datasets",
        "auto_sb",
        "zero_shot",
        "notebooks",
        "numerics",
        "frontier",  # notebook 07's settings (profiles/frontier.py: FrontierConfig)
        "rft",  # recovery fine-tuning (dynslice.experiment.finetune.FinetuneConfig, key for key)
    }
)


def _fields_in(section: str) -> dict[str, str]:
    """``{key: RunConfig field}`` of the fields set inside ``models[]``, ``auto_sb`` or ``zero_shot``."""
    return {loc.split(".", 1)[1]: name for name, loc in FIELD_KEYS.items() if loc.startswith(f"{section}.")}


#: Bounds of a profile: entries of each list, the description's length, the smallest SB grid step.
MAX_LIST = 256
MAX_DESCRIPTION = 10_000
MIN_STEP = 1e-3

TOP_KEYS = PROFILE_ONLY_KEYS | {loc for loc in FIELD_KEYS.values() if "." not in loc}
MODEL_KEYS = frozenset(_fields_in("models[]"))
AUTO_KEYS = frozenset(_fields_in("auto_sb")) | {"budgets"}
ZERO_SHOT_KEYS = frozenset(_fields_in("zero_shot")) | {"budgets", "every_sb"}


@dataclass(frozen=True)
class ModelEntry:
    """One model of a profile: its spec and where it runs."""

    spec: str
    dtype: str | None = "fp32"  # None: the protocol's
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
    zero_shot_every_sb: bool = False  # zero-shot at every dynamic SB (the authors), not only the best one
    notebooks: tuple[str, ...] = ()  # the notebooks run_all.sh runs, as two-digit prefixes ("01"); () = all
    numerics: str = (
        "native"  # "pinned": run_all.sh exports dynslice.experiment.numerics.PINNED_ENV (bit-reproducible CPU runs)
    )
    frontier: FrontierConfig | None = None  # notebook 07 (the compression frontier); None: the notebook skips
    rft: FinetuneConfig | None = None  # recovery fine-tuning settings (a profile's rft: section)

    def runs_notebook(self, name: str) -> bool:
        """Whether run_all.sh runs ``notebooks/<name>.ipynb`` (e.g. ``06_ablations``) for this profile."""
        return not self.notebooks or name[:2] in self.notebooks

    def base_config(self, model: ModelEntry, **changes: Any) -> RunConfig:
        """A RunConfig with the profile's shared fields for ``model``, then ``changes``."""
        kw = dict(self.base)
        kw.update(
            model=model.spec,
            dtype=model.dtype,
            device=model.device,
            auto_sb_step=self.auto_sb_step,
            auto_sb_max_evals=self.auto_sb_max_evals,
            auto_sb_nsamples=self.auto_sb_nsamples,
        )
        kw.update(changes)
        return RunConfig(**kw)

    @property
    def ppl_datasets(self) -> tuple[str, ...]:
        return tuple(dict(self.base).get("ppl_datasets", default_of("ppl_datasets")))


def slug(text: str) -> str:
    """A file-name-safe form of a model spec: ``meta-llama/Meta-Llama-3-8B`` -> ``meta-llama--Meta-Llama-3-8B``."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip("-.")
    if not out:
        raise ValueError(f"model: {text!r} gives an empty file name")
    return out


# ------------------------------------------------------------------------------------------------ profile loading
def _shipped() -> Traversable:
    return resources.files(__name__)


def shipped_profiles() -> tuple[str, ...]:
    """The names of the profiles shipped with the package (``smoke``, ``cpu``, ...)."""
    return tuple(sorted(p.name[:-5] for p in _shipped().iterdir() if p.name.endswith(".yaml") and p.is_file()))


def _check_keys(where: str, obj: Any, allowed: frozenset[str]) -> dict:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
    return dict(obj)


def _check_field(where: str, name: str, value: Any) -> Any:
    """``value`` of RunConfig field ``name`` (a list of names as a tuple), checked by its option; errors name
    ``where``. ``null`` is accepted where the field allows ``None`` or the protocol decides it."""
    opt = OPTIONS[name]
    value = opt.coerce(value)
    if value is None and (opt.optional or name in PROTOCOL_SETTINGS):
        return None
    opt.check(where, value)
    return value


def _check_section(where: str, section: str, obj: Mapping[str, Any]) -> None:
    """The values of the RunConfig fields set inside ``section`` (``models[]``, ``auto_sb``, ``zero_shot``)."""
    for key, name in _fields_in(section).items():
        if key in obj:
            _check_field(f"{where}.{key}", name, obj[key])


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
    """Two-digit notebook prefixes (``["01", "06"]``, ints accepted). In a checkout each must name a notebook
    ``notebooks/NN_*.ipynb`` (an installed package has no notebooks to check against)."""
    from dynslice.store.paths import PROJECT_ROOT

    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of two-digit notebook numbers such as ['01', '06']")  # noqa: TRY004
    out = []
    for v in value:
        nn = f"{v:02d}" if isinstance(v, int) and not isinstance(v, bool) else v
        if (
            not isinstance(nn, str)
            or not re.fullmatch(r"\d\d", nn)
            or (PROJECT_ROOT is not None and not any((PROJECT_ROOT / "notebooks").glob(f"{nn}_*.ipynb")))
        ):
            raise ValueError(f"{where}: {v!r} is not the number of a notebook notebooks/NN_*.ipynb")
        out.append(nn)
    return tuple(sorted(set(out)))


def _models(name: str, raw: Any) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{name}.models: expected a non-empty list of models")
    models = []
    for i, m in enumerate(raw):
        m = {"spec": m} if isinstance(m, str) else _check_keys(f"{name}.models[{i}]", m, MODEL_KEYS)
        if not isinstance(m.get("spec"), str):
            raise ValueError(f"{name}.models[{i}].spec: required model spec (string) is missing")
        _check_section(f"{name}.models[{i}]", "models[]", m)
        models.append(ModelEntry(**m))
    return tuple(models)


def parse_profile(obj: Mapping[str, Any], name: str) -> Profile:
    """Validate a profile mapping (as read from YAML); errors name the bad key, e.g. ``cpu.base.lr_nsample``."""
    check_name(name)
    top = _check_keys(name, obj, TOP_KEYS)
    for key in ("models", "sp", "cal_datasets", "lr_datasets", "budgets", "notebooks"):
        if isinstance(top.get(key), list) and len(top[key]) > MAX_LIST:
            raise ValueError(f"{name}.{key}: {len(top[key])} entries; at most {MAX_LIST} are allowed")
    desc = top.get("description") or ""
    if not isinstance(desc, str) or len(desc) > MAX_DESCRIPTION:
        raise ValueError(f"{name}.description: must be a text of at most {MAX_DESCRIPTION} characters")
    for key in ("models", "cal_datasets", "sp"):
        if key not in top:
            raise ValueError(f"{name}.{key}: required key is missing")
    models = _models(name, top["models"])
    base = {
        k: _check_field(f"{name}.base.{k}", k, v)
        for k, v in _check_keys(f"{name}.base", top.get("base") or {}, BASE_KEYS).items()
    }
    auto = top.get("auto_sb", False)
    auto_on = auto is not False and auto is not None
    auto = _check_keys(f"{name}.auto_sb", auto if isinstance(auto, Mapping) else {}, AUTO_KEYS) if auto_on else {}
    if auto_on and not isinstance(top.get("auto_sb"), Mapping) and top.get("auto_sb") is not True:
        raise ValueError(f"{name}.auto_sb: expected true, false or a mapping with {', '.join(sorted(AUTO_KEYS))}")
    _check_section(f"{name}.auto_sb", "auto_sb", auto)
    zs = _check_keys(f"{name}.zero_shot", top.get("zero_shot") or {}, ZERO_SHOT_KEYS)
    _check_section(f"{name}.zero_shot", "zero_shot", zs)
    every_sb = zs.get("every_sb", False)
    if not isinstance(every_sb, bool):
        raise ValueError(f"{name}.zero_shot.every_sb: {every_sb!r} must be true or false")
    budgets_allowed = OPTIONS["budget"].choices
    budgets = _str_list(f"{name}.budgets", top.get("budgets", [default_of("budget")]), budgets_allowed)
    mode = top.get("numerics", "native")
    if mode not in NUMERICS_MODES:
        raise ValueError(f"{name}.numerics: {mode!r} is not one of {', '.join(NUMERICS_MODES)}")
    from dynslice.experiment.profiles.frontier import parse_sections

    frontier, rft = parse_sections(name, top)
    sb_step = top.get("sb_step", 0.02)
    if isinstance(sb_step, bool) or not isinstance(sb_step, int | float) or not MIN_STEP <= sb_step < 1:
        raise ValueError(
            f"{name}.sb_step: {sb_step!r} is outside {MIN_STEP} <= sb_step < 1 (at most "
            f"{round(1 / MIN_STEP)} SB values per SP)"
        )
    datasets = OPTIONS["cal_dataset"].choices
    profile = Profile(
        name=name,
        models=models,
        base=tuple(sorted(base.items())),
        cal_datasets=_str_list(f"{name}.cal_datasets", top["cal_datasets"], datasets),
        lr_datasets=_str_list(
            f"{name}.lr_datasets",
            top.get("lr_datasets", [base.get("lr_dataset", default_of("lr_dataset"))]),
            OPTIONS["lr_dataset"].choices,
        ),
        sp=_fraction_list(f"{name}.sp", top["sp"]),
        sb_step=float(sb_step),
        budgets=budgets,
        auto_sb=auto_on,
        auto_sb_step=float(auto.get("step", default_of("auto_sb_step"))),
        auto_sb_max_evals=auto.get("max_evals", default_of("auto_sb_max_evals")),
        auto_sb_nsamples=auto.get("nsamples", default_of("auto_sb_nsamples")),
        auto_sb_budgets=_str_list(f"{name}.auto_sb.budgets", auto.get("budgets", list(budgets)), budgets_allowed),
        tasks=_str_list(f"{name}.zero_shot.tasks", zs.get("tasks", []), empty_ok=True),
        task_limit=zs.get("limit"),
        zero_shot_budgets=_str_list(
            f"{name}.zero_shot.budgets", zs.get("budgets", ["width"]), budgets_allowed, empty_ok=True
        ),
        description=desc,
        zero_shot_every_sb=every_sb,
        notebooks=_notebook_list(f"{name}.notebooks", top.get("notebooks", [])),
        numerics=mode,
        frontier=frontier,
        rft=rft,
    )
    ppl = profile.ppl_datasets
    for cal in profile.cal_datasets:
        chooser = best_sb_dataset(base.get("protocol") or default_of("protocol"), cal, ppl[0])
        if chooser not in ppl:
            raise ValueError(
                f"{name}.base.ppl_datasets: the protocol chooses the best SB of calibration corpus {cal!r} on "
                f"{chooser!r} perplexity; add {chooser!r} to ppl_datasets ({', '.join(ppl)})"
            )
    # Build one config of each kind so that the rules between fields are checked now, with RunConfig's messages.
    for model in profile.models:
        for cal in profile.cal_datasets:
            try:
                profile.base_config(
                    model,
                    sp=profile.sp[0],
                    sb=AUTO if profile.auto_sb else profile.sp[0],
                    cal_dataset=cal,
                    tasks=profile.tasks,
                    task_limit=profile.task_limit,
                )
            except ValueError as e:
                raise ValueError(f"{name}.{e}") from e
    return profile


#: Largest profile file, and the name rule of a profile (it names folders: ``<root>/<name>``, ``<figures>/<name>``).
MAX_PROFILE_BYTES = 1 << 20
NAME_RULE = "1 to 64 letters, digits, '_', '-' or '.', starting with a letter or digit (no path separators)"


def check_name(name: Any, where: str = "profile.name") -> str:
    """A profile name: a slug (it becomes a folder name); ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) or ".." in name:
        raise ValueError(f"{where}: {name!r} is not a profile name; allowed: {NAME_RULE}")
    return name


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): a profile needs none, and aliases nested in aliases
    expand exponentially (the "billion laughs")."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ValueError(
                f"uses a YAML alias (*{event.anchor}) at line {event.start_mark.line + 1}; profiles "
                "allow no anchors or aliases (write the values out)"
            )
        return super().compose_node(parent, index)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as e:
        raise ValueError(f"profile: {where} {e}") from None
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())[:300]
        raise ValueError(f"profile: {where} is not a valid profile YAML file ({first})") from None
    except RecursionError:
        raise ValueError(f"profile: {where} nests too deeply") from None


def load_profile(name_or_path: str | Path) -> Profile:
    """Read and validate a shipped profile by name (``smoke``, ``cpu``, ...), or a profile YAML file by path."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        path = Path(name_or_path)
        if path.exists() and not path.is_file():
            raise ValueError(f"profile: {str(name_or_path)!r} is not a regular file")
        if not path.is_file():
            raise ValueError(
                f"profile: {str(name_or_path)!r} is not a file (a shipped profile is named without "
                f".yaml: {', '.join(shipped_profiles())})"
            )
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ValueError(
                f"profile: {path} is {path.stat().st_size} bytes; at most {MAX_PROFILE_BYTES} bytes are allowed"
            )
        try:
            text, stem = path.read_text(encoding="utf-8"), path.stem
        except UnicodeDecodeError:
            raise ValueError(f"profile: {path} is not a UTF-8 text file") from None
    else:
        file = _shipped().joinpath(f"{name_or_path}.yaml")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name_or_path)) or not file.is_file():
            raise ValueError(
                f"profile: {str(name_or_path)!r} is neither a YAML file nor one of {', '.join(shipped_profiles())}"
            )
        text, stem = file.read_text(encoding="utf-8"), str(name_or_path)
    obj = _parse_yaml(text, str(name_or_path))
    if isinstance(obj, Mapping) and "name" in obj:
        name = check_name(obj["name"], "profile.name")
    else:
        name = check_name(stem, f"profile: the file name {stem!r} (no name: key) as profile.name")
    return parse_profile(obj or {}, name)


# ----------------------------------------------------------------------------------------------- the run lists
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


def best_dynamic(records: Sequence[Mapping[str, Any]], dataset: str | None = None) -> dict[tuple, Mapping]:
    """The lowest-perplexity fixed-SB dynamic record per ``(model, cal_dataset, budget, sp)``.

    Perplexity is read on ``dataset`` (default: the corpus the record's protocol chooses on,
    :func:`~dynslice.experiment.protocol.best_sb_dataset`: its first ``ppl_datasets`` entry under ``dynslice``,
    its calibration corpus under ``reference``); ties go to the larger SB (closer to constant slicing). Constant,
    dense and auto-SB records are not candidates.
    """
    best: dict[tuple, Mapping] = {}
    for rec in records:
        cfg = rec["config"]
        if cfg["sp"] == 0 or cfg["sb"] == AUTO or math.isclose(cfg["sb"], cfg["sp"]):
            continue
        ds = dataset or best_sb_dataset(cfg.get("protocol", "dynslice"), cfg["cal_dataset"], cfg["ppl_datasets"][0])
        value = rec["ppl"].get(ds)
        if value is None:
            continue
        key = (cfg["model"], cfg["cal_dataset"], cfg["budget"], cfg["sp"])
        if key not in best or best_sb_key(value, cfg["sb"]) < best_sb_key(
            best[key]["ppl"][ds], best[key]["config"]["sb"]
        ):
            best[key] = rec
    return best


def zero_shot_configs(
    profile: Profile, records: Sequence[Mapping[str, Any]], root: str | Path | None = None
) -> list[RunConfig]:
    """Zero-shot runs of the best dynamic SB per model × corpus × SP × ``zero_shot.budgets`` (sweep done first),
    or of every fixed dynamic SB with ``zero_shot.every_sb`` (each a copy of its sweep run with the tasks added:
    slicing is deterministic, so it slices the same model again).

    The best SB is chosen by perplexity on the corpus the protocol names
    (:func:`~dynslice.experiment.protocol.best_sb_dataset`). With ``root``, only the groups whose fixed-SB sweep
    runs are all finished there (a record or an infeasibility note) are returned, so that a shard never picks a
    best SB from part of a grid.
    """
    if not profile.tasks:
        return []
    waiting: set[tuple] = set()
    if root is not None:
        waiting = {
            (c.model, c.cal_dataset, c.budget, c.sp)
            for c in missing_runs(sweep_configs(profile), root, profile.name)
            if not c.dense and not c.auto_sb and not math.isclose(c.sb, c.sp)
        }
    if profile.zero_shot_every_sb:
        chosen = sorted(
            (
                ((c["model"], c["cal_dataset"], c["budget"], c["sp"], c["sb"]), rec)
                for rec in records
                for c in [rec["config"]]
                if c["sp"] != 0 and c["sb"] != AUTO and not math.isclose(c["sb"], c["sp"]) and not c["tasks"]
            ),
            key=lambda item: item[0],
        )
    else:
        chosen = sorted(best_dynamic(records).items())
    out = []
    for key, rec in chosen:
        budget = key[2]
        if budget in profile.zero_shot_budgets and key[:4] not in waiting:
            cfg = RunConfig.from_json(rec["config"])
            out.append(cfg.replace(tasks=profile.tasks, task_limit=profile.task_limit))
    return out


# ----------------------------------------------------------------------------------------------- where records go
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


def lr_path(root: str | Path, profile: str, model: str, corpus: str) -> Path:
    """``<root>/<profile>/lr/<model-slug>/<corpus>.json``."""
    return Path(root) / profile / "lr" / slug(model) / f"{corpus}.json"


def is_done(cfg: RunConfig, path: str | Path) -> bool:
    """Whether ``path`` holds a finished record of exactly ``cfg`` (what :func:`dynslice.experiment.pipeline.run`
    resumes)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return read_json(path).get("config") == cfg.to_json()
    except (ValueError, AttributeError):
        return False


def missing_runs(configs: Sequence[RunConfig], root: str | Path, profile: str) -> list[RunConfig]:
    """The configs with neither a finished record nor an infeasibility note under ``<root>/<profile>``."""
    return [
        c
        for c in configs
        if not is_done(c, result_path(c, root, profile)) and not is_done(c, infeasible_path(c, root, profile))
    ]
