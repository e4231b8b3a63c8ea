"""The run configuration, defined once: every input of a run with its type, allowed values, default and help.

:class:`RunConfig` is one frozen run (the run record's ``config`` and its identity). Each of its fields carries an
:class:`Option` in its metadata, and everything else is derived from those options: the ``dynslice run`` flags and
the shared flags of the other commands (:mod:`dynslice.cli`), the checks of a profile's keys
(:mod:`dynslice.experiment.profiles`) and :meth:`RunConfig.validate`.

The allowed values live here too (datasets, splits, samplers, perplexity protocols, dtypes and the two run
protocols with their defaults); the algorithm's own choices come from the core (budgets, counts, roundings, LR
metrics), which is the direction imports may go.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from dynslice.core.allocate import BUDGETS, COUNTS, ROUNDINGS
from dynslice.core.checks import MAX_SAMPLES, MAX_SEQLEN
from dynslice.core.lr import LAST_LAYER, METRICS, PRECISIONS

AUTO = "auto"

#: Every corpus a run may name (``dynslice.measure.data`` loads them: hub datasets first, then the offline ones).
DATASETS: tuple[str, ...] = ("wikitext2", "ptb", "c4", "alpaca", "pg19", "wiki", "news")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Perplexity protocols (``dynslice.measure.evaluate``): consecutive test chunks, the paper's samples, joined documents.
PPL_PROTOCOLS: tuple[str, ...] = ("slicegpt", "paper", "documents")
DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
LR_SAMPLERS: tuple[str, ...] = ("random", "sliding")
CAL_SAMPLERS: tuple[str, ...] = ("windows", "documents")

#: The two protocols of a run (see :mod:`dynslice.experiment.protocol` for what they mean and why they differ).
PROTOCOLS: tuple[str, ...] = ("dynslice", "reference")
#: ``field: (dynslice value, reference value)``: the RunConfig fields a protocol decides when not given. The
#: reference values are the authors' code's (each one's source, file:line, is in tests/test_protocol.py's
#: ``AUTHORS``); dynslice's are its own defaults (the cpu profile's identity depends on them: change none).
PROTOCOL_SETTINGS: dict[str, tuple[Any, Any]] = {
    "lr_split": ("train", "validation"),
    "lr_sampler": ("random", "sliding"),
    "lr_nsamples": (32, None),  # reference: every window of every document
    "lr_seqlen": (512, 1024),
    "lr_stride": (None, 256),
    "lr_last_layer": ("raw", "final_norm"),
    "lr_precision": ("fp32", "authors_fp16"),
    "cal_sampler": ("windows", "documents"),
    "cal_nsamples": (32, 128),
    "cal_seqlen": (512, 2048),
    "ppl_protocol": ("slicegpt", "documents"),
    "ppl_seqlen": (512, 2048),
    "ppl_nsamples": (None, 128),  # reference: at most 128 document-joined samples
    "embedding_mean": (False, True),
    "rounding": ("total", "reference"),
    "round_interval": (8, 1),
    "dtype": ("fp32", "fp16"),
}


class _Unset(enum.Enum):
    """The default of a protocol setting whose ``None`` means something (``lr_nsamples: null`` = every window)."""

    TOKEN = "the protocol's"

    def __repr__(self) -> str:
        return "PROTOCOL_DEFAULT"


#: "Not given: the protocol's value", for the settings where ``None`` is itself a value.
PROTOCOL_DEFAULT = _Unset.TOKEN

#: Fields added after run records were published: :meth:`RunConfig.to_json` leaves each out at this value (and
#: :meth:`RunConfig.from_json` reads its absence as this value), so that earlier records keep their identity.
LATER_FIELDS: dict[str, Any] = {"lr_precision": "fp32"}

KINDS = ("str", "int", "float", "bool", "names", "device", "sb")


def protocol_defaults(protocol: str) -> dict[str, Any]:
    """The value of every protocol setting under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    col = PROTOCOLS.index(protocol)
    return {name: values[col] for name, values in PROTOCOL_SETTINGS.items()}


@dataclass(frozen=True)
class Option:
    """How one RunConfig field is typed, checked, spelled on the command line and set in a profile.

    ``kind``: ``str``, ``int`` (at least ``low``), ``float`` (its range is a rule of :meth:`RunConfig.validate`),
    ``bool``, ``names`` (a list of names, each one of ``choices`` when given), ``device`` (``cpu`` or
    ``cuda[:N]``) or ``sb`` (a number, or ``auto``). ``optional``: ``None`` is allowed. ``flags``: the
    ``dynslice run`` spellings (default ``--field-name``; the first is the one errors show). ``cli_choices``:
    argparse refuses other values; when false the value is checked after parsing, so that the error names the
    field as a profile's does. ``profile``: where a profile sets the field (``base`` = a key of its ``base:``
    mapping; otherwise the profile key that sweeps or sets it); ``None`` = not settable in a profile.
    """

    help: str
    kind: str = "str"
    choices: tuple[str, ...] = ()
    low: int | None = None
    high: int | None = None
    optional: bool = False
    flags: tuple[str, ...] = ()
    cli_choices: bool = True
    profile: str | None = "base"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")

    def coerce(self, value: Any) -> Any:
        """A list of names as a tuple (a single name as a one-item tuple); other values unchanged."""
        if self.kind == "names" and isinstance(value, str):
            return (value,)
        if self.kind == "names" and isinstance(value, list | tuple):
            return tuple(value)
        return value

    def check(self, name: str, value: Any) -> None:
        """Raise ``ValueError`` naming ``name`` and what it allows when ``value`` has the wrong type or choice."""
        if value is None and self.optional:
            return
        if self.kind == "int":
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (self.low or 0)
                or (self.high is not None and value > self.high)
            ):
                allowed = f">= {self.low or 0}" + ("" if self.high is None else f" and <= {self.high}")
                raise ValueError(f"{name}: {value!r} must be an integer {allowed}")
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}: {value!r} must be a number")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {value!r} must be true or false")
        elif self.kind == "names":
            if not isinstance(value, tuple):
                raise ValueError(f"{name}: {value!r} must be a list of names")
            for item in value:
                if not isinstance(item, str):
                    raise ValueError(f"{name}: {item!r} is not a name (a string)")
                if self.choices and item not in self.choices:
                    raise ValueError(f"{name}: {item!r} is not one of {', '.join(self.choices)}")
        elif self.kind == "device":
            if not isinstance(value, str) or not value.startswith(("cpu", "cuda")):
                raise ValueError(f"{name}: {value!r} is not cpu or cuda[:N]")
        elif self.kind == "sb":
            if value != AUTO and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{name}: {value!r} is neither a number nor '{AUTO}'")
        elif self.choices:
            if value not in self.choices:
                raise ValueError(f"{name}: {value!r} is not one of {', '.join(self.choices)}")
        elif not isinstance(value, str):
            raise ValueError(f"{name}: {value!r} must be a string")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with ``default`` and its :class:`Option` (``compare``: part of the run's identity)."""
    compare = kw.pop("compare", True)
    return field(default=default, compare=compare, metadata={"option": Option(help, **kw)})


_PROTOCOL = "the protocol's"


@dataclass(frozen=True)
class RunConfig:
    """Every input of one ``dynslice run``: model -> LR -> widths -> slicing -> perplexity + zero-shot.

    ``sp = 0`` evaluates the dense model (no LR, no slicing). ``sb = "auto"`` searches the slicing base on held-out
    calibration chunks. Two runs with equal configs on the same arithmetic (:mod:`dynslice.experiment.numerics`:
    pinned, or
    the same threads and SIMD level on one CPU) produce the same JSON (timings aside); elsewhere a sliced model's
    perplexity moves by up to about 1% (``bench/results/numerics_noise.json``).

    ``protocol`` (``dynslice`` or ``reference``, see :mod:`dynslice.experiment.protocol`) fills every setting of
    :data:`PROTOCOL_SETTINGS` that is not given (left at ``None``, or at :data:`PROTOCOL_DEFAULT` where ``None`` is a
    value: ``lr_nsamples``, ``ppl_nsamples``); a value given explicitly always wins. ``save_dir`` is the only field
    a profile cannot set: it names one folder, and a profile's many runs would overwrite each other there.
    """

    model: str = _opt(
        "smollm2-135m",
        "model spec: smollm2-135m, tiny-random, a hub id, a folder or a .gguf file",
        profile="models[].spec",
    )
    protocol: str = _opt(
        "dynslice",
        "defaults of the protocol settings (dynslice.experiment.protocol); explicit values win",
        choices=PROTOCOLS,
    )
    dtype: str | None = _opt(None, "weights and compute dtype", choices=DTYPES, profile="models[].dtype")
    device: str = _opt("cpu", "where layers are computed: cpu or cuda[:N]", kind="device", profile="models[].device")
    seed: int = _opt(42, "seed of every sampler", kind="int", low=0, high=2**32 - 1)
    # allocation
    sp: float = _opt(0.3, "mean slice fraction SP, 0 <= sp < 1 (0: the dense model)", kind="float", profile="sp")
    sb: float | str = _opt(
        0.3,
        "slicing base SB, a number in [0, sp], or 'auto' (searched on held-out chunks)",
        kind="sb",
        profile="sb_step",
    )
    budget: str = _opt(
        "width",
        "what dynamic slicing keeps equal to constant slicing: mean width or parameters",
        choices=BUDGETS,
        profile="budgets",
    )
    count: str = _opt("total", "parameters counted by the params budget: all, or the weights only", choices=COUNTS)
    round_interval: int | None = _opt(None, "widths are multiples of this", kind="int", low=1, high=4096)
    rounding: str | None = _opt(None, "how widths are rounded", choices=ROUNDINGS)
    # LR score
    lr_metric: str = _opt(
        "cosine", "similarity of a layer's input and output that scores its redundancy", choices=METRICS
    )
    lr_dataset: str = _opt("wiki", "corpus of the LR score", choices=DATASETS, cli_choices=False)
    lr_split: str | None = _opt(None, "split of the LR corpus", choices=SPLITS)
    lr_sampler: str | None = _opt(
        None, "LR windows: random ones, or every lr_stride tokens of every document", choices=LR_SAMPLERS
    )
    lr_nsamples: int | None = _opt(
        PROTOCOL_DEFAULT,
        "LR windows (none: every window, with the sliding sampler)",
        kind="int",
        low=1,
        high=MAX_SAMPLES,
        optional=True,
    )
    lr_seqlen: int | None = _opt(None, "tokens per LR window", kind="int", low=2, high=MAX_SEQLEN)
    lr_stride: int | None = _opt(
        None, "tokens between sliding LR windows", kind="int", low=1, high=MAX_SEQLEN, optional=True
    )
    lr_last_layer: str | None = _opt(None, "the last layer's output: raw, or after the final norm", choices=LAST_LAYER)
    lr_precision: str | None = _opt(
        None,
        "arithmetic of the LR cosine: fp32, or the authors' fp16 (overflowing norms, NaN -> 0.5)",
        choices=PRECISIONS,
    )
    # calibration and folding
    cal_dataset: str = _opt(
        "wiki", "calibration corpus of the slicing", choices=DATASETS, cli_choices=False, profile="cal_datasets"
    )
    cal_sampler: str | None = _opt(
        None, "calibration windows: random windows, or joined documents", choices=CAL_SAMPLERS
    )
    cal_nsamples: int | None = _opt(None, "calibration samples", kind="int", low=1, high=MAX_SAMPLES)
    cal_seqlen: int | None = _opt(None, "tokens per calibration sample", kind="int", low=2, high=MAX_SEQLEN)
    embedding_mean: bool | None = _opt(None, "subtract each embedding row's mean before slicing", kind="bool")
    batch_size: int = _opt(8, "samples per forward pass", kind="int", low=1, high=MAX_SAMPLES)
    # automatic SB
    auto_sb_step: float = _opt(
        0.02, "grid step of the automatic SB search, 0.001 <= step < 1", kind="float", profile="auto_sb.step"
    )
    auto_sb_max_evals: int | None = _opt(
        None,
        "slicings an automatic SB search may make (none: until converged)",
        kind="int",
        low=1,
        high=10_000,
        optional=True,
        profile="auto_sb.max_evals",
    )
    auto_sb_nsamples: int = _opt(
        8,
        "held-out calibration chunks scored per SB tried",
        kind="int",
        low=1,
        high=MAX_SAMPLES,
        profile="auto_sb.nsamples",
    )
    # evaluation
    ppl_datasets: tuple[str, ...] = _opt(
        ("wiki",),
        "perplexity corpora (the first one chooses the best SB)",
        kind="names",
        choices=DATASETS,
        flags=("--ppl", "--ppl-datasets"),
    )
    ppl_protocol: str | None = _opt(None, "perplexity protocol", choices=PPL_PROTOCOLS)
    ppl_seqlen: int | None = _opt(None, "tokens per perplexity chunk", kind="int", low=2, high=MAX_SEQLEN)
    ppl_max_chunks: int | None = _opt(
        None,
        "at most this many chunks per corpus (slicegpt protocol)",
        kind="int",
        low=1,
        high=MAX_SAMPLES,
        optional=True,
    )
    ppl_nsamples: int | None = _opt(
        PROTOCOL_DEFAULT,
        "perplexity samples (paper and documents protocols)",
        kind="int",
        low=1,
        high=MAX_SAMPLES,
        optional=True,
    )
    tasks: tuple[str, ...] = _opt(
        (),
        "zero-shot tasks (lm-eval names, or dynslice_cloze, dynslice_continuation)",
        kind="names",
        profile="zero_shot.tasks",
    )
    task_limit: int | None = _opt(
        None,
        "documents per zero-shot task (none: all)",
        kind="int",
        low=1,
        high=10**7,
        optional=True,
        flags=("--limit", "--task-limit"),
        profile="zero_shot.limit",
    )
    # output
    save_dir: str | None = _opt(
        None,
        "also save the sliced model to this folder",
        optional=True,
        flags=("--save-model",),
        profile=None,
        compare=False,
    )

    def __post_init__(self) -> None:
        OPTIONS["protocol"].check("protocol", self.protocol)
        for name, value in protocol_defaults(self.protocol).items():
            given = getattr(self, name)
            if given is PROTOCOL_DEFAULT or (given is None and name not in NONE_IS_A_VALUE):
                object.__setattr__(self, name, value)
        for name, opt in OPTIONS.items():
            object.__setattr__(self, name, opt.coerce(getattr(self, name)))
        self.validate()

    @property
    def dense(self) -> bool:
        return self.sp == 0

    @property
    def auto_sb(self) -> bool:
        return self.sb == AUTO

    def validate(self) -> None:
        """Check every field against its :class:`Option`, then the rules between fields; a ``ValueError`` names
        the field and its allowed range."""
        for name, opt in OPTIONS.items():
            opt.check(name, getattr(self, name))
        if not 0 <= self.sp < 1:
            raise ValueError(f"sp: {self.sp!r} is outside 0 <= sp < 1 (0 means the dense model)")
        if self.sb != AUTO and not 0 <= self.sb <= self.sp:
            raise ValueError(f"sb: {self.sb!r} is outside 0 <= sb <= sp ({self.sp}), or use 'auto'")
        if self.lr_sampler == "sliding" and self.lr_stride is None:
            raise ValueError("lr_stride: the sliding LR sampler needs lr_stride >= 1")
        if self.lr_sampler != "sliding" and self.lr_nsamples is None:
            raise ValueError("lr_nsamples: None must be an integer >= 1 (every window: only with lr_sampler sliding)")
        if self.ppl_protocol == "paper" and self.ppl_nsamples is None:
            raise ValueError("ppl_nsamples: the 'paper' protocol needs ppl_nsamples >= 1")
        if not 1e-3 <= self.auto_sb_step < 1:
            raise ValueError(f"auto_sb_step: {self.auto_sb_step!r} is outside 0.001 <= step < 1")

    def to_json(self) -> dict[str, Any]:
        """The fields that define the run (``save_dir`` excluded, and a :data:`LATER_FIELDS` field at its
        earlier value)."""
        d = dataclasses.asdict(self)
        d.pop("save_dir")
        for name, value in LATER_FIELDS.items():
            if d[name] == value:
                del d[name]
        d["ppl_datasets"] = list(self.ppl_datasets)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunConfig:
        unknown = set(obj) - set(OPTIONS)
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**{**LATER_FIELDS, **obj})

    def key(self) -> str:
        """A short stable hash of :meth:`to_json`, used in result file names."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


#: The :class:`Option` of every RunConfig field, in field order.
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(RunConfig)}


#: The protocol settings where ``None`` is a value (their default is :data:`PROTOCOL_DEFAULT`).
NONE_IS_A_VALUE = frozenset(f.name for f in dataclasses.fields(RunConfig) if f.default is PROTOCOL_DEFAULT)


def default_of(name: str, protocol: str = "dynslice") -> Any:
    """The value a field takes when it is not given: its default, or ``protocol``'s value for a protocol setting."""
    if name in PROTOCOL_SETTINGS:
        return protocol_defaults(protocol)[name]
    return next(f.default for f in dataclasses.fields(RunConfig) if f.name == name)
