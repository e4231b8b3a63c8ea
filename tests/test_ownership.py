"""No command ever deletes or replaces what it did not create (issue 24), told as table-driven cases.

Every case seeds a work folder with a user's files, runs one command the way a careless or hostile user would,
and checks: exit status 2 (or success where the command may go ahead), one line on stderr naming the problem, no
traceback, and every user file unchanged, byte for byte (hashes before and after). A property test then runs
random sequences of the cheap writing commands over a folder seeded with user files: no user file ever changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynslice.cli import main
from dynslice.core.slicing import slice_model
from dynslice.publish import repro
from dynslice.store import outputs, ownership
from dynslice.store.io import SLICED_META, finish_save, load_sliced, save_sliced
from dynslice.store.jsonio import write_json

REPO = Path(__file__).resolve().parents[1]
LR4 = {"metric": "cosine", "lr": [0.5, 0.9, 0.7, 0.8], "normalized": [0, 1, 0.5, 0.75], "hidden": 64}


# ------------------------------------------------------------------------------------------------------ helpers
def user_files(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` that is not dynslice's own (hash by relative path)."""
    return {
        rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
        for rel in ownership.walk_files(root)
        if (root / rel).is_file() and not (root / rel).is_symlink()
    }


def seed_user(w: Path) -> None:
    """A user's files, including names dynslice might take for its own."""
    files = {
        "thesis/thesis.tex": "\\documentclass{article}\n",
        "thesis/chapters/intro.tex": "Intro.\n",
        ".thesis.old/keep.txt": "a sibling named like a backup\n",
        ".thesis.new/keep.txt": "and like a temp\n",
        "notes.txt": "my notes\n",
        f"{outputs.OLD_PREFIX}m-final-12345/model.safetensors": "another model's backup",
        f"{outputs.TMP_PREFIX}m-1/weights.bin": "an older temp name",
    }
    for rel, text in files.items():
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(text)


def make_run(results: Path, figs: Path, *, finished: bool = True, monkeypatch=None) -> dict:
    """A run of run_all.sh as its steps write it (marker, ledger, records, a table, a figure)."""
    info = repro.start_run(results, "p", resume=False, figures=figs)
    ledger = repro.ledger_of(results)
    old = os.environ.get(ownership.LEDGER_ENV)
    os.environ[ownership.LEDGER_ENV] = str(ledger)
    try:
        write_json(
            results / "runs" / "m" / "dense-0123456789ab.json",
            {"config": {"sp": 0}, "versions": {}, "ppl": {"wiki": 10.0}, "params": {"total": 1}},
        )
        write_json(results / "lr" / "m" / "wiki.json", LR4)
        outputs.atomic_write(results / "tables" / "sweep.md", "| a |\n")
        outputs.atomic_write(figs / "headline.pdf", b"%PDF-1.4 fake")
    finally:
        if old is None:
            del os.environ[ownership.LEDGER_ENV]
        else:
            os.environ[ownership.LEDGER_ENV] = old
    if finished:
        repro.finish_run(results)
    return info


def one_line_refusal(rc: int, err: str, words: tuple[str, ...], code: int = 2) -> None:
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert rc == code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(autouse=True)
def _no_ledger(monkeypatch):
    monkeypatch.delenv(ownership.LEDGER_ENV, raising=False)


# ------------------------------------------------------------------------------- run_all.sh's steps (repro CLI)
def _r(w: Path) -> tuple[Path, Path]:
    return w / "r" / "p", w / "f" / "p"


def _setup_user_results(w: Path) -> None:
    results, figs = _r(w)
    for rel in ("tables/results.md", "runs/mine.json"):
        (results / rel).parent.mkdir(parents=True, exist_ok=True)
        (results / rel).write_text("mine\n")
    figs.mkdir(parents=True)
    (figs / "figure1.pdf").write_bytes(b"%PDF my figure")


def _setup_run_plus_user(w: Path) -> None:
    results, figs = _r(w)
    make_run(results, figs)
    (results / "tables" / "results.md").write_text("mine\n")


def _setup_run_plus_user_figure(w: Path) -> None:
    results, figs = _r(w)
    make_run(results, figs)
    (figs / "figure1.pdf").write_bytes(b"%PDF mine")


def _setup_run_changed(w: Path) -> None:
    results, figs = _r(w)
    make_run(results, figs)
    (results / "tables" / "sweep.md").write_text("| edited by hand |\n")


def _setup_legacy_run(w: Path) -> None:
    results, figs = _r(w)
    results.mkdir(parents=True)
    write_json(results / "RUN.json", {"run_id": "20240101-000000-abcdef", "profile": "p", "status": "finished"})
    write_json(results / "runs" / "r.json", {"config": {}, "versions": {}})


def _setup_finished(w: Path) -> None:
    make_run(*_r(w))


def _setup_published_with_user_file(w: Path) -> None:
    make_run(*_r(w))
    published = w / "pub"
    repro.publish(*_r(w), published)
    (published / "runs" / "extra.json").write_text("{}\n")


def _setup_marker_stray(w: Path) -> None:
    results, _ = _r(w)
    results.mkdir(parents=True)
    (results / "RUN.json").write_text("{}\n")
    (results / "tables").mkdir()
    (results / "tables" / "lr_agreement.md").write_text("mine\n")


def _setup_resume_user(w: Path) -> None:
    results, _ = _r(w)
    (results / "tables").mkdir(parents=True)
    (results / "tables" / "lr_agreement.md").write_text("mine\n")


# (id, setup, repro argv with {w}, stderr words); the run's own files may go, every file seed_user wrote stays.
REPRO_CASES: list[tuple[str, Callable[[Path], None], str, tuple[str, ...]]] = [
    ("force-folder-of-user-files", _setup_user_results, "clear {w}/r/p {w}/f/p", ("results", "no run of run_all.sh")),
    (
        "force-run-plus-user-table",
        _setup_run_plus_user,
        "clear {w}/r/p {w}/f/p",
        ("did not write", "tables/results.md", "deleted nothing"),
    ),
    ("force-run-plus-user-figure", _setup_run_plus_user_figure, "clear {w}/r/p {w}/f/p", ("figures", "figure1.pdf")),
    ("force-run-file-edited", _setup_run_changed, "clear {w}/r/p {w}/f/p", ("tables/sweep.md", "changed")),
    (
        "force-legacy-run-without-ledger",
        _setup_legacy_run,
        "clear {w}/r/p {w}/f/p",
        ("did not list the files", "delete the folder yourself"),
    ),
    ("force-stray-marker", _setup_marker_stray, "clear {w}/r/p {w}/f/p", ("no run of run_all.sh",)),
    (
        "resume-folder-without-run",
        _setup_resume_user,
        "start {w}/r/p p --resume --figures {w}/f/p",
        ("--resume continues only a run", "tables"),
    ),
    ("start-folder-without-run", _setup_resume_user, "start {w}/r/p p --figures {w}/f/p", ("empty folder",)),
    ("start-stray-marker", _setup_marker_stray, "start {w}/r/p p --resume", ("not a run marker",)),
    ("start-figures-of-user", _setup_user_results, "start {w}/r/other p --figures {w}/f/p", ("figures", "figure1.pdf")),
    (
        "publish-into-thesis",
        _setup_finished,
        "publish {w}/r/p {w}/f/p {w}/thesis",
        ("published", "not a reference dynslice published", "thesis.tex"),
    ),
    (
        "publish-into-parent-of-root",
        _setup_finished,
        "publish {w}/r/p {w}/f/p {w}/r",
        ("published", "contain one another"),
    ),
    ("publish-into-the-run", _setup_finished, "publish {w}/r/p {w}/f/p {w}/r/p/runs", ("contain one another",)),
    ("publish-into-figures-parent", _setup_finished, "publish {w}/r/p {w}/f/p {w}/f", ("figures",)),
    ("publish-into-file", _setup_finished, "publish {w}/r/p {w}/f/p {w}/notes.txt", ("a file or a link",)),
    (
        "publish-over-edited-reference",
        _setup_published_with_user_file,
        "publish {w}/r/p {w}/f/p {w}/pub",
        ("not a reference dynslice published",),
    ),
    (
        "publish-unfinished",
        lambda w: make_run(*_r(w), finished=False),
        "publish {w}/r/p {w}/f/p {w}/pub",
        ("no finished run",),
    ),
]


@pytest.mark.parametrize("setup, argv, words", [pytest.param(s, a, w, id=i) for i, s, a, w in REPRO_CASES])
def test_run_steps_never_touch_user_files(tmp_path, capsys, setup, argv, words):
    seed_user(tmp_path)
    setup(tmp_path)
    before = user_files(tmp_path)
    rc = repro.main(shlex.split(argv.replace("{w}", str(tmp_path))))
    one_line_refusal(rc, capsys.readouterr().err, words)
    assert user_files(tmp_path) == before


def test_force_deletes_exactly_the_run_and_a_new_run_starts(tmp_path):
    seed_user(tmp_path)
    results, figs = _r(tmp_path)
    make_run(results, figs)
    mine = user_files(tmp_path)
    run_files = {k for k in mine if k.startswith(("r/", "f/"))}
    repro.clear_run(results, figs)
    assert user_files(tmp_path) == {k: v for k, v in mine.items() if k not in run_files}
    assert list(results.iterdir()) == [] and list(figs.iterdir()) == []
    assert repro.start_run(results, "p", resume=False, figures=figs)["status"] == "running"


def test_publish_replaces_only_its_own_reference_and_leaves_look_alike_siblings(tmp_path):
    seed_user(tmp_path)
    results, figs = _r(tmp_path)
    make_run(results, figs)
    (tmp_path / ".pub.old").mkdir()
    (tmp_path / ".pub.old" / "x").write_text("user\n")
    (tmp_path / ".pub.new").mkdir()
    (tmp_path / ".pub.new" / "y").write_text("user\n")
    before = user_files(tmp_path)
    for _ in range(2):  # into nothing, then over the reference it published
        repro.publish(results, figs, tmp_path / "pub")
    now = user_files(tmp_path)
    assert {k: v for k, v in now.items() if not k.startswith("pub/")} == before
    assert (tmp_path / "pub" / "figures" / "headline.pdf").is_file()
    assert (tmp_path / "pub" / ownership.MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pub")) == [".pub.new", ".pub.old"]


def test_publish_over_a_reference_published_before_manifests(tmp_path):
    """The committed references have a finished RUN.json and only result items: publish may replace them."""
    results, figs = _r(tmp_path)
    make_run(results, figs)
    legacy = tmp_path / "published" / "cpu"
    shutil.copytree(results, legacy, ignore=shutil.ignore_patterns(".dynslice-ledger-*"))
    (legacy / "figures").mkdir()
    repro.publish(results, figs, legacy)
    assert (legacy / ownership.MANIFEST).is_file()
    assert sorted(p.name for p in legacy.parent.iterdir()) == ["cpu"]


def test_publish_refuses_a_reference_that_changed_while_it_was_copied(tmp_path, monkeypatch):
    results, figs = _r(tmp_path)
    make_run(results, figs)
    dest = tmp_path / "pub"
    repro.publish(results, figs, dest)
    real = repro._swap_in

    def late_user_file(tmp, d, listing):
        (d / "thesis.tex").write_text("written meanwhile\n")
        return real(tmp, d, listing)

    monkeypatch.setattr(repro, "_swap_in", late_user_file)
    with pytest.raises(ValueError, match="changed while publishing; kept it"):
        repro.publish(results, figs, dest)
    assert (dest / "thesis.tex").read_text() == "written meanwhile\n"
    assert (dest / "runs").is_dir()


def test_the_published_reference_of_the_checkout_is_caught_through_a_link(tmp_path):
    link = tmp_path / "root"
    link.symlink_to(REPO / "results" / "published")
    with pytest.raises(ValueError, match="published reference"):
        repro.clear_run(link / "cpu", tmp_path / "f")
    with pytest.raises(ValueError, match="published reference"):
        repro.start_run(link / "cpu", "cpu", resume=True)


def test_a_run_never_replaces_a_user_file_in_its_folders(tmp_path, monkeypatch):
    results, figs = _r(tmp_path)
    make_run(results, figs, finished=False)
    (results / "tables" / "lr_agreement.md").write_text("mine\n")
    monkeypatch.setenv(ownership.LEDGER_ENV, str(repro.ledger_of(results)))
    with pytest.raises(ValueError, match="not written by this run"):
        outputs.atomic_write(results / "tables" / "lr_agreement.md", "generated\n")
    assert (results / "tables" / "lr_agreement.md").read_text() == "mine\n"
    outputs.atomic_write(results / "tables" / "sweep.md", "| rewritten by the run |\n")  # its own: fine


# ----------------------------------------------------------------------------------------------- run_all.sh
def run_all(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNSLICE_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    env.pop(ownership.LEDGER_ENV, None)
    return subprocess.run(
        [str(REPO / "run_all.sh"), *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=300
    )


def _profile(w: Path, name: str, body: str = "") -> str:
    path = w / f"prof-{hashlib.sha1(name.encode()).hexdigest()[:8]}.yaml"
    path.write_text(body or f"name: {name}\nmodels: [tiny-random]\ncal_datasets: [wiki]\nsp: [0.3]\n")
    return str(path)


RUN_ALL_CASES: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
    (
        "publish-thesis",
        lambda w: (
            make_run(w / "r" / "cpu", w / "f" / "cpu"),
            ["--publish", "--published", f"{w}/thesis", "--root", f"{w}/r", "--figures", f"{w}/f"],
        )[1],
        ("published", "not a reference"),
    ),
    (
        "publish-parent-of-root",
        lambda w: (
            make_run(w / "r" / "cpu", w / "f" / "cpu"),
            ["--publish", "--published", f"{w}/r", "--root", f"{w}/r", "--figures", f"{w}/f"],
        )[1],
        ("contain one another",),
    ),
    (
        "force-user-folder",
        lambda w: (
            _setup_user_results(w),
            ["--profile", _profile(w, "p"), "--root", f"{w}/r", "--figures", f"{w}/f", "--force"],
        )[1],
        ("no run of run_all.sh",),
    ),
    (
        "resume-user-folder",
        lambda w: (
            _setup_resume_user(w),
            ["--profile", _profile(w, "p"), "--root", f"{w}/r", "--figures", f"{w}/f", "--resume"],
        )[1],
        ("--resume continues only a run",),
    ),
    (
        "root-link-to-published",
        lambda w: (
            (w / "ln").symlink_to(REPO / "results" / "published"),
            ["--profile", "smoke", "--root", f"{w}/ln", "--figures", f"{w}/f"],
        )[1],
        ("inside the published reference",),
    ),
    (
        "profile-name-dotdot",
        lambda w: ["--profile", _profile(w, "'..'"), "--root", f"{w}/r", "--force"],
        ("profile.name", "'..'"),
    ),
    (
        "profile-name-empty",
        lambda w: ["--profile", _profile(w, "''"), "--root", f"{w}/r", "--force"],
        ("profile.name", "''"),
    ),
    (
        "profile-name-escape",
        lambda w: ["--profile", _profile(w, "../results/published/cpu"), "--force"],
        ("profile.name",),
    ),
    ("profile-name-absolute", lambda w: ["--profile", _profile(w, "/tmp/abs"), "--root", f"{w}/r"], ("profile.name",)),
    ("profile-name-integer", lambda w: ["--profile", _profile(w, "5"), "--root", f"{w}/r"], ("profile.name", "5")),
    (
        "profile-yaml-syntax",
        lambda w: ["--profile", _profile(w, "x", "name: [x\n"), "--root", f"{w}/r"],
        ("profile", "not a valid profile YAML"),
    ),
    (
        "profile-yaml-python-tag",
        lambda w: [
            "--profile",
            _profile(w, "y", "name: !!python/object/apply:os.system ['touch HACKED']\n"),
            "--root",
            f"{w}/r",
        ],
        ("profile", "not a valid profile YAML"),
    ),
    (
        "profile-alias-bomb",
        lambda w: [
            "--profile",
            _profile(w, "z", "a: &a ['lol', 'lol']\nb: &b [*a, *a]\ndescription: *b\nname: z\n"),
            "--root",
            f"{w}/r",
        ],
        ("alias",),
    ),
    (
        "profile-sb-step-tiny",
        lambda w: [
            "--profile",
            _profile(w, "s", "name: s\nmodels: [tiny-random]\ncal_datasets: [wiki]\nsp: [0.3]\nsb_step: 1.0e-7\n"),
            "--root",
            f"{w}/r",
        ],
        ("sb_step", "0.001"),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("make, words", [pytest.param(m, w, id=i) for i, m, w in RUN_ALL_CASES])
def test_run_all_refuses_with_one_line(tmp_path, make, words):
    seed_user(tmp_path)
    argv = make(tmp_path)
    before = user_files(tmp_path)
    published = user_files(REPO / "results" / "published")
    proc = run_all(*argv, cwd=tmp_path)
    one_line_refusal(proc.returncode, proc.stderr, words)
    assert user_files(tmp_path) == before
    assert user_files(REPO / "results" / "published") == published
    assert not (tmp_path / "HACKED").exists()


# ------------------------------------------------------------------------------------ model folders and JSON
@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = slice_model(make_tiny_model("llama"), make_batch(), [48, 40, 32], progress=False)
    out = tmp_path_factory.mktemp("saved") / "m"
    save_sliced(model, out, "tiny")
    return model, out


def _hf_folder(w: Path, meta: str | None) -> Path:
    f = w / "hf"
    f.mkdir()
    (f / "config.json").write_text("{}\n")
    (f / "model.safetensors").write_bytes(b"weights")
    if meta is not None:
        (f / SLICED_META).write_text(meta)
    return f


def _old_format(w: Path, src: Path) -> Path:
    """A save by a dynslice that listed no files (no save id, no hashes), plus a user's vocab.json."""
    f = w / "old"
    shutil.copytree(src, f)
    meta = json.loads((f / SLICED_META).read_text())
    for key in ("files", "save_id", "file_hashes"):
        meta.pop(key)
    (f / SLICED_META).write_text(json.dumps(meta))
    (f / "vocab.json").write_text('{"mine": 1}')
    return f


MODEL_CASES: list[tuple[str, Callable[[Path, Path], Path], tuple[str, ...]]] = [
    ("overwrite-stray-empty-object", lambda w, s: _hf_folder(w, "{}"), ("not a dynslice model",)),
    ("overwrite-stray-list", lambda w, s: _hf_folder(w, "[]"), ("not a dynslice model",)),
    ("overwrite-stray-garbage", lambda w, s: _hf_folder(w, "{nope"), ("not a dynslice model",)),
    ("overwrite-old-format-with-user-vocab", _old_format, ("older dynslice", "delete it yourself")),
    (
        "overwrite-model-with-user-file",
        lambda w, s: (shutil.copytree(s, w / "mu"), (w / "mu" / "notes.md").write_text("mine"), w / "mu")[2],
        ("did not write", "notes.md"),
    ),
    (
        "overwrite-model-with-edited-config",
        lambda w, s: (shutil.copytree(s, w / "me"), (w / "me" / "config.json").write_text("{}"), w / "me")[2],
        ("config.json",),
    ),
    (
        "out-link-to-folder",
        lambda w, s: ((w / "ln").symlink_to(w / "thesis"), w / "ln")[1],
        ("symbolic link", "thesis"),
    ),
]


@pytest.mark.parametrize("make, words", [pytest.param(m, w, id=i) for i, m, w in MODEL_CASES])
def test_model_outputs_replace_only_provable_saves(tmp_path, sliced, make, words):
    model, src = sliced
    seed_user(tmp_path)
    target = make(tmp_path, src)
    before = user_files(tmp_path)
    with pytest.raises(ValueError) as e:
        save_sliced(model, target, "tiny", overwrite=True)
    for word in words:
        assert word in str(e.value)
    assert "\n" not in str(e.value)
    assert user_files(tmp_path) == before


def test_saving_m_never_touches_another_models_backup(tmp_path, sliced):
    model, _ = sliced
    seed_user(tmp_path)
    before = user_files(tmp_path)
    save_sliced(model, tmp_path / "m", "tiny")
    save_sliced(model, tmp_path / "m", "tiny", overwrite=True)
    now = user_files(tmp_path)
    assert {k: v for k, v in now.items() if not k.startswith("m/")} == before
    leftovers = {p.name for p in tmp_path.iterdir() if p.name.startswith((outputs.TMP_PREFIX, outputs.OLD_PREFIX))}
    assert leftovers == {f"{outputs.TMP_PREFIX}m-1", f"{outputs.OLD_PREFIX}m-final-12345"}  # the user's, untouched


@pytest.mark.parametrize("existing", [False, True])
def test_a_file_written_into_the_output_meanwhile_is_kept(tmp_path, sliced, existing):
    """Publish-time check: the output is checked at the start; a user's file that appears during the work is kept
    and the new model is kept beside it (in RAM and streaming saves alike: both finish through finish_save)."""
    model, src = sliced
    out = tmp_path / "m"
    if existing:
        shutil.copytree(src, out)
    else:
        out.mkdir()
    outputs.check_model_out(out, overwrite=True)
    tmp = outputs.temp_folder(out)
    (tmp / "model.safetensors").write_bytes(b"w")
    (tmp / "config.json").write_text("{}")
    (out / "thesis.tex").write_text("written during the run\n")
    with pytest.raises(ValueError, match="kept it, and the new model is at"):
        finish_save(
            tmp,
            out,
            base_model="tiny",
            architecture="X",
            widths=[1],
            final_width=1,
            dtype=torch.float32,
            weights={"file": "model.safetensors", "bytes": 1, "sha256": "0" * 64},
            num_parameters=1,
            has_tokenizer=False,
            extra={},
        )
    assert (out / "thesis.tex").read_text() == "written during the run\n"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("m.new-")]
    assert len(kept) == 1 and (kept[0] / SLICED_META).is_file()


@pytest.mark.parametrize("edit", [{"rope_theta": 1.0}, {"hidden_size": 1}])
def test_an_edited_config_is_refused_when_loading(tmp_path, sliced, edit):
    model, src = sliced
    copy = shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ValueError, match="config.json was changed after the save"):
        load_sliced(copy)
    assert torch.equal(load_sliced(src).lm_head.weight, model.lm_head.weight)


def test_a_json_output_that_appeared_meanwhile_is_kept(tmp_path):
    """Two `dynslice lr --out o.json` at once: the second to finish finds the first's file and refuses."""
    out = tmp_path / "o.json"
    outputs.check_json_out(out)
    write_json(out, LR4)  # the other process finished first
    first = out.read_bytes()
    outputs.check_json_out(tmp_path / "p.json")
    try:
        outputs._CLAIMS[outputs._key(out)] = None  # this process checked it while it was absent
        with pytest.raises(ValueError, match="appeared while dynslice was working"):
            write_json(out, {**LR4, "lr": [1, 2, 3, 4]})
    finally:
        outputs.release_claims()
    assert out.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]


@pytest.mark.slow
def test_two_concurrent_allocate_commands_do_not_replace_each_other(tmp_path):
    lr = tmp_path / "lr.json"
    write_json(lr, LR4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "dynslice", "allocate", "--lr", str(lr), "--sp", "0.3", "--sb", "0.1", "--out"]
    procs = [
        subprocess.Popen(
            [*argv, str(tmp_path / "o.json")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results  # the second refuses: at its check, or at publish
    assert all("Traceback" not in err for _, err in results)


# ------------------------------------------------------------------------------------ bounds and messages (CLI)
def _world(w: Path) -> None:
    write_json(w / "lr.json", LR4)
    (w / "lr400.json").write_text('{"lr": [1' + "0" * 400 + ', 1, 2, 3], "metric": "cosine", "hidden": 64}')
    (w / "lrdeep.json").write_text("[" * 100_000 + "]" * 100_000)
    (w / "lrhuge.json").write_text('{"lr": [1e308, -1e308, 0, 1], "metric": "cosine", "hidden": 64}')
    (w / "lrmany.json").write_text(json.dumps({"lr": [0.5] * 100_000, "metric": "cosine", "hidden": 64}))
    (w / "lrbig.json").write_text(json.dumps({"lr": [0.5] * 1_000_000, "metric": "cosine", "hidden": 64}))
    (w / "lrhidden.json").write_text(json.dumps({**LR4, "hidden": 10**21}))
    os.mkfifo(w / "fifo")
    (w / "dir").mkdir()
    (w / "ln").symlink_to(w / "dir")


A = "allocate --sp 0.3 --sb 0.1"
CLI_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("lr-400-digits", f"{A} --lr {{w}}/lr400.json --out {{w}}/o.json", ("lr400.json", "401 digits")),
    ("lr-100k-deep", f"{A} --lr {{w}}/lrdeep.json --out {{w}}/o.json", ("lrdeep.json", "nests")),
    ("lr-1e308", f"{A} --lr {{w}}/lrhuge.json --out {{w}}/o.json", ("lr[0]", "1e+12")),
    ("lr-100k-layers", f"{A} --lr {{w}}/lrmany.json --out {{w}}/o.json", ("100000 scores", "4096")),
    ("lr-million-layers-file-size", f"{A} --lr {{w}}/lrbig.json --out {{w}}/o.json", ("bytes", "at most")),
    ("lr-hidden-1e21", f"{A} --lr {{w}}/lrhidden.json --out {{w}}/o.json", ("hidden", "262144")),
    (
        "hidden-flag-1e21",
        f"{A} --lr {{w}}/lr.json --hidden 1000000000000000000000 --out {{w}}/o.json",
        ("--hidden", "262144"),
    ),
    ("lr-dev-zero", f"{A} --lr /dev/zero --out {{w}}/o.json", ("/dev/zero", "not a regular file")),
    ("lr-fifo", f"{A} --lr {{w}}/fifo --out {{w}}/o.json", ("fifo", "not a regular file")),
    ("widths-dev-zero", "slice --model tiny-random --widths /dev/zero --out {w}/m", ("not a regular file",)),
    ("out-dash", f"{A} --lr {{w}}/lr.json --out -", ("out", "'-'")),
    ("out-dash-slice", "slice --model tiny-random --sp 0.3 --out -", ("out", "'-'")),
    ("out-250-chars", f"{A} --lr {{w}}/lr.json --out {{w}}/{'a' * 250}.json", ("out", "bytes long", "at most")),
    ("out-250-chars-slice", f"slice --model tiny-random --sp 0.3 --out {{w}}/{'b' * 250}", ("out", "bytes long")),
    ("out-link-to-folder-json", f"{A} --lr {{w}}/lr.json --out {{w}}/ln", ("symbolic link", "dir")),
    ("out-link-to-folder-model", "slice --model tiny-random --sp 0.3 --out {w}/ln", ("symbolic link", "dir")),
    ("lr-nsamples-1e9", "lr --model tiny-random --nsamples 1000000000 --out {w}/o.json", ("--nsamples", "<=")),
    ("lr-seqlen-1e9", "lr --model tiny-random --seqlen 1000000000 --out {w}/o.json", ("--seqlen", "<=")),
    (
        "slice-cal-nsamples-1e9",
        "slice --model tiny-random --sp 0.3 --cal-nsamples 1000000000 --out {w}/m",
        ("--cal-nsamples",),
    ),
    ("eval-limit-huge", "eval --model tiny-random --limit 100000000000 --out {w}/o.json", ("--limit", "<=")),
    (
        "run-auto-step-tiny",
        "run --model tiny-random --sp 0.3 --sb auto --auto-sb-step 0.0000001 --out {w}/o.json",
        ("auto_sb_step", "0.001"),
    ),
    ("submit-slurm-without-slurm", "submit --profile smoke --shards 2 --cluster slurm", ("cluster", "sbatch")),
]


@pytest.mark.parametrize("argv, words", [pytest.param(a, w, id=i) for i, a, w in CLI_CASES])
def test_cli_bounds_and_messages(tmp_path, capsys, monkeypatch, argv, words):
    if "submit" in argv:
        monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    _world(tmp_path)
    before = user_files(tmp_path)
    try:
        rc = main(shlex.split(argv.replace("{w}", str(tmp_path))))
    except SystemExit as e:
        rc = e.code
    one_line_refusal(rc, capsys.readouterr().err, words)
    assert user_files(tmp_path) == before


def test_a_bad_cache_folder_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("DYNSLICE_CACHE", str(tmp_path / "file" / "cache"))
    rc = main(["allocate", "--lr", "x.json", "--sp", "0.3", "--sb", "0.1", "--out", str(tmp_path / "o.json")])
    one_line_refusal(rc, capsys.readouterr().err, ("DYNSLICE_CACHE", "cache folder"))


# --------------------------------------------------------------------------------------- the property test
USER_TREE = {
    "thesis/thesis.tex": b"tex",
    "thesis/fig/plot.pdf": b"%PDF plot",
    "r/p/tables/results.md": b"mine",
    "r/p/runs/mine.json": b'{"config": {}, "versions": {}}',
    "f/p/figure1.pdf": b"%PDF mine",
    "pub/notes.txt": b"notes",
    ".pub.old/x": b"x",
    ".pub.new/y": b"y",
    "m/dynslice.json": b"{}",
    "m/config.json": b"{}",
    f"{outputs.OLD_PREFIX}m-final-9/a": b"backup",
    "o.json": b'{"mine": true}',
}
FOLDERS = ["r/p", "r/q", "r", "f/p", "f/q", "pub", "thesis", "m", "m2", "", "r/q/runs"]


def _do(w: Path, step: tuple) -> None:
    """One command of the property test; refusals (one-line errors) are allowed, writing over user files is not."""
    kind, a, b, flag = step
    pa, pb = w / FOLDERS[a], w / FOLDERS[b]
    if kind == "start":
        repro.start_run(pa, "p", resume=flag, figures=pb)
    elif kind == "clear":
        repro.clear_run(pa, pb)
    elif kind == "finish":
        repro.finish_run(pa)
    elif kind == "publish":
        repro.publish(pa, pb, w / FOLDERS[(a + b) % len(FOLDERS)])
    elif kind == "runwrite":  # what the notebooks of a run write, into the run's own folders
        ledger = ownership.Ledger.open(repro.ledger_of(pa))
        os.environ[ownership.LEDGER_ENV] = str(ledger.path)
        try:
            outputs.atomic_write(pa / ("tables/results.md" if flag else "runs/x.json"), "{}")
            if "figures" in ledger.roots:
                outputs.atomic_write(ledger.roots["figures"] / "figure1.pdf", b"%PDF new")
        finally:
            del os.environ[ownership.LEDGER_ENV]
    elif kind == "json":
        try:
            write_json(outputs.check_json_out(pa / "o.json" if flag else w / "o.json", overwrite=True), LR4)
        finally:
            outputs.release_claims()
    elif kind == "model":
        target = outputs.check_model_out(pa, overwrite=flag)
        outputs.clean_stale(target)
        tmp = outputs.temp_folder(target)
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")
        finish_save(
            tmp,
            target,
            base_model="x",
            architecture="X",
            widths=[1],
            final_width=1,
            dtype=torch.float32,
            weights={"file": "model.safetensors", "bytes": 1, "sha256": "0" * 64},
            num_parameters=1,
            has_tokenizer=False,
            extra={},
        )


STEPS = st.tuples(
    st.sampled_from(["start", "clear", "finish", "publish", "runwrite", "json", "model"]),
    st.integers(0, len(FOLDERS) - 1),
    st.integers(0, len(FOLDERS) - 1),
    st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEPS, min_size=1, max_size=12))
def test_no_sequence_of_commands_changes_a_user_file(steps):
    with tempfile.TemporaryDirectory() as d:
        w = Path(d)
        for rel, data in USER_TREE.items():
            (w / rel).parent.mkdir(parents=True, exist_ok=True)
            (w / rel).write_bytes(data)
        for step in steps:
            try:
                _do(w, step)
            except (ValueError, FileNotFoundError):
                pass  # a one-line refusal
            for rel, data in USER_TREE.items():
                assert (w / rel).read_bytes() == data, (rel, step)


@pytest.mark.slow
def test_ctrl_c_during_papermill_exits_130_with_one_line(tmp_path):
    """SIGINT to run_all.sh's process group (Ctrl-C) while a notebook runs: status 130, one line, no traceback."""
    import signal
    import time

    env = {**os.environ, "DYNSLICE_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    env.pop(ownership.LEDGER_ENV, None)
    proc = subprocess.Popen(
        [
            str(REPO / "run_all.sh"),
            "--profile",
            "smoke",
            "--root",
            str(tmp_path / "r"),
            "--figures",
            str(tmp_path / "f"),
        ],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 240
    for line in proc.stdout:
        if line.startswith("== 01_") or time.time() > deadline:
            break
    time.sleep(8)  # papermill has started the kernel and runs a cell
    assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    noise = ("[IPKernelApp] WARNING", "MissingIDFieldWarning", "_validate(nbdict")  # printed by every run
    lines = [line for line in err.splitlines() if line.strip() and not any(n in line for n in noise)]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(lines) == 1 and "interrupted" in lines[0], err
    assert json.loads((tmp_path / "r" / "smoke" / "RUN.json").read_text())["status"] == "running"
    time.sleep(3)  # the kernel notices that its parent has gone
    repro.clear_run(tmp_path / "r" / "smoke", tmp_path / "f" / "smoke")  # --force: every file was listed as the run's
    assert not ownership.walk_files(tmp_path / "r") and not ownership.walk_files(tmp_path / "f")
