"""The run configuration is defined once (dynslice.experiment.config): every field reaches RunConfig from `dynslice
run` and
from a profile, the checks of both come from the same options, and the modules that implement a field's choices
agree with them."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import yaml

from dynslice import cli
from dynslice.experiment import profiles
from dynslice.experiment.config import (
    DATASETS,
    DTYPES,
    OPTIONS,
    PPL_PROTOCOLS,
    PROTOCOL_SETTINGS,
    SPLITS,
    RunConfig,
    default_of,
)

#: RunConfig fields a profile cannot set, and why.
NOT_IN_PROFILE = {"save_dir": "it names one folder; a profile's many runs would overwrite each other there"}
#: Non-default values of the fields whose kind gives no obvious one (a number range, a spec, a list of names).
SPECIAL: dict[str, Any] = {
    "model": "tiny-random",
    "device": "cuda:1",
    "sp": 0.4,
    "sb": 0.1,
    "auto_sb_step": 0.05,
    "ppl_datasets": ("news", "wiki"),
    "tasks": ("dynslice_cloze",),
    "save_dir": "sliced",
}
#: Other fields a value needs (the sliding LR sampler needs a stride).
COMPANIONS: dict[str, dict[str, Any]] = {"lr_sampler": {"lr_stride": 128}}


def non_default(name: str) -> Any:
    """A valid value of field ``name`` that differs from what it is without it (under the dynslice protocol)."""
    opt, default = OPTIONS[name], default_of(name)
    if name in SPECIAL:
        return SPECIAL[name]
    if opt.kind == "bool":
        return not default
    if opt.kind == "int":
        return (default or opt.low or 0) + 1
    if opt.choices:
        return [c for c in opt.choices if c != default][-1]
    raise AssertionError(f"{name}: no non-default value known for kind {opt.kind}; add one to SPECIAL")


def test_every_field_has_an_option_and_a_value():
    assert list(OPTIONS) == [f for f in RunConfig.__dataclass_fields__]
    for name in OPTIONS:
        value = non_default(name)
        assert value != default_of(name), name
        cfg = RunConfig(**{name: value, **COMPANIONS.get(name, {})})
        assert getattr(cfg, name) == value


# ------------------------------------------------------------------------------------------------- dynslice run
REQUIRED = {"model": "smollm2-135m", "sp": 0.3, "sb": 0.3}  # parsing loads no model


def run_argv(**values: Any) -> list[str]:
    """``dynslice run`` arguments setting ``values`` (RunConfig field -> value), spelled as a user would."""
    argv = ["run", "--out", "r.json"]
    for name, value in {**REQUIRED, **values}.items():
        flag = (OPTIONS[name].flags or (f"--{name.replace('_', '-')}",))[0]
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            argv += [flag, *value]
        else:
            argv += [flag, str(value)]
    return argv


def parse_run(argv: list[str]) -> RunConfig:
    return cli._config_from(cli._parser().parse_args(argv))


def test_run_without_options_is_the_default_config():
    assert parse_run(run_argv()) == RunConfig(**REQUIRED)
    assert parse_run(run_argv(protocol="reference")) == RunConfig(**REQUIRED, protocol="reference")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_field_is_reachable_from_dynslice_run(name):
    value = non_default(name)
    cfg = parse_run(run_argv(**{name: value}, **COMPANIONS.get(name, {})))
    assert getattr(cfg, name) == value
    if name not in REQUIRED:
        assert parse_run(run_argv()) != cfg or name == "save_dir"  # save_dir is not part of a run's identity
        assert getattr(parse_run(run_argv()), name) == default_of(name)


def test_run_accepts_none_and_auto():
    assert parse_run(run_argv(sb="auto")).auto_sb
    cfg = parse_run(run_argv(lr_nsamples="none", lr_sampler="sliding", lr_stride=256))
    assert cfg.lr_nsamples is None


def test_shared_flags_take_choices_and_defaults_from_the_definition():
    """Every flag of every command that stores a RunConfig field offers that field's choices (except the metric an
    LR file states, which may also be ``redundancy``: allocate and slice ``--lr-metric``)."""
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    seen = 0
    for command, p in sub.choices.items():
        for action in p._actions:
            field = action.dest if action.dest in OPTIONS else None  # lr_file_metric: an LR file's own metric
            if field is None or action.choices is None:
                continue
            assert tuple(action.choices) == OPTIONS[field].choices, (command, action.dest)
            seen += 1
    assert seen >= 12
    lr = cli._config_from(sub.choices["lr"].parse_args(["--model", "m", "--out", "o"]))
    assert (lr.dtype, lr.lr_seqlen, lr.lr_nsamples, lr.lr_metric) == (
        default_of("dtype"),
        default_of("lr_seqlen"),
        default_of("lr_nsamples"),
        default_of("lr_metric"),
    )
    # `dynslice lr --protocol reference` takes every LR setting of the authors' protocol; explicit flags still win
    ref = cli._config_from(sub.choices["lr"].parse_args(["--model", "m", "--out", "o", "--protocol", "reference"]))
    assert (ref.lr_sampler, ref.lr_seqlen, ref.lr_split) == (
        "sliding",
        default_of("lr_seqlen", "reference"),
        "validation",
    )
    mixed = ["--model", "m", "--out", "o", "--protocol", "reference", "--seqlen", "64"]
    assert cli._config_from(sub.choices["lr"].parse_args(mixed)).lr_seqlen == 64
    assert sub.choices["eval"].parse_args(["--model", "m", "--out", "o", "--ppl-protocol", "documents"])


# ----------------------------------------------------------------------------------------------------- profiles
def profile_obj(name: str, value: Any) -> dict:
    """A small profile (as YAML data) that sets field ``name`` to ``value`` where the field's option says."""
    obj: dict = {
        "name": "t",
        "models": [{"spec": "smollm2-135m"}],
        "cal_datasets": ["wiki"],
        "sp": [0.3],
        "sb_step": 0.1,
        "base": {},
    }
    where = OPTIONS[name].profile
    plain = list(value) if isinstance(value, tuple) else value
    if where == "base":
        obj["base"] = {name: plain, **COMPANIONS.get(name, {})}
    elif where.startswith("models[]."):
        obj["models"][0][where.split(".")[1]] = plain
    elif where.startswith(("auto_sb.", "zero_shot.")):
        section, key = where.split(".")
        obj[section] = {key: plain, **({"tasks": ["dynslice_cloze"]} if section == "zero_shot" else {})}
    elif where == "sb_step":  # SB is swept: the grid SP, SP - step, ..., 0 (and auto with auto_sb)
        obj["sb_step"] = round(obj["sp"][0] - value, 6)
    else:  # a swept list: sp, budgets, cal_datasets
        obj[where] = [plain]
    return obj


@pytest.mark.parametrize("name", [n for n in OPTIONS if n not in NOT_IN_PROFILE])
def test_every_field_is_reachable_from_a_profile(name, tmp_path):
    value = non_default(name)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile_obj(name, value)))
    configs = profiles.sweep_configs(profiles.load_profile(path))
    assert any(getattr(c, name) == value for c in configs), (name, value)


def test_fields_a_profile_cannot_set_are_refused():
    for name in NOT_IN_PROFILE:
        assert OPTIONS[name].profile is None
        with pytest.raises(ValueError, match=rf"t\.base\.{name}: unknown key \(allowed: .*lr_metric"):
            profiles.parse_profile(profile_obj("seed", 1) | {"base": {name: "x"}}, "t")


def test_auto_sb_is_reachable_from_a_profile():
    configs = profiles.sweep_configs(profiles.parse_profile(profile_obj("seed", 1) | {"auto_sb": True}, "t"))
    assert any(c.auto_sb for c in configs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"base": {"lr_nsamples": "many"}}, "t.base.lr_nsamples: 'many' must be an integer >= 1"),
        ({"base": {"lr_metric": "euclid"}}, "t.base.lr_metric: 'euclid' is not one of cosine, bi, angular"),
        ({"base": {"ppl_datasets": ["wiki", "nope"]}}, "t.base.ppl_datasets: 'nope' is not one of wikitext2"),
        ({"base": {"embedding_mean": "yes"}}, "t.base.embedding_mean: 'yes' must be true or false"),
        ({"base": {"auto_sb_step": 0.1}}, "t.base.auto_sb_step: unknown key"),  # set through auto_sb.step
        ({"models": [{"spec": "m", "dtype": "fp8"}]}, "t.models[0].dtype: 'fp8' is not one of fp32, bf16, fp16"),
        ({"models": [{"spec": "m", "device": "tpu"}]}, "t.models[0].device: 'tpu' is not cpu or cuda"),
        ({"auto_sb": {"max_evals": 0}}, "t.auto_sb.max_evals: 0 must be an integer >= 1"),
        ({"zero_shot": {"limit": True}}, "t.zero_shot.limit: True must be an integer >= 1"),
    ],
)
def test_profile_values_are_checked_by_their_option(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        profiles.parse_profile(profile_obj("seed", 1) | change, "t")


def test_null_means_the_protocols_value_in_a_profile():
    p = profiles.parse_profile(profile_obj("seed", 1) | {"base": {"protocol": "reference", "lr_seqlen": None}}, "t")
    assert profiles.sweep_configs(p)[0].lr_seqlen == PROTOCOL_SETTINGS["lr_seqlen"][1]


def test_a_users_profile_file_and_the_shipped_names(tmp_path):
    assert {"smoke", "cpu", "paper", "ablations", "frontier"} <= set(profiles.shipped_profiles())
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(profile_obj("seed", 7) | {"name": "mine"}))
    assert profiles.load_profile(mine).name == "mine"
    with pytest.raises(ValueError, match="profile: .*nope.yaml' is not a file"):
        profiles.load_profile(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="profile: '../smoke' is neither a YAML file nor one of"):
        profiles.load_profile("../smoke")


# ------------------------------------------------------------------------------------------ agreeing choices
def test_implementing_modules_agree_with_the_choices():
    from dynslice.measure import data, evaluate
    from dynslice.store import models

    assert DATASETS == data.ALL_DATASETS
    assert SPLITS == data.SPLITS
    assert PPL_PROTOCOLS == evaluate.PROTOCOLS
    assert DTYPES == tuple(models.DTYPES)


def test_config_errors_name_the_field():
    for kw, words in [
        ({"lr_seqlen": 1}, "lr_seqlen: 1 must be an integer >= 2"),
        ({"dtype": "fp8"}, "dtype: 'fp8' is not one of fp32, bf16, fp16"),
        ({"sb": "often"}, "sb: 'often' is neither a number nor 'auto'"),
        ({"sp": 0.3, "sb": 0.4}, "sb: 0.4 is outside 0 <= sb <= sp"),
        ({"lr_sampler": "sliding"}, "lr_stride:"),
        ({"tasks": ("piqa", 3)}, "tasks: 3 is not a name"),
        ({"ppl_protocol": "paper"}, "ppl_nsamples:"),
    ]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            RunConfig(**kw)
